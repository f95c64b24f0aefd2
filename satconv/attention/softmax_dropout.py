"""Softmax and dropout of attention probabilities (eq. (2)'s ``softmax(A^(h))``, dropped out in training) as
two operators that compilers do not look into.

Input-independent attention (quadratic eq. (9), learned position-only) computes one ``(1, H, N, N)``
probability tensor for the whole batch; in training one dropout mask is applied to it
(:class:`satconv.attention.base.InputIndependentAttention`).  Written as PyTorch expressions
(``torch.softmax``, then ``P * keep / (1 - p)``), inductor of torch 2.11 on an H100 compiled that
step wrong: in float32 the first block's gradients of the Gaussian centres and spreads came out 10^2 to
10^9 times eager's (the more so with fewer layers, NaN within a few steps for one layer), for 9 and 16
heads, with or without CUDA graphs and on both shared routes; with the attention dropout off, compiled and
eager agreed to 2e-6 (``tests/test_compile_training.py``).  Eager, and inductor on the CPU, were right.
SASA's local windows (:mod:`satconv.attention.sasa`), the same softmax-then-mask expressions per image,
trained compiled in bf16 with dropout gave first-step gradients of the query and key weights 10 to 14
times eager's on an H100 (same test), so they and SAN's pairwise windows go through these operators too.

:class:`SoftmaxDropout` therefore runs the softmax, the mask and the cast as one custom operator
(``satconv::opaque_softmax_dropout``) and its backward as another (``..._backward``), each with a fake
implementation for tracing: a compiled graph calls them as opaque kernels and fuses nothing across them.
The batch-shared tensors are ``H N^2`` elements per layer (no batch axis), a few small kernel launches;
SASA's and SAN's are ``B N k^2 H``, their probabilities kept in float32 for the backward pass.
:func:`dropped_softmax` draws the mask of a :class:`satconv.dropout.Dropout` module and takes the softmax over
any axis.

The law is ``nn.Dropout``'s, with the mask drawn by :func:`satconv.dropout.keep_mask` (independent keeps
with probability ``1 - p``, survivors scaled by ``1 / (1 - p)``).  The backward pass is the softmax's:
``dA = P * (d - sum_k(P * d))`` with ``d = dP + dP~ * keep / (1 - p)``, in float32 (float64 stays float64).
"""
from __future__ import annotations

import torch

from ..dropout import Dropout, keep_mask
from .precision import softmax_keys, wide_dtype


@torch.library.custom_op("satconv::opaque_softmax_dropout", mutates_args=())
def _forward(logits: torch.Tensor, keep: torch.Tensor, scale: float,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    probs = softmax_keys(logits)  # float32 at least
    return probs, (probs * keep * scale).to(dtype)


@_forward.register_fake
def _(logits, keep, scale, dtype):
    return (torch.empty_like(logits, dtype=wide_dtype(logits.dtype)),
            torch.empty_like(logits, dtype=dtype))


@torch.library.custom_op("satconv::opaque_softmax_dropout_backward", mutates_args=())
def _backward(probs: torch.Tensor, keep: torch.Tensor, scale: float, g_dropped: torch.Tensor | None,
              g_probs: torch.Tensor | None, logits_dtype: torch.dtype) -> torch.Tensor:
    d = torch.zeros_like(probs) if g_probs is None else g_probs.to(probs.dtype)  # probs: float32 at least
    if g_dropped is not None:
        d = d + g_dropped.to(probs.dtype) * keep * scale
    return (probs * (d - (probs * d).sum(-1, keepdim=True))).to(logits_dtype)


@_backward.register_fake
def _(probs, keep, scale, g_dropped, g_probs, logits_dtype):
    return torch.empty_like(probs, dtype=logits_dtype)


class SoftmaxDropout(torch.autograd.Function):
    """``P = softmax(A)`` over keys and ``P~ = dropout(P)`` with a given mask, as opaque operators.

    ``apply(logits: (..., N), keep: (..., N) bool, p: float, dtype: torch.dtype) -> (probs, dropped)``:
    ``probs`` in float32 (float64 logits: float64), ``dropped = probs * keep / (1 - p)`` cast to ``dtype``
    (the activations' dtype, bfloat16 under autocast).  Both outputs are differentiable; the gradient of
    ``logits`` comes back in ``logits.dtype``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, keep: torch.Tensor, p: float, dtype: torch.dtype):
        scale = 1.0 / (1.0 - p)
        probs, dropped = torch.ops.satconv.opaque_softmax_dropout(logits, keep, scale, dtype)
        ctx.save_for_backward(probs, keep)
        ctx.scale, ctx.logits_dtype = scale, logits.dtype
        ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros
        return probs, dropped

    @staticmethod
    def backward(ctx, g_probs: torch.Tensor | None, g_dropped: torch.Tensor | None):
        probs, keep = ctx.saved_tensors
        if g_probs is None and g_dropped is None:
            return None, None, None, None
        d_logits = torch.ops.satconv.opaque_softmax_dropout_backward(probs, keep, ctx.scale, g_dropped, g_probs,
                                                                    ctx.logits_dtype)
        return d_logits, None, None, None


def softmax_dropout(logits: torch.Tensor, keep: torch.Tensor, p: float,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over keys, then dropout with mask ``keep`` (:class:`SoftmaxDropout`).

    Args:
        logits: ``(..., N)``, e.g. ``(1, H, N, N)`` position-only logits; half precision is upcast.
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
    return SoftmaxDropout.apply(logits, keep, float(p), dtype)


def dropped_softmax(logits: torch.Tensor, drop: Dropout, dim: int = -1,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over ``dim`` and ``drop``'s dropout of it: :func:`softmax_dropout` with a fresh mask in training.

    Args:
        logits: any shape, the softmax taken over ``dim`` (``-inf`` entries get probability 0; each slice
            needs one finite entry).
        drop: the module's dropout (its ``p``, ``salt`` and ``training``); without dropout (evaluation, or
            ``p == 0``) no mask is drawn and ``dropped`` is ``probs`` in ``dtype``.
        dim: the axis of the keys.
        dtype: of ``dropped`` (``None``: the probabilities' dtype).

    Returns:
        ``(probs, dropped)``, both of ``logits``' shape: the probabilities in float32 at least (slices along
        ``dim`` sum to 1) and ``probs * keep / (1 - p)`` in ``dtype``.
    """
    if not (drop.training and drop.p > 0):
        probs = torch.softmax(logits, dim=dim, dtype=wide_dtype(logits.dtype))
        return probs, probs if dtype is None else probs.to(dtype)
    last = logits.movedim(dim, -1).contiguous()  # (..., K): the operators take the softmax over the last axis
    keep = keep_mask(last.shape, drop.p, last, drop.salt)
    probs, dropped = softmax_dropout(last, keep, drop.p, dtype)
    return probs.movedim(-1, dim), dropped.movedim(-1, dim)


__all__ = ["SoftmaxDropout", "softmax_dropout", "dropped_softmax"]
