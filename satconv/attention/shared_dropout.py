"""Softmax and dropout of the batch-shared probabilities (eq. (2)'s ``softmax(A^(h))``, dropped out in training)
as two operators that compilers do not look into.

Input-independent attention (quadratic eq. (9), learned position-only) computes one ``(1, H, N, N)``
probability tensor for the whole batch; in training one dropout mask is applied to it
(:class:`satconv.attention.base.InputIndependentAttention`).  Written as PyTorch expressions
(``torch.softmax``, then ``P * keep / (1 - p)``), inductor of torch 2.11 on an H100 compiled that
step wrong: in float32 the first block's gradients of the Gaussian centres and spreads came out 10^2 to
10^9 times eager's (the more so with fewer layers, NaN within a few steps for one layer), for 9 and 16
heads, with or without CUDA graphs and on both shared routes; with the attention dropout off, compiled and
eager agreed to 2e-6 (``tests/test_compile_training.py``).  Eager, and inductor on the CPU, were right.

:class:`SharedSoftmaxDropout` therefore runs the softmax, the mask and the cast as one custom operator
(``satconv::shared_softmax_dropout``) and its backward as another (``..._backward``), each with a fake
implementation for tracing: a compiled graph calls them as opaque kernels and fuses nothing across them.
The tensors are ``H N^2`` elements per layer (no batch axis), so this costs a few small kernel launches.

The law is ``nn.Dropout``'s, with the mask drawn by :func:`satconv.dropout.keep_mask` (independent keeps
with probability ``1 - p``, survivors scaled by ``1 / (1 - p)``).  The backward pass is the softmax's:
``dA = P * (d - sum_k(P * d))`` with ``d = dP + dP~ * keep / (1 - p)``, in float32 (float64 stays float64).
"""
from __future__ import annotations

import torch

from .precision import softmax_keys, wide_dtype


@torch.library.custom_op("satconv::shared_softmax_dropout", mutates_args=())
def _forward(logits: torch.Tensor, keep: torch.Tensor, scale: float,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    probs = softmax_keys(logits)  # float32 at least
    return probs, (probs * keep * scale).to(dtype)


@_forward.register_fake
def _(logits, keep, scale, dtype):
    return (torch.empty_like(logits, dtype=wide_dtype(logits.dtype)),
            torch.empty_like(logits, dtype=dtype))


@torch.library.custom_op("satconv::shared_softmax_dropout_backward", mutates_args=())
def _backward(probs: torch.Tensor, keep: torch.Tensor, scale: float, g_dropped: torch.Tensor | None,
              g_probs: torch.Tensor | None, logits_dtype: torch.dtype) -> torch.Tensor:
    d = torch.zeros_like(probs) if g_probs is None else g_probs.to(probs.dtype)  # probs: float32 at least
    if g_dropped is not None:
        d = d + g_dropped.to(probs.dtype) * keep * scale
    return (probs * (d - (probs * d).sum(-1, keepdim=True))).to(logits_dtype)


@_backward.register_fake
def _(probs, keep, scale, g_dropped, g_probs, logits_dtype):
    return torch.empty_like(probs, dtype=logits_dtype)


class SharedSoftmaxDropout(torch.autograd.Function):
    """``P = softmax(A)`` over keys and ``P~ = dropout(P)`` with a given mask, as opaque operators.

    ``apply(logits: (..., N), keep: (..., N) bool, p: float, dtype: torch.dtype) -> (probs, dropped)``:
    ``probs`` in float32 (float64 logits: float64), ``dropped = probs * keep / (1 - p)`` cast to ``dtype``
    (the activations' dtype, bfloat16 under autocast).  Both outputs are differentiable; the gradient of
    ``logits`` comes back in ``logits.dtype``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, keep: torch.Tensor, p: float, dtype: torch.dtype):
        scale = 1.0 / (1.0 - p)
        probs, dropped = torch.ops.satconv.shared_softmax_dropout(logits, keep, scale, dtype)
        ctx.save_for_backward(probs, keep)
        ctx.scale, ctx.logits_dtype = scale, logits.dtype
        ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros
        return probs, dropped

    @staticmethod
    def backward(ctx, g_probs: torch.Tensor | None, g_dropped: torch.Tensor | None):
        probs, keep = ctx.saved_tensors
        if g_probs is None and g_dropped is None:
            return None, None, None, None
        d_logits = torch.ops.satconv.shared_softmax_dropout_backward(probs, keep, ctx.scale, g_dropped, g_probs,
                                                                    ctx.logits_dtype)
        return d_logits, None, None, None


def shared_softmax_dropout(logits: torch.Tensor, keep: torch.Tensor, p: float,
                           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over keys, then dropout with mask ``keep`` (:class:`SharedSoftmaxDropout`).

    Args:
        logits: ``(1, H, N, N)`` position-only logits (any shape ``(..., N)``), float32 or float64.
        keep: bool mask of the same shape (:func:`satconv.dropout.keep_mask`).
        p: the drop probability, ``0 <= p < 1``.
        dtype: of the dropped probabilities (``None``: the probabilities' dtype).

    Returns:
        ``(probs, dropped)``: ``(..., N)`` probabilities (rows sum to 1) and ``probs * keep / (1 - p)`` in ``dtype``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if keep.shape != logits.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask of the logits' shape {tuple(logits.shape)}, "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    if dtype is None:
        dtype = wide_dtype(logits.dtype)
    return SharedSoftmaxDropout.apply(logits, keep, float(p), dtype)


__all__ = ["SharedSoftmaxDropout", "shared_softmax_dropout"]
