"""Shared helpers of :mod:`satconv.viz`: array conversion, PNG rendering, query indices."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from matplotlib.figure import Figure

#: PNG resolution of explorer views: small, because the static book embeds every one of them
EXPLORER_DPI = 70


def to_numpy(x) -> np.ndarray:
    """A tensor or array-like as a float numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.dtype == torch.float64 else x.float()
        return x.numpy()
    return np.asarray(x, dtype=float)


def fig_to_png(fig: Figure, dpi: int = EXPLORER_DPI, colors: int | None = None) -> bytes:
    """Render a figure to PNG bytes and close it (``bbox_inches="tight"``).

    Args:
        fig: the figure (closed afterwards).
        dpi: resolution.
        colors: quantise to an adaptive palette of this many colours (2-3x smaller files for
            heatmaps); ``None`` keeps full RGBA.
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if colors is None:
        return buf.getvalue()
    from PIL import Image

    buf.seek(0)
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=colors).save(out, format="PNG", optimize=True)
    return out.getvalue()


def new_figure(figsize) -> Figure:
    """A pyplot-managed figure (so notebooks display it once) that callers may close."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize)


def query_index(query, height: int, width: int) -> int:
    """Flat index ``row * width + col`` of a query given as an int or a ``(row, col)`` pair."""
    if isinstance(query, (int, np.integer)):
        q = int(query)
    else:
        try:
            row, col = (int(v) for v in query)
        except (TypeError, ValueError):
            raise ValueError(f"query must be an int or a (row, col) pair, got {query!r}") from None
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"query {query!r} lies outside the {height}x{width} grid")
        q = row * width + col
    if not 0 <= q < height * width:
        raise ValueError(f"query index {q} lies outside the {height}x{width} grid (N={height * width})")
    return q


def square_side(n: int) -> int:
    """The side of a square grid of ``n`` tokens (``n = side * side``); raises ValueError otherwise."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot infer a square grid from N={n} tokens; pass grid=(height, width)")
    return side
