"""Probabilities shared by the batch (paper.md §6.4): one product for all images.

Input-independent attention (quadratic, learned position-only) computes one ``(heads, N, N)`` probability
matrix for the whole batch, and without a value projection every head reads the raw input, so eq. (2)'s
``softmax(A^(h)) X`` is one product of a shared matrix with the batch's values.  :class:`SharedProbabilityProduct`
is the ``bmm_gemm`` route's autograd function; :meth:`satconv.attention.base.AttentionBase.combine` picks the
route from the layer's :attr:`~satconv.attention.routes.Routes.shared`.
"""
from __future__ import annotations

import torch

from .precision import autocast_dtype


class SharedProbabilityProduct(torch.autograd.Function):
    """``out_b = P X_b`` for every image ``b``, with probabilities ``P`` shared by the batch (paper.md §6.4).

    ``forward(p: (R, N), x: (B, N, D)) -> (B, R, D)``.  The forward pass and the values' gradient
    ``P^T G_b`` are batched GEMMs with ``P`` broadcast over the batch (stride 0, not copied).  The
    probabilities' gradient ``sum_b G_b X_b^T`` is one ``(R, B D) @ (B D, N)`` GEMM over the batch and
    features together, the gradient ``G`` laid out ``(R, B, D)`` for it (one layout copy), instead of
    ``B`` per-image products summed afterwards (the ``"bmm"`` route's autograd, which writes a
    ``(B, R, N)`` tensor of them).  Both operands are cast to the autocast dtype when autocast is on
    (else to ``x.dtype``); the gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x) or x.dtype
        ctx.dtypes = p.dtype, x.dtype
        p, x = p.to(dtype), x.to(dtype)
        ctx.save_for_backward(p, x)
        return torch.bmm(p.expand(x.shape[0], -1, -1), x)  # (B, R, D)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, x = ctx.saved_tensors
        (b, n, d), r = x.shape, p.shape[0]
        g = g.to(x.dtype)
        d_p = d_x = None
        if ctx.needs_input_grad[0]:  # sum_b G_b X_b^T: (R, B*D) @ (B*D, N)
            d_p = torch.mm(g.transpose(0, 1).reshape(r, b * d), x.transpose(0, 1).reshape(n, b * d).t())
            d_p = d_p.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            d_x = torch.bmm(p.t().expand(b, -1, -1), g).to(ctx.dtypes[1])  # (B, N, D)
        return d_p, d_x
