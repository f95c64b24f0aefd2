"""One Triton kernel for the backward pass of the folded attention's softmax and dropout.

:class:`satconv.attention.folded.SoftmaxDropoutMix` computes ``P~ = dropout(softmax(A))`` (eq. (2)'s
softmax over keys, with the attention dropout) and ``P~ X``.  Its backward pass needs, per row of
``N_key`` scores (``p`` the saved probabilities, ``k`` the saved keep mask, ``s = 1 / (1 - p_drop)``,
``g`` the gradient reaching ``P~``: ``dL/d(P~X) X^T``, plus ``dL/d rowsum`` when the value bias folds)::

    dL/dP  = g * k * s
    dL/dA  = p * (dL/dP - sum_keys(dL/dP * p))          (the softmax's backward)
    P~     = p * k * s                                  (for the values' gradient, P~^T dL/d(P~X))

Compiled by inductor, these became three kernels on an H200 that each read the ``(B, N * heads, N_key)``
operands again (the unpacked mask, the float32 widening and the row sum recomputed in each): in
``book/bench/h200_kernels.jsonl`` they take several times what their bytes would at the H200's memory
bandwidth (an estimate from the tensor sizes, not a measurement of this kernel).
:func:`softmax_dropout_backward` does it in one pass: it reads ``g``, ``p`` and the bit-packed mask once and
writes ``dL/dA`` and ``P~``.

It is a custom operator (``satconv::softmax_dropout_backward``, with a fake implementation for tracing), so
``torch.compile`` calls it as it is inside compiled graphs. :func:`enabled` says whether the folded
attention uses it: on CUDA tensors when Triton is importable, unless turned off with
:func:`use_fused_backward`. The PyTorch expressions it replaces stay the reference
(``tests/test_fused.py``); on a CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests pin it without a GPU.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

_ENABLED = [True]


def available() -> bool:
    """``True`` when Triton is importable (the kernel can be built)."""
    return triton is not None


@contextlib.contextmanager
def use_fused_backward(on: bool = True):
    """Context manager: within the block the folded attention does (``on=True``) or does not use the
    fused backward kernel; outside, :func:`enabled` decides as before."""
    old = _ENABLED[0]
    _ENABLED[0] = bool(on)
    try:
        yield
    finally:
        _ENABLED[0] = old


def on_device(device) -> bool:
    """Whether the fused backward runs on ``device`` (a ``torch.device`` or its name): Triton is importable,
    the device is a CUDA one, and :func:`use_fused_backward` has not turned it off."""
    return _ENABLED[0] and available() and torch.device(device).type == "cuda"


def enabled(t: torch.Tensor) -> bool:
    """Whether the folded attention's backward pass on tensor ``t`` runs :func:`softmax_dropout_backward`:
    :func:`on_device` for ``t``'s device, and ``t`` in bf16, fp16 or float32."""
    return on_device(t.device) and t.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:
    @triton.jit
    def _backward_kernel(g_ptr, p_ptr, packed_ptr, grow_ptr, dl_ptr, dropped_ptr, rows, n, n_packed, scale,
                         HAS_KEEP: tl.constexpr, HAS_GROW: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        col = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        inside = (row < rows) & (col < n)
        offset = row.to(tl.int64) * n + col
        g = tl.load(g_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        prob = tl.load(p_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        if HAS_GROW:
            g += tl.load(grow_ptr + row, mask=row < rows, other=0.0).to(tl.float32)
        if HAS_KEEP:
            byte = tl.load(packed_ptr + row.to(tl.int64) * n_packed + col // 8, mask=inside, other=0)
            keep = ((byte.to(tl.int32) >> (col % 8)) & 1).to(tl.float32) * scale
            g = g * keep
            dropped = prob * keep
        else:
            dropped = prob
        d_logits = prob * (g - tl.sum(g * prob, axis=1)[:, None])
        tl.store(dl_ptr + offset, d_logits.to(dl_ptr.dtype.element_ty), mask=inside)
        tl.store(dropped_ptr + offset, dropped.to(dropped_ptr.dtype.element_ty), mask=inside)

    def _launch(g, probs, packed, g_rowsum, scale, d_logits, dropped):
        n = probs.shape[-1]
        rows = probs.numel() // n
        block = triton.next_power_of_2(n)
        per_program = max(1, min(16, 2048 // block))  # rows per program: about 2048 entries
        grid = (triton.cdiv(rows, per_program),)
        _backward_kernel[grid](g, probs, packed if packed is not None else probs,  # unused pointers: any tensor
                               g_rowsum if g_rowsum is not None else probs, d_logits, dropped, rows, n,
                               packed.shape[-1] if packed is not None else 0, scale,
                               HAS_KEEP=packed is not None, HAS_GROW=g_rowsum is not None, ROWS=per_program,
                               BLOCK=block, num_warps=4)

    @torch.library.custom_op("satconv::softmax_dropout_backward", mutates_args=())
    def _softmax_dropout_backward(g: torch.Tensor, probs: torch.Tensor, packed: torch.Tensor | None,
                                  g_rowsum: torch.Tensor | None, scale: float, logits_dtype: torch.dtype,
                                  dropped_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g, probs = g.contiguous(), probs.contiguous()
        packed = None if packed is None else packed.contiguous()
        g_rowsum = None if g_rowsum is None else g_rowsum.contiguous()
        d_logits = torch.empty(probs.shape, dtype=logits_dtype, device=probs.device)
        dropped = torch.empty(probs.shape, dtype=dropped_dtype, device=probs.device)
        with torch.cuda.device(probs.device) if probs.is_cuda else contextlib.nullcontext():
            _launch(g, probs, packed, g_rowsum, scale, d_logits, dropped)
        return d_logits, dropped

    @_softmax_dropout_backward.register_fake
    def _(g, probs, packed, g_rowsum, scale, logits_dtype, dropped_dtype):
        return (torch.empty(probs.shape, dtype=logits_dtype, device=probs.device),
                torch.empty(probs.shape, dtype=dropped_dtype, device=probs.device))


def softmax_dropout_backward(g: torch.Tensor, probs: torch.Tensor, packed: torch.Tensor | None,
                             g_rowsum: torch.Tensor | None, p: float, logits_dtype: torch.dtype,
                             dropped_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax-and-dropout backward of :class:`~satconv.attention.folded.SoftmaxDropoutMix`, fused.

    Args:
        g: ``(B, R, Nk)`` gradient reaching the dropped probabilities (``dL/d(P~X) X^T``), any float dtype.
        probs: ``(B, R, Nk)`` saved probabilities ``p``.
        packed: ``(B, R, ceil(Nk / 8))`` uint8 keep mask (:func:`~satconv.attention.folded.pack_mask`),
            or ``None`` without dropout.
        g_rowsum: ``(B, R)`` gradient of ``rowsum(P~)``, or ``None``.
        p: the drop probability (survivors were scaled by ``1 / (1 - p)``).
        logits_dtype: dtype of the returned logits' gradient.
        dropped_dtype: dtype of the returned dropped probabilities.

    Returns:
        ``(d_logits, dropped)``, both ``(B, R, Nk)``: ``p * (d - sum(d * p))`` with
        ``d = (g + g_rowsum) * k / (1 - p)``, computed in float32, and ``P~ = p * k / (1 - p)``.
    """
    if triton is None:
        raise RuntimeError("softmax_dropout_backward needs Triton, which is not importable here")
    return torch.ops.satconv.softmax_dropout_backward(g, probs, packed, g_rowsum, 1.0 / (1.0 - p),
                                                      logits_dtype, dropped_dtype)


__all__ = ["available", "on_device", "enabled", "use_fused_backward", "softmax_dropout_backward"]
