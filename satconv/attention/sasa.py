"""Stand-alone self-attention, SASA (Ramachandran, Parmar, Vaswani, Bello, Levskaya & Shlens, NeurIPS 2019).

Local ``k x k`` window attention with 2-D relative position embeddings, eq. (3) of the SASA paper::

    y_ij = sum_{a,b in N_k(i,j)} softmax_ab( q_ij^T k_ab + q_ij^T r_{a-i, b-j} ) v_ab

per head, heads concatenated, then ``proj``.  ``r_{a-i,b-j}`` is the concatenation of a row-offset
embedding ``r_{a-i}`` and a column-offset embedding ``r_{b-j}`` of ``head_dim / 2`` each: the first
half of each head's query scores the row offset, the second half the column offset.  Each head has its
own embeddings (``rel_row``, ``rel_col``: ``(num_heads, k, head_dim/2)``), which totals the paper's
``k x d_out`` embedding entries.  There is no ``1/sqrt(d)`` scaling (the paper's formula has none).

Choices (documented deviations / readings):

* ``head_dim=None`` means ``dim // num_heads`` **with** a value projection (the SASA paper splits
  ``d_out`` into heads), not ``dim`` as for the paper of satconv; ``dim`` must then be divisible by
  ``num_heads``.  ``head_dim`` must be even.
* Keys outside the image are masked out of the softmax (no zero-padded keys): every row sums to 1 over
  real pixels.
* ``query``/``key`` projections have no bias (the paper's ``W_Q``, ``W_K``); ``value`` and ``proj`` come
  from :class:`AttentionBase`.
* Embeddings are initialised ``N(0, 1)`` (``torch.randn``, as in public SASA re-implementations).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionBase
from .san import check_kernel_size, footprint, footprint_to_dense, gather_footprint
from .softmax_dropout import dropped_softmax


class SASAAttention(AttentionBase):
    """SASA local attention over a ``k x k`` window with row/column relative embeddings.

    Args:
        dim: input channels.
        num_heads: number of heads.
        head_dim: per-head size of queries, keys and values (even); ``None``: ``dim // num_heads``.
        out_dim: output channels (``None``: ``dim``).
        dropout: dropout on the attention probabilities.
        value_proj: value projection; ``None`` means one whenever ``head_dim != dim`` (always when
            ``head_dim`` is ``None``).
        bias: bias of the output projection.
        kernel_size: odd window side ``k`` (7 in the SASA paper's main models).
    """

    folds_then = False  # forward() takes no following layer to fold (its own output map)

    row_stochastic = True
    input_independent = False

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True, kernel_size: int = 7):
        if head_dim is None:
            if num_heads < 1 or dim % num_heads:
                raise ValueError(f"with head_dim=None, dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
            value_proj = True if value_proj is None else value_proj
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be even (half row, half column embedding), got {head_dim}")
        super().__init__(dim, num_heads, head_dim=head_dim, out_dim=out_dim, dropout=dropout,
                         value_proj=value_proj, bias=bias)
        self.kernel_size = check_kernel_size(kernel_size)
        inner = num_heads * head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.rel_row = nn.Parameter(torch.randn(num_heads, kernel_size, head_dim // 2))  # r_{a-i}
        self.rel_col = nn.Parameter(torch.randn(num_heads, kernel_size, head_dim // 2))  # r_{b-j}

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """Apply SASA attention.

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the dense probabilities (before dropout).
            key_source: ``(B, H, W, dim)`` tokens the keys are computed from, or ``None`` for ``x``.

        Returns:
            ``(B, H, W, out_dim)``, or ``(out, probs)`` with ``probs`` ``(B, num_heads, N, N)``.
        """
        self.check_input(x, key_source)
        b, height, width, d = x.shape
        n, h, dh, k = height * width, self.num_heads, self.head_dim, self.kernel_size
        tokens = x.reshape(b, n, d)
        ks = tokens if key_source is None else key_source.reshape(b, n, d)
        fp = footprint(height, width, k, x.device)
        q = self.query(tokens).view(b, n, h, dh)  # (B, N, H, Dh)
        keys = gather_footprint(self.key(ks), fp).view(b, n, k * k, h, dh)  # (B, N, K, H, Dh)
        # broadcast-multiply-sum, not einsum: einsum becomes B*N*H tiny GEMVs (1.7x slower on an H200)
        content = (q[:, :, None] * keys).sum(-1)  # (B, N, K, H): q_ij . k_ab
        row = torch.einsum("bnhd,had->bnah", q[..., : dh // 2], self.rel_row)  # (B, N, k, H): q . r_{a-i}
        col = torch.einsum("bnhd,hcd->bnch", q[..., dh // 2:], self.rel_col)  # (B, N, k, H): q . r_{b-j}
        logits = content + (row[:, :, :, None] + col[:, :, None]).flatten(2, 3)  # slot s = a*k + b
        logits = logits.masked_fill(~fp.valid[..., None], float("-inf"))
        # (B, N, K, H) each; the query itself is always valid.  Softmax and dropout as opaque operators: compiled
        # on an H100, the plain expressions' gradients came out 10-14x eager's (satconv.attention.softmax_dropout)
        probs, dropped = dropped_softmax(logits, self.attn_drop, dim=2, dtype=logits.dtype)
        if self.value is None:
            v = gather_footprint(tokens, fp)[:, :, :, None]  # (B, N, K, 1, D): every head reads raw x
        else:
            v = gather_footprint(self.value(tokens), fp).view(b, n, k * k, h, dh)  # (B, N, K, H, Dh)
        out = (dropped[..., None] * v).sum(2)  # (B, N, H, Dh)
        out = self.proj(out.reshape(b, n, h * dh)).reshape(b, height, width, self.out_dim)
        if not return_attention:
            return out
        return out, footprint_to_dense(probs.to(logits.dtype).permute(0, 3, 1, 2), fp)


__all__ = ["SASAAttention"]
