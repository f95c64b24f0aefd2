"""Content-only multi-head self-attention, arXiv 1911.03584 eq. (1)-(2) (Vaswani et al. 2017).

``A[h, q, k] = q_h(X_q) . k_h(X_k) / sqrt(D_h)`` with ``q_h``, ``k_h`` the ``h``-th slice of
``Linear(dim -> num_heads * head_dim)``.  No positional term: the layer is equivariant to any
permutation of the tokens.  Heads are split as ``view(B, N, H, Dh).transpose(1, 2)``: the [Re]'s
``BertSelfAttention`` used ``view(B, H, N, Dh)``, which mixes tokens and heads (bug B13 of
``paper.md`` §4.2).  Keys may come from ``key_source`` (the [Re]'s hierarchical variant).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionBase, scaled
from .folded import folded_forward


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split the channel axis into heads.

    Args:
        t: ``(B, N, num_heads * Dh)``, head ``h`` in channels ``h*Dh:(h+1)*Dh``.

    Returns:
        ``(B, num_heads, N, Dh)``.
    """
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)  # (B, H, N, Dh)


class ContentAttention(AttentionBase):
    """Standard multi-head dot-product attention ``softmax(q k^T / sqrt(Dh)) V`` on a 2-D token grid.

    Args:
        dim: input channels ``D_in``.
        num_heads: number of heads ``N_h``.
        head_dim: per-head query/key/value size ``D_h``; ``None`` = ``dim`` (heads concatenated,
            values = raw ``x``).
        out_dim: output channels; ``None`` = ``dim``.
        dropout: dropout on the probabilities.
        value_proj: see :class:`AttentionBase`.
        bias: bias of ``proj``.
        qkv_bias: bias of the query and key projections (the value projection, if any, has one).

    ``forward(x: (B, H, W, dim), return_attention, key_source: (B, H, W, dim) | None)``; probabilities
    ``(B, num_heads, N, N)``.
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True, qkv_bias: bool = True):
        super().__init__(dim, num_heads, head_dim=head_dim, out_dim=out_dim, dropout=dropout,
                         value_proj=value_proj, bias=bias)
        self.query = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.key = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)

    def queries_keys(self, x: torch.Tensor, key_source: torch.Tensor | None = None):
        """Per-head queries and keys.

        Args:
            x: ``(B, N, dim)``.
            key_source: ``(B, N, dim)`` or ``None`` (= ``x``).

        Returns:
            ``(q, k)``, each ``(B, num_heads, N, head_dim)``.
        """
        q = split_heads(self.query(x), self.num_heads)  # (B, H, N, Dh)
        k = split_heads(self.key(x if key_source is None else key_source), self.num_heads)  # (B, H, N, Dh)
        return q, k

    def scores(self, x: torch.Tensor, height: int, width: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``q . k / sqrt(head_dim)``.

        Args:
            x: ``(B, N, dim)``.
            height, width: grid size (unused: no positional term).
            key_source: ``(B, N, dim)`` or ``None``.

        Returns:
            ``(B, num_heads, N, N)``.
        """
        q, k = self.queries_keys(x, key_source)
        return scaled(q @ k.transpose(-2, -1), self.head_dim)  # (B, H, N, N)

    @property
    def route_family(self) -> str | None:
        """``"dense"`` with concatenated heads (``head_dim >= dim``: the folded route), else ``None``."""
        return "dense" if self.head_dim >= self.dim else None

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None,
                then: nn.Linear | None = None):
        """Apply the layer (contract of :meth:`AttentionBase.forward`).

        With concatenated heads (``head_dim >= dim``) the fast path folds ``W_qry W_key^T`` (and
        ``W_val W_out``) per step, :func:`satconv.attention.folded.folded_forward`; inside
        ``Routes(fast=False)`` (:mod:`satconv.attention.routes`) the explicit route runs.

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the probabilities ``(B, heads, N, N)`` (before dropout).
            key_source: ``(B, H, W, dim)`` keys' input, or ``None``.
            then: a ``Linear(out_dim -> E)`` applied to the output, folded into ``W_out`` on the fast paths.

        Returns:
            ``(B, H, W, out_dim)`` (``E`` with ``then``), or ``(out, probs)``.
        """
        self.check_input(x, key_source)
        if self.routes.fast and self.route_family == "dense":
            return folded_forward(self, x, key_source, return_attention=return_attention, then=then)
        return super().forward(x, return_attention=return_attention, key_source=key_source, then=then)
