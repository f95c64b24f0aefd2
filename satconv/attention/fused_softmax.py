"""A fused softmax + dropout over attention rows, in Triton, for the folded dense route on CUDA.

``softmax_keys`` followed by ``nn.Dropout`` on a ``(B, N, heads, N_k)`` score tensor is three passes
(and, compiled, an inductor reduction that runs one row per program: 0.4 to 0.7 ms a layer on an
H200 for the paper's content model and the [Re]'s ViT).  :func:`attention_softmax` is one pass:
each program loads a block of rows, adds the per-axis relative logits (the ``q . r`` term,
``row[r, k // W] + col[r, k % W]``), masks padded keys, takes the float32 softmax, stores the
probabilities (kept for the backward pass) and the dropped-out probabilities (bf16 or the logits'
dtype).  The dropout mask is not stored: the backward kernel regenerates it from the seed.

It is a ``torch.library`` custom op with an autograd formula, so it runs eagerly, under
``torch.compile`` and inside CUDA graphs (the seed is a device tensor drawn every call).  On the CPU,
and whenever Triton is missing, :func:`reference_attention_softmax` computes the same function with
torch operations (with torch's own dropout stream).  ``tests/test_fused_softmax.py`` pins the kernel
to that reference in Triton's interpreter on the CPU; the CUDA tests in ``tests/test_fast_paths.py``
pin the whole model.
"""
import os
from typing import Optional

import torch

try:  # Triton ships with CUDA builds of torch; without it the reference route runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: elements per program (rows x padded keys); the split is a function of the row length alone,
#: because the dropout stream is keyed by the program id and the backward pass regenerates it
BLOCK_ELEMENTS = 4096


def triton_available() -> bool:
    """``True`` when the Triton kernels can be launched (Triton importable)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _softmax_fwd(logits_ptr, row_ptr, col_ptr, probs_ptr, out_ptr, seed_ptr, n_rows, n_cols, n_valid,
                     width, height, p_drop, scale_kept,
                     HAS_REL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        rmask = rows < n_rows
        cmask = cols < n_cols
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        s = tl.load(logits_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_REL:
            r_off = rows[:, None].to(tl.int64)
            s += tl.load(row_ptr + r_off * height + (cols // width)[None, :], mask=m2, other=0.0).to(tl.float32)
            s += tl.load(col_ptr + r_off * width + (cols % width)[None, :], mask=m2, other=0.0).to(tl.float32)
        keep = m2 & (cols < n_valid)[None, :]
        s = tl.where(keep, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        s_max = tl.where(rmask, s_max, 0.0)
        e = tl.exp(s - s_max[:, None])
        e = tl.where(keep, e, 0.0)
        denom = tl.sum(e, axis=1)
        denom = tl.where(denom > 0, denom, 1.0)
        prob = e / denom[:, None]
        tl.store(probs_ptr + offs, prob.to(probs_ptr.dtype.element_ty), mask=m2)
        if DROPOUT:
            seed = tl.load(seed_ptr)
            local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + cols[None, :]
            kept = tl.rand(seed + pid, local) >= p_drop
            prob = tl.where(kept, prob * scale_kept, 0.0)
            tl.store(out_ptr + offs, prob.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _softmax_bwd(grad_ptr, probs_ptr, dlogits_ptr, seed_ptr, n_rows, n_cols, p_drop, scale_kept,
                     DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        m2 = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        g = tl.load(grad_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        prob = tl.load(probs_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if DROPOUT:
            seed = tl.load(seed_ptr)
            local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + cols[None, :]
            kept = tl.rand(seed + pid, local) >= p_drop
            g = tl.where(kept, g * scale_kept, 0.0)
        dot = tl.sum(g * prob, axis=1)
        ds = prob * (g - dot[:, None])
        tl.store(dlogits_ptr + offs, ds.to(dlogits_ptr.dtype.element_ty), mask=m2)


def _blocks(n_cols: int) -> dict:
    """Launch constants for rows of ``n_cols`` keys (the same for the forward and backward kernels)."""
    block_n = max(16, triton.next_power_of_2(n_cols))
    return dict(BLOCK_M=max(1, min(16, BLOCK_ELEMENTS // block_n)), BLOCK_N=block_n, num_warps=4)


@torch.library.custom_op("satconv::attention_softmax", mutates_args=())
def _attention_softmax_op(logits: torch.Tensor, row: Optional[torch.Tensor], col: Optional[torch.Tensor],
                          seed: torch.Tensor, n_valid: int, width: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropped, probs)``; with ``p == 0`` the probabilities are ``dropped`` and ``probs`` is empty."""
    n_rows, n_cols = logits.shape
    probs = torch.empty_like(logits)
    out = torch.empty_like(logits) if p > 0 else probs
    has_rel = row is not None
    blocks = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, blocks["BLOCK_M"]),)
    _softmax_fwd[grid](logits, row if has_rel else logits, col if has_rel else logits, probs, out, seed,
                       n_rows, n_cols, n_valid, max(width, 1), row.shape[1] if has_rel else 1, p,
                       1.0 / (1.0 - p), HAS_REL=has_rel, DROPOUT=p > 0, **blocks)
    return (out, probs) if p > 0 else (out, logits.new_empty(0))


