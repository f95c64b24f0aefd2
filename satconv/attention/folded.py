"""Folded dense attention: eq. (2) of arXiv 1911.03584 with the weight products multiplied out.

For concatenated heads (``head_dim >= dim``, the paper's choice) the per-head query and key
projections are only ever used through their product (the paper's Lemma 1 writes the content
term as ``X_q^T W_qry^T W_key X_k``).  With ``q_h = x Q_h^T + a_h`` and ``k_h = y K_h^T + b_h``::

    q_h . k_h = x (Q_h^T K_h) y^T  +  a_h K_h y^T  +  [x Q_h^T b_h^T + a_h . b_h]

The bracket does not depend on the key, so it cancels in the softmax over keys and is dropped.
Per step the fold computes ``M_h = Q_h^T K_h`` (``D x D``, cheap: it does not scale with the batch)
and ``c_h = a_h K_h``; per image one ``dim -> heads*dim`` GEMM gives ``x M_h + c_h``, which then
meets the raw key input ``y``.  This removes the key projection: about a fifth of the content
model's FLOPs.  The ``q . r`` tables of the learned relative encoding fold the same way
(``q_h[:Dk/2] . e_row = x Q_h[:Dk/2]^T e_row^T + a_h[:Dk/2] e_row^T``), and their logits are built
per axis (:func:`relative_query_terms`) and broadcast-added to the content logits.

With a value projection ``v_h = x V_h^T + v0_h`` followed by ``W_out`` (the [Re]'s ViT), the two
fold into one ``heads*dim -> out_dim`` map applied to ``softmax(A_h) x``::

    sum_h P_h v_h W_out,h^T = sum_h (P_h x)(V_h^T W_out,h^T) + rowsum(P_h) (v0_h W_out,h^T)

(``rowsum(P_h)`` is 1 without dropout and is kept because dropout changes it).

Scores and probabilities are laid out ``(B, N_query, heads, N_key)`` so that queries for all heads
form one ``(N * heads, dim)`` matrix per image and ``P @ x`` lands directly in the
``(B, N, heads*dim)`` layout that ``W_out`` reads: no head transposes.  Softmax, dropout and ``P~ x``
form one autograd function (:class:`SoftmaxDropoutMix`) that saves the probabilities in the autocast
dtype and the dropout mask bit-packed, and recomputes the dropped probabilities in the backward pass.

The ``"sdpa"`` route (:attr:`satconv.attention.routes.Routes.dense`, :func:`sdpa_forward`)
hands the same folded queries, raw keys and values to ``F.scaled_dot_product_attention`` as one
head of ``N * heads`` queries, so fused kernels compute ``softmax(A) x`` without storing the
logits or probabilities.  The ``q . r`` term enters as extra query/key features: query ``(r_q, c_q)``
of head ``h`` carries its row logits for every key row and its column logits for every key column,
and each key carries the one-hot codes of its row and column, so their dot product adds exactly
``row[r_k] + col[c_k]``.  ``rowsum(P_h)`` rides along as a column of ones in the values.

``tests/test_fast_paths.py`` pins every route to the explicit one
(``Routes(fast=False)``, :func:`satconv.attention.routes.using_routes`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import keep_mask
from . import fused
from .base import fold_following
from .positions import axis_offset_index
from .precision import autocast_dtype, softmax_keys, wide
from .routes import fused_runs


def fold_query_key(query: nn.Linear, key: nn.Linear, num_heads: int, scale: float):
    """Folded query weights: ``x -> (x M_h + c_h) * scale`` for every head.

    Args:
        query, key: ``Linear(D_in -> heads * Dk)`` and ``Linear(D_key -> heads * Dk)``.
        num_heads: ``heads``.
        scale: multiplies the logits (``1 / sqrt(Dk)``).

    Returns:
        ``(weight, bias)`` for ``F.linear``: ``(heads * D_key, D_in)`` and ``(heads * D_key,)`` or ``None``.
        Row ``h * D_key + e`` of the output is ``(x M_h + c_h)[e]``.
    """
    qw = wide(query.weight).view(num_heads, -1, query.in_features) * scale  # (H, Dk, D_in), scaled first
    kw = wide(key.weight).view(num_heads, -1, key.in_features)  # (H, Dk, D_key)
    weight = torch.einsum("hkd,hke->hed", qw, kw).reshape(-1, query.in_features)  # (H*D_key, D_in)
    bias = None
    if query.bias is not None:
        qb = wide(query.bias).view(num_heads, -1) * scale  # (H, Dk)
        bias = torch.einsum("hk,hke->he", qb, kw).reshape(-1)  # (H*D_key,)
    return weight, bias


def fold_query_tables(query: nn.Linear, row: torch.Tensor, col: torch.Tensor, num_heads: int, scale: float):
    """Folded ``q . r`` tables: ``x -> [q_h[:Dk/2] . e_row[t], q_h[Dk/2:] . e_col[t]] * scale``.

    Args:
        query: ``Linear(D_in -> heads * Dk)``.
        row, col: ``(T, Dk/2)`` embedding tables, ``T = 2 * max_position - 1``.
        num_heads: ``heads``.
        scale: multiplies the logits.

    Returns:
        ``(weight, bias)`` for ``F.linear``: ``(heads * 2T, D_in)``, ``(heads * 2T,)`` or ``None``; the output
        reads ``(..., heads, 2T)`` with the row table in ``[:T]`` and the column table in ``[T:]``.
    """
    qw = wide(query.weight).view(num_heads, -1, query.in_features) * scale  # (H, Dk, D_in), scaled first
    half = qw.shape[1] // 2
    tables = torch.cat([wide(row), wide(col)], dim=0)  # (2T, Dk/2)
    t = row.shape[0]
    weight = torch.cat([torch.einsum("hkd,tk->htd", qw[:, :half], tables[:t]),
                        torch.einsum("hkd,tk->htd", qw[:, half:], tables[t:])], dim=1)  # (H, 2T, D_in)
    weight = weight.reshape(-1, query.in_features)
    bias = None
    if query.bias is not None:
        qb = wide(query.bias).view(num_heads, -1) * scale  # (H, Dk)
        bias = torch.cat([qb[:, :half] @ tables[:t].t(), qb[:, half:] @ tables[t:].t()], dim=1).reshape(-1)
    return weight, bias


def fold_value_out(value: nn.Linear, out_weight: torch.Tensor, num_heads: int):
    """``W_val`` and ``W_out`` multiplied out per head.

    Args:
        value: ``Linear(D -> heads * Dk)``.
        out_weight: ``W_out``, ``(D_out, heads * Dk)`` (or ``W_out`` folded with a following layer,
            :func:`~satconv.attention.base.fold_following`).

    Returns:
        ``(weight, head_bias)``: ``(D_out, heads * D)`` for ``F.linear`` on ``concat_h(P_h x)``, and
        ``(heads, D_out)`` (``v0_h W_out,h^T``) or ``None``, to be weighted by ``rowsum(P_h)``.
    """
    d_out = out_weight.shape[0]
    vw = wide(value.weight).view(num_heads, -1, value.in_features)  # (H, Dk, D)
    ow = wide(out_weight).view(d_out, num_heads, -1)  # (D_out, H, Dk)
    weight = torch.einsum("hkd,ehk->ehd", vw, ow).reshape(d_out, -1)  # (D_out, H*D)
    head_bias = None
    if value.bias is not None:
        head_bias = torch.einsum("hk,ehk->he", wide(value.bias).view(num_heads, -1), ow)  # (H, D_out)
    return weight, head_bias


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Eight booleans per byte along the last axis.

    Args:
        keep: ``(..., n)`` bool.

    Returns:
        ``(..., ceil(n / 8))`` uint8; bit ``j`` of byte ``i`` is ``keep[..., 8 * i + j]`` (zero padding).
    """
    n = keep.shape[-1]
    k = keep.to(torch.uint8)
    if n % 8:
        k = F.pad(k, (0, 8 - n % 8))
    bits = torch.arange(8, device=keep.device, dtype=torch.uint8)
    return (k.view(*k.shape[:-1], -1, 8) << bits).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``(..., ceil(n / 8))`` uint8 -> ``(..., n)`` bool."""
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> bits) & 1).view(*packed.shape[:-1], -1)[..., :n].bool()


def relative_and_padding(logits: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None,
                         n_valid: int | None) -> torch.Tensor:
    """Logits with per-axis relative terms added and padded keys masked.

    Args:
        logits: ``(..., Nk)`` scores, keys row-major on an ``Hk x Wk`` grid when there are relative terms.
        row, col: ``(*lead, Hk)`` and ``(*lead, Wk)``, where ``lead`` splits ``logits``' leading axes
            (``(B, H, W, heads)`` for ``(B, N, heads, Nk)``); key ``(r_k, c_k)`` gets ``row[..., r_k] +
            col[..., c_k]``.  Both ``None``: no relative terms.
        n_valid: keys ``>= n_valid`` get ``-inf`` (probability 0); ``None``: no padding.

    Returns:
        Logits of ``logits``' shape.
    """
    if row is not None:
        logits = (logits.view(*row.shape, col.shape[-1]) + row[..., :, None] + col[..., None, :]).view(logits.shape)
    nk = logits.shape[-1]
    if n_valid is not None and n_valid < nk:
        logits = logits.masked_fill(torch.arange(nk, device=logits.device) >= n_valid, float("-inf"))
    return logits


class SoftmaxDropoutMix(torch.autograd.Function):
    """``P~ = dropout(softmax(A))`` and ``P~ V`` (with ``rowsum(P~)``), saving little for the backward pass.

    ``forward(logits: (B, R, Nk), values: (B, Nk, D), p, dtype, salt=0, row=None, col=None, n_valid=None,
    fused_forward=False, fused_backward=False) -> (mixed: (B, R, D), rowsum: (B, R))``; ``row: (B, R, Hk)`` and
    ``col: (B, R, Wk)`` are relative terms added to key ``(r_k, c_k)`` (``Nk = Hk * Wk``) and keys ``>= n_valid``
    are padding, both applied here so that the fused forward kernel reads them.  ``fused_forward`` /
    ``fused_backward``: the layer's :attr:`~satconv.attention.routes.Routes.fused_forward` / ``fused_backward``
    (the kernels run where :func:`~satconv.attention.routes.fused_runs` allows).
    The softmax is taken in float32 (float64 inputs stay float64) and the probabilities are saved in
    ``dtype`` (the autocast dtype: halving the largest saved tensor); the dropout mask
    (:func:`satconv.dropout.keep_mask`, anchored on ``values``, ``salt`` the call site's number: keeps
    with probability ``1 - p``, survivors scaled by ``1 / (1 - p)``, ``nn.Dropout``'s law) is saved
    packed eight to a byte (:func:`pack_mask`).  The dropped probabilities, needed by the backward GEMM,
    are recomputed from the two instead of being stored: per layer of the content model that keeps a
    ``(B, N, heads, N)`` tensor and a byte-per-entry mask out of memory.  The backward pass
    applies ``p * (g - sum(g * p))`` in float32 from the saved probabilities (the rounding the forward
    output already carries); on CUDA its element-wise part is one Triton kernel
    (:mod:`satconv.attention.fused`), elsewhere these PyTorch expressions.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, values: torch.Tensor, p: float, dtype: torch.dtype, salt: int = 0,
                row: torch.Tensor | None = None, col: torch.Tensor | None = None, n_valid: int | None = None,
                fused_forward: bool = False, fused_backward: bool = False):
        nk = logits.shape[-1]
        n_valid = nk if n_valid is None else n_valid
        keep = keep_mask(logits.shape, p, values, salt) if p > 0 else None  # (B, R, Nk) bool, anchored on values
        if fused_runs(fused_forward, logits):  # one Triton kernel: relative terms, padding, softmax, dropout, packing
            probs, dropped, packed, rowsum = fused.softmax_dropout_forward(logits, row, col, n_valid, keep, p,
                                                                           dtype, values.dtype)
        else:
            full = relative_and_padding(logits, row, col, n_valid)
            probs = torch.softmax(wide(full), dim=-1).to(dtype)  # (B, R, Nk)
            packed = None
            if keep is not None:
                dropped = probs * keep * (1.0 / (1.0 - p))
                packed = pack_mask(keep)
            else:
                dropped = probs
            rowsum = dropped.sum(-1, dtype=torch.float32 if dtype != torch.float64 else dtype)  # (B, R)
        mixed = torch.bmm(dropped.to(values.dtype), values)  # (B, R, D)
        ctx.save_for_backward(probs, packed, values)
        ctx.p, ctx.n, ctx.logits_dtype, ctx.fused_backward = p, nk, logits.dtype, fused_backward
        ctx.rel = None if row is None else (row.shape[-1], col.shape[-1], row.dtype, col.dtype)
        ctx.set_materialize_grads(False)  # an unused output (rowsum without a value bias) gets None, not zeros
        return mixed, rowsum

    @staticmethod
    def backward(ctx, g_mixed: torch.Tensor | None, g_rowsum: torch.Tensor | None):
        probs, packed, values = ctx.saved_tensors
        g = None if g_mixed is None else torch.bmm(g_mixed, values.to(g_mixed.dtype).transpose(1, 2))  # (B, R, Nk)
        if g is not None and fused_runs(ctx.fused_backward, probs):  # one Triton kernel for the element-wise part
            d_logits, dropped = fused.softmax_dropout_backward(g, probs, packed, g_rowsum, ctx.p,
                                                               ctx.logits_dtype, g_mixed.dtype)
            relative = SoftmaxDropoutMix._relative_grads(ctx, d_logits)
        else:
            keep = None if packed is None else unpack_mask(packed, ctx.n)  # (B, R, Nk)
            scale = 1.0 / (1.0 - ctx.p)
            if g is not None:
                d_dropped = wide(g)
                dropped = probs if keep is None else probs * keep * scale
            else:
                d_dropped = torch.zeros(probs.shape, device=probs.device, dtype=wide(probs).dtype)
            if g_rowsum is not None:
                d_dropped = d_dropped + g_rowsum[..., None]
            d_probs = d_dropped if keep is None else d_dropped * keep * scale
            pw = wide(probs)
            d_logits = pw * (d_probs - (d_probs * pw).sum(-1, keepdim=True))
            relative = SoftmaxDropoutMix._relative_grads(ctx, d_logits)  # from the float32 gradient
            d_logits = d_logits.to(ctx.logits_dtype)
        d_values = (None if g is None
                    else torch.bmm(dropped.to(g_mixed.dtype).transpose(1, 2), g_mixed).to(values.dtype))  # (B, Nk, D)
        return (d_logits, d_values, None, None, None) + relative + (None, None)  # + the two fused flags

    @staticmethod
    def _relative_grads(ctx, d_logits: torch.Tensor) -> tuple:
        """Gradients of ``row``, ``col`` and ``n_valid`` from the logits' ``(B, R, Nk)``: the sums over key
        columns and key rows (``(None, None, None)`` without relative terms); padded keys have zero gradient."""
        if ctx.rel is None:
            return None, None, None
        hk, wk, row_dtype, col_dtype = ctx.rel
        grid = d_logits.view(*d_logits.shape[:2], hk, wk)  # (B, R, Hk, Wk)
        acc = torch.float64 if d_logits.dtype == torch.float64 else torch.float32
        return grid.sum(-1, dtype=acc).to(row_dtype), grid.sum(-2, dtype=acc).to(col_dtype), None


