"""Relative positions on the image grid: the offsets ``delta = key - query`` that positional attention reads.

Quadratic attention (arXiv 1911.03584 eq. (9)) takes the offsets themselves (:func:`relative_offsets`);
learned relative encodings (eq. (8), §4.2) index tables of ``2 * max_position - 1`` embeddings per axis by them
(:func:`relative_index`, :func:`axis_offset_index`, :func:`check_grid`).  Pixels are flattened row-major,
``n = row * width + col``.
"""
from __future__ import annotations

import torch


def relative_offsets(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Offsets ``delta = key - query`` between all pixel pairs of a grid.

    Args:
        height, width: grid size; pixels are flattened row-major, ``n = row * width + col``.

    Returns:
        ``(N, N, 2)`` tensor, ``[q, k] = (row_k - row_q, col_k - col_q)``, ``N = height * width``.
    """
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)  # (N, 2)
    return grid[None, :, :] - grid[:, None, :]  # (N, N, 2): key - query


def axis_offset_index(size: int, max_position: int, device=None) -> torch.Tensor:
    """Offsets ``key - query`` along one grid axis, shifted to index a table of ``2 * max_position - 1`` rows.

    Args:
        size: grid side along the axis (at most ``max_position``; callers check).
        max_position: largest supported side.

    Returns:
        ``(size, size)`` long, ``[q, k] = k - q + max_position - 1``.
    """
    pos = torch.arange(size, device=device)
    return pos[None, :] - pos[:, None] + max_position - 1


def check_grid(height: int, width: int, max_position: int) -> None:
    """Raise ``ValueError`` unless a ``height x width`` grid fits relative tables of ``2 * max_position - 1`` offsets."""
    if height > max_position or width > max_position:
        raise ValueError(f"grid {height}x{width} exceeds max_position={max_position}; "
                         f"relative embeddings cover sides up to {max_position}")


def relative_index(height: int, width: int, max_position: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer row and column offsets shifted to index embedding tables of ``2 * max_position - 1`` rows.

    Args:
        height, width: grid size, each at most ``max_position``.
        max_position: largest supported side; offsets range over ``-(max_position-1) .. max_position-1``.

    Returns:
        ``(row_index, col_index)``, each ``(N, N)`` long, ``delta + max_position - 1``.
    """
    check_grid(height, width, max_position)
    delta = relative_offsets(height, width, device=device, dtype=torch.long)
    return delta[..., 0] + max_position - 1, delta[..., 1] + max_position - 1