@_attention_softmax_op.register_fake
def _(logits, row, col, seed, n_valid, width, p):
    return torch.empty_like(logits), (torch.empty_like(logits) if p > 0 else logits.new_empty(0))


@torch.library.custom_op("satconv::attention_softmax_backward", mutates_args=())
def _attention_softmax_backward_op(grad: torch.Tensor, probs: torch.Tensor, seed: torch.Tensor,
                                   p: float) -> torch.Tensor:
    grad = grad.contiguous()
    dlogits = torch.empty_like(probs)
    n_rows, n_cols = probs.shape
    blocks = _blocks(n_cols)
    _softmax_bwd[(triton.cdiv(n_rows, blocks["BLOCK_M"]),)](grad, probs, dlogits, seed, n_rows, n_cols, p,
                                                            1.0 / (1.0 - p), DROPOUT=p > 0, **blocks)
    return dlogits


@_attention_softmax_backward_op.register_fake
def _(grad, probs, seed, p):
    return torch.empty_like(probs)


def _setup_context(ctx, inputs, output):
    logits, row, col, seed, n_valid, width, p = inputs
    ctx.save_for_backward(output[1] if p > 0 else output[0], seed)  # the probabilities before dropout
    ctx.p, ctx.width = p, width
    ctx.has_rel = row is not None
    ctx.rel_shapes = (row.shape[1], col.shape[1]) if row is not None else None


def _backward(ctx, grad_out, grad_probs):
    probs, seed = ctx.saved_tensors
    dlogits = _attention_softmax_backward_op(grad_out, probs, seed, ctx.p)
    drow = dcol = None
    if ctx.has_rel:
        height, width = ctx.rel_shapes
        grid = dlogits.view(-1, height, width).float()  # (R, key row, key column)
        drow, dcol = grid.sum(-1).to(dlogits.dtype), grid.sum(-2).to(dlogits.dtype)
    return dlogits, drow, dcol, None, None, None, None


_attention_softmax_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention_softmax(logits: torch.Tensor, row: Optional[torch.Tensor], col: Optional[torch.Tensor],
                                n_valid: int, p: float, width: int) -> torch.Tensor:
    """The same function with torch operations (float32 softmax, ``torch.nn.functional.dropout``).

    Args and returns as :func:`attention_softmax`.
    """
    s = logits.float()
    if row is not None:
        n_rows, n_cols = s.shape
        s = (s.view(n_rows, row.shape[1], width) + row.float()[:, :, None] + col.float()[:, None, :]).view(n_rows, n_cols)
    if n_valid < s.shape[1]:
        s = s.masked_fill(torch.arange(s.shape[1], device=s.device) >= n_valid, float("-inf"))
    probs = torch.softmax(s, dim=-1)
    return torch.nn.functional.dropout(probs, p, training=p > 0).to(logits.dtype)


def attention_softmax(logits: torch.Tensor, row: Optional[torch.Tensor] = None, col: Optional[torch.Tensor] = None,
                      n_valid: Optional[int] = None, p: float = 0.0, width: int = 1) -> torch.Tensor:
    """``dropout(softmax(logits + row[:, k // width] + col[:, k % width]), p)`` over rows, masking keys ``>= n_valid``.

    Args:
        logits: ``(R, N_k)`` contiguous, one row per (image, query, head).
        row, col: ``None`` or ``(R, N_k / width)`` and ``(R, width)`` per-axis logits (key row, key
            column; keys row-major on a grid ``width`` wide).  Both or neither.
        n_valid: keys ``>= n_valid`` get probability 0 (padding); ``None`` = all.
        p: dropout probability (0: none).  The mask is drawn from a fresh device seed every call.
        width: grid width for ``row``/``col``.

    Returns:
        ``(R, N_k)`` in ``logits.dtype``: the dropped-out probabilities (softmax in float32).  The
        gradient flows to ``logits``, ``row`` and ``col``.  Triton on CUDA, torch operations elsewhere.
    """
    if (row is None) != (col is None):
        raise ValueError("row and col go together")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n_valid = logits.shape[1] if n_valid is None else n_valid
    if triton is None or (logits.device.type != "cuda" and not _interpreting()):
        return reference_attention_softmax(logits, row, col, n_valid, p, width)
    seed = torch.randint(0, 2 ** 30, (1,), device=logits.device, dtype=torch.int64)
    rel = (row.contiguous(), col.contiguous()) if row is not None else (None, None)
    out, _ = _attention_softmax_op(logits.contiguous(), rel[0], rel[1], seed, n_valid, width, float(p))
    return out


def _interpreting() -> bool:
    """``True`` under Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