#: key counts are padded to a multiple of this (masked keys) so that the score rows stay 16-byte aligned
KEY_ALIGN = 8


def _folded_queries(module, x: torch.Tensor, key_source: torch.Tensor | None):
    """``(tokens (B, N, D), keys (B, N, D_key), folded queries (B, N, heads * D_key))`` of ``x: (B, H, W, D)``."""
    b, height, width, d = x.shape
    tokens = x.reshape(b, height * width, d)
    keys = tokens if key_source is None else key_source.reshape(b, height * width, -1)
    weight, bias = fold_query_key(module.query, module.key, module.num_heads, 1.0 / math.sqrt(module.head_dim))
    folded_q = F.linear(tokens, weight.to(tokens.dtype), None if bias is None else bias.to(tokens.dtype))
    return tokens, keys, folded_q


def folded_forward(module, x: torch.Tensor, key_source: torch.Tensor | None = None, relative=None,
                   return_attention: bool = False, then: nn.Linear | None = None):
    """Dense multi-head attention of ``module`` by the folded route (same function as the explicit one).

    Args:
        module: an :class:`~satconv.attention.base.AttentionBase` with ``query`` and ``key`` linears,
            ``head_dim >= dim``, optional ``value`` linear, ``proj``, ``attn_drop``.
        x: ``(B, H, W, D)`` tokens (queries and values).
        key_source: ``(B, H, W, D)`` keys' input, or ``None`` (= ``x``).
        relative: ``None`` or a callable ``(tokens (B, N, D), height, width) -> (row, col)`` giving the
            per-axis logits ``row: (B, H, W, heads, H)`` (query pixel, head, key row) and
            ``col: (B, H, W, heads, W)`` (key column) that are broadcast-added to the content logits
            (the ``q . r`` term, :func:`relative_query_terms`).
        return_attention: also return the probabilities ``(B, heads, N, N)`` in float32.
        then: a ``Linear(out_dim -> E)`` applied to the output, folded into ``W_out``
            (:func:`~satconv.attention.base.fold_following`), or ``None``.

    Returns:
        ``(B, H, W, out_dim)`` (``E`` with ``then``), or ``(out, probs)``.

    Under the ``"sdpa"`` route (``module.routes.dense``, :class:`~satconv.attention.routes.Routes`) and without
    ``return_attention`` this is :func:`sdpa_forward`.  When ``N`` is not a multiple of
    :data:`KEY_ALIGN` (ViT's class token: 257) and there is no relative term, keys and values are
    padded with zero rows whose logits are ``-inf``: their probabilities are exactly 0, and the score
    rows stay aligned for the tensor-core kernels.
    """
    if module.routes.dense == "sdpa" and not return_attention:
        return sdpa_forward(module, x, key_source, relative, then)
    b, height, width, d = x.shape
    n, heads = height * width, module.num_heads
    tokens, keys, folded_q = _folded_queries(module, x, key_source)
    values = tokens
    pad = (-n) % KEY_ALIGN if relative is None else 0
    if pad:
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(tokens, (0, 0, 0, pad))  # (B, N + pad, .)
    nk = n + pad
    logits = torch.bmm(folded_q.view(b, n * heads, -1), keys.transpose(1, 2)).view(b, n, heads, nk)  # (B, N, H, Nk)
    row = col = None
    if relative is not None:
        row, col = relative(tokens, height, width)  # (B, H, W, heads, H), (B, H, W, heads, W)
    low = autocast_dtype(x)
    if return_attention:  # exact probabilities: float32 (at least), dropout by the module
        logits = relative_and_padding(logits, row, col, n if pad else None)  # (B, N, H, Nk)
        probs = softmax_keys(logits)  # (B, N, H, Nk)
        probs = probs if low is not None else probs.to(x.dtype)
        dropped = module.attn_drop(probs)
        mixed = torch.bmm(dropped.view(b, n * heads, nk).to(values.dtype), values)
        rowsum = dropped.sum(-1)  # (B, N, H)
    else:
        p = module.attn_drop.p if module.training else 0.0
        rel = (None, None) if row is None else (row.reshape(b, n * heads, height), col.reshape(b, n * heads, width))
        # the Function adds the relative terms and masks the padding (in the fused kernel on CUDA)
        mixed, rowsum = SoftmaxDropoutMix.apply(logits.view(b, n * heads, nk), values, p,
                                                low if low is not None else x.dtype, module.attn_drop.salt, *rel,
                                                n if pad else None, module.routes.fused_forward,
                                                module.routes.fused_backward)
    mixed = mixed.view(b, n, -1)  # (B, N, H*D): concat_h(P_h x)
    out_weight, out_bias = fold_following(module.proj, then)  # (D_out, H*Dk), (D_out,): W_out (then ``then``)
    if module.value is None:
        out = F.linear(mixed, out_weight, out_bias)  # (B, N, out_dim)
    else:
        vo_weight, head_bias = fold_value_out(module.value, out_weight, heads)
        out = F.linear(mixed, vo_weight.to(mixed.dtype), out_bias)  # (B, N, out_dim)
        if head_bias is not None:  # rowsum(P_h) v0_h W_out,h
            out = out + rowsum.reshape(b, n, heads).to(out.dtype) @ head_bias.to(out.dtype)
    out = out.reshape(b, height, width, -1)
    if return_attention:
        return out, probs[..., :n].permute(0, 2, 1, 3)  # (B, H, N, N)
    return out


