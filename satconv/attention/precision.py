"""The dtypes attention computes in under autocast: logits and softmax at least float32, products in the
autocast dtype.

:func:`autocast_dtype` is the dtype autocast runs matrix products in (``None`` outside autocast),
:func:`wide_dtype` and :func:`wide` name and apply the upcast of half precision to float32, and
:func:`softmax_keys` takes eq. (2)'s softmax over keys in float32 at least, whatever the logits' dtype.
"""
from __future__ import annotations

import torch


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` widened to float32 at least: float16/bfloat16/float32 give float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def wide(p: torch.Tensor) -> torch.Tensor:
    """``p`` in float32, or float64 when it is float64 (weight folds start from at least float32 weights).

    The folds' products themselves (:func:`satconv.attention.base.fold_following`, :mod:`satconv.attention.folded`) run in the
    autocast dtype under autocast: bf16 GEMMs that accumulate in float32, the rounding the unfolded
    weights get in every GEMM anyway.  In float32 they ran on the H200's CUDA cores instead of its tensor
    cores (``sm80_xmma_gemm_f32f32..._ffma``, among the fifteen costliest kernels of a position-only step in
    ``book/bench/h200_kernels.jsonl``) for a product whose size does not grow with the batch.
    """
    return p.to(wide_dtype(p.dtype))


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype on ``x``'s device, or ``None`` (no autocast there, e.g. the meta device)."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def softmax_keys(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys (last axis), in float32 at least (half-precision logits are upcast).

    Args:
        logits: ``(..., N)``.

    Returns:
        ``(..., N)`` probabilities in ``float32`` or ``logits.dtype`` if wider.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.softmax(logits, dim=-1)
