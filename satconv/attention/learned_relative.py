"""Learned 2-D relative positional attention, arXiv 1911.03584 §2 and §4 (learned encodings).

Follows epfml/attention-cnn ``models/bert.py`` ``Learned2DRelativeSelfAttention`` (final version).
``delta = key - query = (d1, d2)`` indexes a row table ``e_row`` and a column table ``e_col`` of
``2 * max_position - 1`` embeddings each (offsets ``-(M-1) .. M-1``).  Three variants
(``paper.md`` §2 table; terms of the Transformer-XL decomposition):

=========================  =============================================================  =========
variant                    logit ``A[h, q, k]``                                            flags
=========================  =============================================================  =========
``position_only``          ``w_row^h . e_row[d1] + w_col^h . e_col[d2]`` (term (d)), no    w.r
                           ``1/sqrt(d)``; ``e`` of size ``P = dim``, ``w`` a
                           ``Linear(P -> num_heads)`` (with bias) each; input-independent
``query_position``         ``(q_h[:Dk/2] . e_row[d1] + q_h[Dk/2:] . e_col[d2]) / sqrt(Dk)``  q.r
                           (term (b)); ``e`` of size ``Dk/2`` shared by the heads
``content_query_position`` ``(q_h . k_h + q.r) / sqrt(Dk)`` (terms (a) + (b), SASA-style)   q.k + q.r
=========================  =============================================================  =========

``Dk = head_dim`` (``= dim`` by default, heads concatenated as in the paper).  The ``q.r`` term is
computed as ``q . E^T`` for all ``2M - 1`` offsets, ``(B, H, N, 2M-1)``, then gathered with the
relative index: no ``(N, N, Dk)`` tensor.  Scores and values share one grid layout (no transposed
grid: bug B2 of ``paper.md`` §4.2).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import AttentionBase, InputIndependentAttention, scaled
from .positions import axis_offset_index, check_grid, relative_index
from .content import split_heads
from .folded import fold_query_tables, folded_forward, relative_query_terms, window_codes

VARIANTS = ("position_only", "query_position", "content_query_position")


class LearnedRelativeAttention(InputIndependentAttention):
    """Multi-head attention with learned row/column relative embeddings (epfml/attention-cnn).

    Args:
        dim: input channels ``D_in``.
        num_heads: number of heads ``N_h``.
        head_dim: per-head size ``Dk`` of queries, keys and values; ``None`` = ``dim``.  Must be
            even for the ``q.r`` variants (split into row and column halves).
        out_dim: output channels; ``None`` = ``dim``.
        dropout: dropout on the probabilities.
        value_proj: see :class:`AttentionBase`.
        bias: bias of ``proj``.
        variant: ``"position_only"``, ``"query_position"`` or ``"content_query_position"``.
        max_position: largest grid side; tables hold ``2 * max_position - 1`` offsets.

    Parameters:
        row_embeddings, col_embeddings: ``nn.Embedding(2M-1, P)``, ``P = dim`` (position_only) or ``Dk/2``.
        head_keys_row, head_keys_col: ``Linear(P -> num_heads)`` (position_only).
        query, key: ``Linear(dim -> num_heads * Dk)`` (query for the q.r variants, key for content).

    The probabilities are ``(1, H, N, N)`` for ``position_only`` (cached in eval mode, see
    :class:`InputIndependentAttention`) and ``(B, H, N, N)`` otherwise.  The instance attribute
    ``input_independent`` is ``True`` for ``position_only`` only.
    """

    input_independent = False  # per instance: True for variant="position_only"

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True,
                 variant: str = "position_only", max_position: int = 16):
        super().__init__(dim, num_heads, head_dim=head_dim, out_dim=out_dim, dropout=dropout,
                         value_proj=value_proj, bias=bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if max_position < 1:
            raise ValueError(f"max_position must be a positive integer, got {max_position}")
        self.variant = variant
        self.max_position = max_position
        self.input_independent = variant == "position_only"
        table = 2 * max_position - 1
        if self.input_independent:
            self.row_embeddings = nn.Embedding(table, dim)
            self.col_embeddings = nn.Embedding(table, dim)
            self.head_keys_row = nn.Linear(dim, num_heads)
            self.head_keys_col = nn.Linear(dim, num_heads)
        else:
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for variant {variant!r} (row and column halves), "
                                 f"got {self.head_dim}")
            self.query = nn.Linear(dim, num_heads * self.head_dim)
            self.row_embeddings = nn.Embedding(table, self.head_dim // 2)
            self.col_embeddings = nn.Embedding(table, self.head_dim // 2)
            if variant == "content_query_position":
                self.key = nn.Linear(dim, num_heads * self.head_dim)
        self.register_buffer("relative_position_index", torch.empty(2, 0, 0, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant!r}, max_position={self.max_position}"

    def position_index(self, height: int, width: int) -> torch.Tensor:
        """``(2, N, N)`` long: row and column ``delta + max_position - 1`` (raises if the grid is too large)."""
        return self._grid_table(
            "relative_position_index", height, width,
            lambda h, w, dev: torch.stack(relative_index(h, w, self.max_position, device=dev)))  # (2, N, N)

    def position_scores(self, height: int, width: int) -> torch.Tensor:
        """``position_only`` logits ``w_row . e_row[d1] + w_col . e_col[d2]``, ``(1, H, N, N)``.

        The fast path builds a ``(H, height, height)`` row term and a ``(H, width, width)`` column term
        (one-hot products with :func:`~satconv.attention.folded.window_codes`) and broadcast-adds them (no
        ``(N, N)`` index, and in the backward pass GEMMs and sums over the broadcast axes instead of an
        ``N * N`` scatter); the explicit route (``Routes(fast=False)``) indexes the tables with the
        full relative-offset index.
        """
        if not self.input_independent:
            raise ValueError(f"position_scores exists for variant 'position_only' only, not {self.variant!r}")
        row_logits = self.head_keys_row(self.row_embeddings.weight).t()  # (H, 2M-1)
        col_logits = self.head_keys_col(self.col_embeddings.weight).t()  # (H, 2M-1)
        if not self.routes.fast:
            row_index, col_index = self.position_index(height, width)  # (N, N) each
            return (row_logits[:, row_index] + col_logits[:, col_index])[None]  # (1, H, N, N)
        self._check_grid(height, width)
        m, h = self.max_position, self.num_heads
        # each query row's window of the table, as a one-hot product (a GEMM, not a scatter, backwards)
        dev, dt = row_logits.device, row_logits.dtype
        row = (row_logits @ window_codes(height, m, dev, dt).t()).view(h, height, height)  # (H, h_q, h_k)
        col = (col_logits @ window_codes(width, m, dev, dt).t()).view(h, width, width)  # (H, w_q, w_k)
        n = height * width
        return (row[:, :, None, :, None] + col[:, None, :, None, :]).reshape(1, h, n, n)  # (1, H, N, N)

    def _check_grid(self, height: int, width: int) -> None:
        check_grid(height, width, self.max_position)

    def query_position_scores(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unscaled ``q.r`` term ``q[:Dk/2] . e_row[d1] + q[Dk/2:] . e_col[d2]``.

        ``q . e`` is computed once for every offset (``(B, H, N, 2M-1)``).  The row term depends on
        the key only through the key's row and the column term only through its column, so each
        is gathered into a small ``(B, H, N, height)`` / ``(B, H, N, width)`` table and the two are
        broadcast-added into the ``(height, width)`` key grid: no ``(B, H, N, N)`` index tensor
        and, in the backward pass, a scatter into ``N * height`` slots instead of ``N * N``.

        Args:
            q: ``(B, H, N, Dk)`` queries.

        Returns:
            ``(B, H, N, N)``.
        """
        b, h, n, _ = q.shape
        m = self.max_position
        self._check_grid(height, width)
        half = self.head_dim // 2
        row_table = q[..., :half] @ self.row_embeddings.weight.t()  # (B, H, N, 2M-1): every row offset
        col_table = q[..., half:] @ self.col_embeddings.weight.t()  # (B, H, N, 2M-1): every column offset
        row_idx = axis_offset_index(height, m, q.device)[:, None, :]  # (height_q, 1, height_k): d1 + M - 1
        col_idx = axis_offset_index(width, m, q.device)[None, :, :]  # (1, width_q, width_k): d2 + M - 1
        row_table = row_table.view(b, h, height, width, -1)
        col_table = col_table.view(b, h, height, width, -1)
        row = row_table.gather(-1, row_idx.expand(height, width, height).expand(b, h, -1, -1, -1))  # (B,H,h,w,h)
        col = col_table.gather(-1, col_idx.expand(height, width, width).expand(b, h, -1, -1, -1))  # (B,H,h,w,w)
        return (row[..., :, None] + col[..., None, :]).reshape(b, h, n, n)  # (B, H, N, N): keys (row, col)

    def scores(self, x: torch.Tensor, height: int, width: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the chosen variant.

        Args:
            x: ``(B, N, dim)``.
            height, width: grid size, ``N = height * width``, each at most ``max_position``.
            key_source: ``(B, N, dim)`` keys' input (content variant only), or ``None``.

        Returns:
            ``(1, H, N, N)`` (position_only) or ``(B, H, N, N)``.
        """
        if self.input_independent:
            return self.position_scores(height, width)
        q = split_heads(self.query(x), self.num_heads)  # (B, H, N, Dk)
        logits = self.query_position_scores(q, height, width)  # (B, H, N, N)
        if self.variant == "content_query_position":
            k = split_heads(self.key(x if key_source is None else key_source), self.num_heads)  # (B, H, N, Dk)
            logits = logits + q @ k.transpose(-2, -1)  # (B, H, N, N)
        return scaled(logits, self.head_dim)

    @property
    def route_family(self) -> str | None:
        """``"shared"`` for ``position_only`` without value projection, ``"dense"`` for
        ``content_query_position`` with concatenated heads (``head_dim >= dim``), else ``None``."""
        if self.input_independent:
            return super().route_family
        return "dense" if self.variant == "content_query_position" and self.head_dim >= self.dim else None

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None,
                then: nn.Linear | None = None):
        """Apply the layer (contract of :meth:`AttentionBase.forward`).

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the probabilities (before dropout).
            key_source: ``(B, H, W, dim)`` keys' input for ``content_query_position``; ignored otherwise.
            then: a ``Linear(out_dim -> E)`` applied to the output, folded into ``W_out`` on the fast paths.

        Returns:
            ``(B, H, W, out_dim)`` (``E`` with ``then``), or ``(out, probs)`` with ``probs`` ``(1 or B, heads, N, N)``.
        """
        self.check_input(x, key_source)
        if self.input_independent:
            return super().forward(x, return_attention=return_attention, then=then)
        if self.routes.fast and self.route_family == "dense":
            # W_qry W_key^T and W_qry e^T folded per step (satconv.attention.folded)
            self._check_grid(*x.shape[1:3])
            weight, bias = fold_query_tables(self.query, self.row_embeddings.weight, self.col_embeddings.weight,
                                             self.num_heads, 1.0 / math.sqrt(self.head_dim))

            def relative(tokens, height, width):
                return relative_query_terms(tokens, weight, bias, self.num_heads, height, width, self.max_position)
            return folded_forward(self, x, key_source, relative=relative, return_attention=return_attention,
                                  then=then)
        return AttentionBase.forward(self, x, return_attention=return_attention, key_source=key_source, then=then)