def window_codes(size: int, max_position: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """One-hot rows that pick each (query, key) pair's entry of a relative table along one axis.

    Args:
        size: grid side along the axis (at most ``max_position``).
        max_position: ``M``; the table has ``2M - 1`` entries (offsets ``-(M-1) .. M-1``).

    Returns:
        ``(size * size, 2M - 1)``: row ``q * size + k`` is 1 at ``k - q + M - 1``
        (:func:`~satconv.attention.positions.axis_offset_index`), 0 elsewhere.
    """
    idx = axis_offset_index(size, max_position, device).reshape(-1, 1)  # (size*size, 1)
    return (idx == torch.arange(2 * max_position - 1, device=device)).to(dtype)


def relative_query_terms(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                         height: int, width: int, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded ``q . r`` logits per axis, straight from the tokens.

    The row term of query ``(r_q, c_q)`` and key ``(r_k, c_k)`` is ``x_q . W_row[h, r_k - r_q + M - 1]``
    (plus bias): for a fixed query row it reads a contiguous window of ``height`` rows of the folded
    table weights.  So the queries are grouped by row (columns: by column) and each group meets its
    own window in one batched GEMM, ``(height, B*width, D) @ (height, D, heads*height)``: no
    ``(B, N, heads, 2M-1)`` table, no gather on activations, and half the FLOPs of projecting onto
    every offset.

    Args:
        tokens: ``(B, N, D)``, ``N = height * width`` row-major.
        weight, bias: :func:`fold_query_tables` output, ``(heads * 2T, D)`` and ``(heads * 2T,)`` or ``None``,
            ``T = 2 * max_position - 1``.
        num_heads: ``heads``.
        height, width: grid, each at most ``max_position``.
        max_position: ``M``.

    Returns:
        ``(row, col)``: ``(B, height, width, heads, height)`` and ``(B, height, width, heads, width)``.
    """
    b, n, d = tokens.shape
    m, t = max_position, 2 * max_position - 1
    w_all = weight.view(num_heads, 2 * t, d).to(tokens.dtype)
    b_all = None if bias is None else bias.view(num_heads, 2 * t).to(tokens.dtype)
    x = tokens.view(b, height, width, d)

    def axis(half: slice, size: int, grouped: torch.Tensor) -> torch.Tensor:
        # the windows as a product with a constant one-hot matrix rather than an indexed gather: the same
        # values, and in the backward pass a GEMM instead of an accumulating scatter (index_put)
        codes = window_codes(size, m, tokens.device, w_all.dtype)  # (size_q * size_k, T)
        win = torch.matmul(codes, w_all[:, half])  # (heads, q*k, D)
        win = win.view(num_heads, size, size, d).permute(1, 0, 2, 3).reshape(size, num_heads * size, d)  # (q, H*k, D)
        if b_all is None:
            return torch.bmm(grouped, win.transpose(1, 2))  # (q, B*other, heads*k)
        win_b = (b_all[:, half] @ codes.t()).view(num_heads, size, size)  # (heads, q, k)
        win_b = win_b.permute(1, 0, 2).reshape(size, 1, num_heads * size)  # (q, 1, heads*k)
        return torch.baddbmm(win_b, grouped, win.transpose(1, 2))

    by_row = x.permute(1, 0, 2, 3).reshape(height, b * width, d)  # (r_q, B*c_q, D)
    row = axis(slice(0, t), height, by_row).view(height, b, width, num_heads, height).permute(1, 0, 2, 3, 4)
    by_col = x.permute(2, 0, 1, 3).reshape(width, b * height, d)  # (c_q, B*r_q, D)
    col = axis(slice(t, 2 * t), width, by_col).view(width, b, height, num_heads, width).permute(1, 2, 0, 3, 4)
    return row, col


#: feature counts handed to ``scaled_dot_product_attention`` are padded to a multiple of this with
#: zero features (the fused CUDA kernels need 16-byte aligned rows)
SDPA_ALIGN = 8


def _pad_features(t: torch.Tensor, align: int = SDPA_ALIGN) -> torch.Tensor:
    """``t`` with zero features appended to the last axis up to a multiple of ``align``."""
    pad = (-t.shape[-1]) % align
    return F.pad(t, (0, pad)) if pad else t


def key_axis_codes(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """One-hot codes of every key's row and column.

    Args:
        height, width: grid; keys are flattened row-major.

    Returns:
        ``(N, height + width)``: ``[k, r_k] = 1`` and ``[k, height + c_k] = 1``, zeros elsewhere.
    """
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (N,): r_k
    cols = torch.arange(width, device=device).repeat(height)  # (N,): c_k
    return torch.cat([F.one_hot(rows, height), F.one_hot(cols, width)], dim=1).to(dtype)  # (N, height + width)


def sdpa_forward(module, x: torch.Tensor, key_source: torch.Tensor | None = None, relative=None,
                 then: nn.Linear | None = None) -> torch.Tensor:
    """:func:`folded_forward` through ``F.scaled_dot_product_attention`` (the ``"sdpa"`` route).

    The heads share their keys (raw ``y``) and values (raw ``x``), so the layer is one attention of
    ``N * heads`` queries over ``N`` keys:

    - queries ``(x M_h + c_h) * scale``, followed, with a relative term, by the head's row logits
      ``row[q, h, :]`` and column logits ``col[q, h, :]`` (``(N * heads, D_key + height + width)``);
    - keys ``y``, followed by :func:`key_axis_codes` (``(N, D_key + height + width)``);
    - values ``x``, followed by a column of ones when the value projection has a bias;
    - the softmax scale is 1 (the fold already holds ``1 / sqrt(Dk)``).

    Features are zero-padded to a multiple of :data:`SDPA_ALIGN`.  The output ``concat_h(P_h [x, 1])``
    meets ``W_out`` (or the folded ``W_val W_out`` with the ``v0_h W_out,h`` column per head) in one
    GEMM.  Dropout (the module's ``attn_drop.p`` in training) is drawn by the attention kernel.

    Args:
        module, x, key_source, relative, then: as for :func:`folded_forward`.

    Returns:
        ``(B, H, W, out_dim)`` (``E`` with ``then``).
    """
    b, height, width, d = x.shape
    n, heads = height * width, module.num_heads
    tokens, keys, q = _folded_queries(module, x, key_source)
    q = q.view(b, n, heads, -1)  # (B, N, H, D_key)
    k = keys  # (B, N, D_key)
    if relative is not None:
        row, col = relative(tokens, height, width)  # (B, H, W, heads, H), (B, H, W, heads, W)
        q = torch.cat([q, row.reshape(b, n, heads, height).to(q.dtype),
                       col.reshape(b, n, heads, width).to(q.dtype)], dim=-1)  # (B, N, H, D_key + H + W)
        codes = key_axis_codes(height, width, x.device, k.dtype)  # (N, height + width)
        k = torch.cat([k, codes.expand(b, n, -1)], dim=-1)  # (B, N, D_key + H + W)
    q, k = _pad_features(q), _pad_features(k)
    out_weight, out_bias = fold_following(module.proj, then)  # W_out (then ``then``)
    if module.value is None:
        out_w, head_bias = out_weight.view(out_weight.shape[0], heads, d), None  # (D_out, H, D)
    else:
        vo_weight, head_bias = fold_value_out(module.value, out_weight, heads)
        out_w = vo_weight.view(-1, heads, d)  # (D_out, H, D)
    v = tokens
    if head_bias is not None:
        v = torch.cat([tokens, tokens.new_ones(b, n, 1)], dim=-1)  # (B, N, D + 1): the ones give rowsum(P_h)
        out_w = torch.cat([out_w, head_bias.t()[:, :, None].to(out_w.dtype)], dim=-1)  # (D_out, H, D + 1)
    v, out_w = _pad_features(v), _pad_features(out_w)
    p = module.attn_drop.p if module.training else 0.0
    mixed = F.scaled_dot_product_attention(q.reshape(b, 1, n * heads, -1), k[:, None], v[:, None],
                                           dropout_p=p, scale=1.0)  # (B, 1, N*H, Dv): rows (query, head)
    mixed = mixed.reshape(b, n, -1)  # (B, N, H*Dv): concat_h(P_h [x, 1])
    out = F.linear(mixed, out_w.reshape(out_w.shape[0], -1).to(mixed.dtype),
                   None if out_bias is None else out_bias.to(mixed.dtype))
    return out.reshape(b, height, width, -1)  # (B, H, W, out_dim)
