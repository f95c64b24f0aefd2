"""Triton kernels for the folded attention's softmax and dropout: one for the forward pass, one for the
backward pass.

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
``torch.compile`` calls it as it is inside compiled graphs. The folded attention uses it where
:func:`satconv.attention.routes.fused_runs` allows: the layer's ``routes.fused_backward`` (``train.fused_backward``,
on by default), a CUDA tensor in one of :data:`FLOATS`, and Triton importable. The PyTorch expressions it replaces stay the reference
(``tests/test_fused.py``); on a CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests pin it without a GPU.

:func:`softmax_dropout_forward` does the forward part in one pass as well: it adds the per-axis relative
terms to the content scores, masks padded keys, takes the softmax, applies the keep mask and writes the
probabilities, the dropped probabilities, the packed mask and their row sums, where inductor's fused softmax
and :func:`~satconv.attention.folded.pack_mask` made two kernels.  It runs likewise under the layer's
``routes.fused_forward`` (``train.fused_forward``); the A/B rows are ``book/bench/h200_fused.jsonl``.

Both kernels take a block of rows per program; :data:`LAUNCH` holds the rows per program and warps that
measured fastest for the row lengths the models use (``python -m satconv bench --fused-launch`` times them
all again on the current GPU).
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

def available() -> bool:
    """``True`` when Triton is importable (the kernel can be built)."""
    return triton is not None


#: dtypes the kernels take
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


#: ``(rows per program, warps)`` for each kernel at row block sizes that the models use (256: the learned +
#: content model's 16 x 16 keys; 512: ViT's 264 padded keys), the fastest in a sweep on an H200
#: (``book/bench/h200_fused_launch.jsonl``, from :func:`satconv.bench.fused_launch.fused_launch_sweep`)
LAUNCH = {("backward", 256): (8, 4), ("backward", 512): (1, 2),
          ("forward", 256): (8, 2), ("forward", 512): (1, 1)}


def row_block(n: int) -> int:
    """The kernels' row block for rows of ``n`` entries: the power of two ``>= n``, at least 8 (one packed
    mask byte)."""
    return max(8, triton.next_power_of_2(n))


def launch_shape(kernel: str, block: int) -> tuple[int, int]:
    """``(rows per program, warps)`` for ``kernel`` (``"forward"`` or ``"backward"``) at a power-of-two row
    block: :data:`LAUNCH` where it was measured, otherwise about 1024 entries per program on 4 warps."""
    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel must be 'forward' or 'backward', got {kernel!r}")
    return LAUNCH.get((kernel, block), (max(1, min(16, 1024 // block)), 4))


def launch_table() -> str:
    """:data:`LAUNCH` as one line for bench rows: ``"backward/256=8x4, ..."`` (kernel/row block = rows per
    program x warps), sorted."""
    return ", ".join(f"{kernel}/{block}={rows}x{warps}" for (kernel, block), (rows, warps) in sorted(LAUNCH.items()))


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
        if HAS_KEEP:  # each row's packed bytes are read once and spread to their 8 entries in registers
            byte_col = tl.arange(0, BLOCK // 8)[None, :]
            byte = tl.load(packed_ptr + row.to(tl.int64) * n_packed + byte_col,
                           mask=(row < rows) & (byte_col < n_packed), other=0).to(tl.int32)  # (ROWS, BLOCK // 8)
            bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # bit j of byte i: entry 8i + j
            keep = tl.reshape(bits, (ROWS, BLOCK)).to(tl.float32) * scale
            g = g * keep
            dropped = prob * keep
        else:
            dropped = prob
        d_logits = prob * (g - tl.sum(g * prob, axis=1)[:, None])
        tl.store(dl_ptr + offset, d_logits.to(dl_ptr.dtype.element_ty), mask=inside)
        tl.store(dropped_ptr + offset, dropped.to(dropped_ptr.dtype.element_ty), mask=inside)

    def _launch(g, probs, packed, g_rowsum, scale, d_logits, dropped, launch=None):
        n = probs.shape[-1]
        rows = probs.numel() // n
        block = row_block(n)
        per_program, warps = launch or launch_shape("backward", block)
        _backward_kernel[(triton.cdiv(rows, per_program),)](
            g, probs, packed if packed is not None else probs,  # unused pointers: any tensor
            g_rowsum if g_rowsum is not None else probs, d_logits, dropped, rows, n,
            packed.shape[-1] if packed is not None else 0, scale,
            HAS_KEEP=packed is not None, HAS_GROW=g_rowsum is not None, ROWS=per_program, BLOCK=block,
            num_warps=warps)

    @torch.library.custom_op("satconv::softmax_dropout_backward", mutates_args=())
    def _softmax_dropout_backward(g: torch.Tensor, probs: torch.Tensor, packed: torch.Tensor | None,
                                  g_rowsum: torch.Tensor | None, scale: float, logits_dtype: torch.dtype,
                                  dropped_dtype: torch.dtype, launch: list[int] | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        g, probs = g.contiguous(), probs.contiguous()
        packed = None if packed is None else packed.contiguous()
        g_rowsum = None if g_rowsum is None else g_rowsum.contiguous()
        d_logits = torch.empty(probs.shape, dtype=logits_dtype, device=probs.device)
        dropped = torch.empty(probs.shape, dtype=dropped_dtype, device=probs.device)
        with torch.cuda.device(probs.device) if probs.is_cuda else contextlib.nullcontext():
            _launch(g, probs, packed, g_rowsum, scale, d_logits, dropped, launch)
        return d_logits, dropped

    @_softmax_dropout_backward.register_fake
    def _(g, probs, packed, g_rowsum, scale, logits_dtype, dropped_dtype, launch=None):
        return (torch.empty(probs.shape, dtype=logits_dtype, device=probs.device),
                torch.empty(probs.shape, dtype=dropped_dtype, device=probs.device))


if triton is not None:
    @triton.jit
    def _forward_kernel(s_ptr, row_ptr, col_ptr, keep_ptr, probs_ptr, dropped_ptr, packed_ptr, rowsum_ptr,
                        rows, n, n_valid, n_packed, height, width, scale,
                        HAS_REL: tl.constexpr, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        col = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        inside = (row < rows) & (col < n)
        valid = inside & (col < n_valid)
        offset = row.to(tl.int64) * n + col
        x = tl.load(s_ptr + offset, mask=valid, other=float("-inf")).to(tl.float32)
        if HAS_REL:  # key (r_k, c_k) = (col // width, col % width) reads its row and column terms
            x += tl.load(row_ptr + row.to(tl.int64) * height + col // width, mask=valid, other=0.0).to(tl.float32)
            x += tl.load(col_ptr + row.to(tl.int64) * width + col % width, mask=valid, other=0.0).to(tl.float32)
        e = tl.where(valid, tl.exp(x - tl.max(x, axis=1)[:, None]), 0.0)
        prob = (e / tl.sum(e, axis=1)[:, None]).to(probs_ptr.dtype.element_ty)  # rounded as saved
        tl.store(probs_ptr + offset, prob, mask=inside)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + offset, mask=inside, other=0).to(tl.int32)
            dropped = prob.to(tl.float32) * (keep.to(tl.float32) * scale)
            bits = tl.reshape(keep << (col % 8), (ROWS, BLOCK // 8, 8))
            byte = tl.sum(bits, axis=2).to(tl.uint8)  # (ROWS, BLOCK // 8): bit j of byte i is entry 8i + j
            byte_col = tl.arange(0, BLOCK // 8)[None, :]
            tl.store(packed_ptr + row.to(tl.int64) * n_packed + byte_col, byte,
                     mask=(row < rows) & (byte_col < n_packed))
        else:
            dropped = prob.to(tl.float32)
        tl.store(dropped_ptr + offset, dropped.to(dropped_ptr.dtype.element_ty), mask=inside)
        tl.store(rowsum_ptr + row, tl.sum(dropped, axis=1)[:, None], mask=row < rows)

    @torch.library.custom_op("satconv::softmax_dropout_forward", mutates_args=())
    def _softmax_dropout_forward(scores: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None,
                                 n_valid: int, keep: torch.Tensor | None, scale: float, probs_dtype: torch.dtype,
                                 dropped_dtype: torch.dtype, launch: list[int] | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = scores.contiguous()
        n = scores.shape[-1]
        rows = scores.numel() // n
        height, width = (row.shape[-1], col.shape[-1]) if row is not None else (1, 1)
        probs = torch.empty(scores.shape, dtype=probs_dtype, device=scores.device)
        dropped = torch.empty(scores.shape, dtype=dropped_dtype, device=scores.device)
        n_packed = (n + 7) // 8 if keep is not None else 0
        packed = torch.empty((*scores.shape[:-1], n_packed), dtype=torch.uint8, device=scores.device)
        rowsum = torch.empty(scores.shape[:-1], dtype=torch.float32, device=scores.device)
        block = row_block(n)
        per_program, warps = launch or launch_shape("forward", block)
        rel = (row.contiguous(), col.contiguous()) if row is not None else (scores, scores)  # unused: any tensor
        with torch.cuda.device(scores.device) if scores.is_cuda else contextlib.nullcontext():
            _forward_kernel[(triton.cdiv(rows, per_program),)](
                scores, *rel, keep.contiguous().view(torch.uint8) if keep is not None else scores, probs, dropped,
                packed, rowsum, rows, n, n_valid, n_packed, height, width, scale,
                HAS_REL=row is not None, HAS_KEEP=keep is not None, ROWS=per_program, BLOCK=block, num_warps=warps)
        return probs, dropped, packed, rowsum

    @_softmax_dropout_forward.register_fake
    def _(scores, row, col, n_valid, keep, scale, probs_dtype, dropped_dtype, launch=None):
        n = scores.shape[-1]
        n_packed = (n + 7) // 8 if keep is not None else 0
        return (torch.empty(scores.shape, dtype=probs_dtype, device=scores.device),
                torch.empty(scores.shape, dtype=dropped_dtype, device=scores.device),
                torch.empty((*scores.shape[:-1], n_packed), dtype=torch.uint8, device=scores.device),
                torch.empty(scores.shape[:-1], dtype=torch.float32, device=scores.device))


def softmax_dropout_forward(scores: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None,
                            n_valid: int, keep: torch.Tensor | None, p: float, probs_dtype: torch.dtype,
                            dropped_dtype: torch.dtype, *, launch: tuple[int, int] | None = None):
    """The forward softmax and dropout of :class:`~satconv.attention.folded.SoftmaxDropoutMix`, fused.

    Args:
        scores: ``(B, R, Nk)`` logits (content part).
        row, col: ``(B, R, Hk)`` and ``(B, R, Wk)`` relative terms added to key ``(r_k, c_k)``
            (``Nk = Hk * Wk``, keys row-major), or both ``None``.
        n_valid: keys ``>= n_valid`` are padding: probability 0.
        keep: ``(B, R, Nk)`` bool keep mask (:func:`satconv.dropout.keep_mask`), or ``None``.
        p: the drop probability (survivors scaled by ``1 / (1 - p)``).
        probs_dtype, dropped_dtype: dtypes of the saved probabilities and of the dropped ones.
        launch: ``(rows per program, warps)`` for this call; ``None``: :func:`launch_shape`'s choice
            (``python -m satconv bench --fused-launch`` times every pair through this argument).

    Returns:
        ``(probs, dropped, packed, rowsum)``: ``(B, R, Nk)`` softmax in ``probs_dtype`` (computed in float32),
        ``(B, R, Nk)`` ``probs * keep / (1 - p)``, ``(B, R, ceil(Nk / 8))`` uint8 packed mask
        (:func:`~satconv.attention.folded.pack_mask`'s layout; ``None`` without ``keep``) and ``(B, R)``
        float32 row sums of ``dropped``.
    """
    if triton is None:
        raise RuntimeError("softmax_dropout_forward needs Triton, which is not importable here")
    if (row is None) != (col is None):
        raise ValueError("row and col relative terms go together")
    probs, dropped, packed, rowsum = torch.ops.satconv.softmax_dropout_forward(
        scores, row, col, int(n_valid), keep, 1.0 / (1.0 - p), probs_dtype, dropped_dtype,
        None if launch is None else [int(v) for v in launch])
    return probs, dropped, (packed if keep is not None else None), rowsum


def softmax_dropout_backward(g: torch.Tensor, probs: torch.Tensor, packed: torch.Tensor | None,
                             g_rowsum: torch.Tensor | None, p: float, logits_dtype: torch.dtype,
                             dropped_dtype: torch.dtype, *, launch: tuple[int, int] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
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
        launch: ``(rows per program, warps)`` for this call; ``None``: :func:`launch_shape`'s choice.

    Returns:
        ``(d_logits, dropped)``, both ``(B, R, Nk)``: ``p * (d - sum(d * p))`` with
        ``d = (g + g_rowsum) * k / (1 - p)``, computed in float32, and ``P~ = p * k / (1 - p)``.
    """
    if triton is None:
        raise RuntimeError("softmax_dropout_backward needs Triton, which is not importable here")
    return torch.ops.satconv.softmax_dropout_backward(g, probs, packed, g_rowsum, 1.0 / (1.0 - p),
                                                      logits_dtype, dropped_dtype,
                                                      None if launch is None else [int(v) for v in launch])


__all__ = ["LAUNCH", "FLOATS", "row_block", "launch_shape", "launch_table", "available", "softmax_dropout_backward",
           "softmax_dropout_forward"]
