"""Independent reference implementations for the attention tests.

Everything here is written from the paper's formulas over explicit (query, key) pairs with
``delta = key - query`` (pixels flattened row-major, ``n = row * width + col``), taking raw parameter
tensors: no function or method of :mod:`satconv` is called.  Heads are split by explicit channel
slices ``h*Dh:(h+1)*Dh``.  Results are float64.
"""
from __future__ import annotations

import math

import torch


def pixels(height: int, width: int) -> list[tuple[int, int]]:
    """``(row, col)`` of each pixel in row-major order (index ``n = row * width + col``)."""
    return [(r, c) for r in range(height) for c in range(width)]


def pairs(height: int, width: int):
    """Yield ``(q, k, d1, d2)`` for every query/key pixel pair, ``(d1, d2) = key - query``."""
    pix = pixels(height, width)
    for q, (rq, cq) in enumerate(pix):
        for k, (rk, ck) in enumerate(pix):
            yield q, k, rk - rq, ck - cq


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, D)`` -> ``(B, N, D)`` by explicit row-major pixel enumeration."""
    return torch.stack([x[:, r, c] for r, c in pixels(x.shape[1], x.shape[2])], dim=1).double()


def unflatten(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, H, W, D)``, inverse of :func:`flatten`."""
    out = t.new_zeros(t.shape[0], height, width, t.shape[2])
    for n, (r, c) in enumerate(pixels(height, width)):
        out[:, r, c] = t[:, n]
    return out


def heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, N, H*Dh)`` -> ``(B, H, N, Dh)`` by channel slices ``h*Dh:(h+1)*Dh``."""
    dh = t.shape[-1] // num_heads
    return torch.stack([t[..., h * dh:(h + 1) * dh] for h in range(num_heads)], dim=1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` in float64."""
    out = torch.einsum("...i,oi->...o", x.double(), weight.double())
    return out if bias is None else out + bias.double()


def ref_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, ``exp(l - max) / sum``, float64."""
    z = logits.double() - logits.double().amax(-1, keepdim=True)
    e = z.exp()
    return e / e.sum(-1, keepdim=True)


def ref_quadratic_logits(centers: torch.Tensor, spreads: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gaussian logits ``-1/2 (delta - mu)^T Sigma^{-1} (delta - mu)``, paper eq. (9).

    Args:
        centers: ``(H, 2)`` ``mu`` per head.
        spreads: ``(H,)`` isotropic ``s`` (``Sigma^{-1} = s^2 I``, ``alpha = s^2/2``) or ``(H, 2, 2)``
            ``S = Sigma^{-1/2}`` (``Sigma^{-1} = S^T S``).

    Returns:
        ``(H, N, N)`` float64.
    """
    mu = centers.detach().double().tolist()
    s = spreads.detach().double()
    nh = len(mu)
    inv = []
    for h in range(nh):
        if s.dim() == 1:
            inv.append([[s[h].item() ** 2, 0.0], [0.0, s[h].item() ** 2]])
        else:
            sh = s[h].tolist()
            inv.append([[sum(sh[k][i] * sh[k][j] for k in range(2)) for j in range(2)] for i in range(2)])
    n = height * width
    out = torch.zeros(nh, n, n, dtype=torch.float64)
    for q, k, d1, d2 in pairs(height, width):
        for h in range(nh):
            e = (d1 - mu[h][0], d2 - mu[h][1])
            out[h, q, k] = -0.5 * sum(e[i] * inv[h][i][j] * e[j] for i in range(2) for j in range(2))
    return out


def ref_learned_logits(variant: str, x: torch.Tensor | None, params: dict, height: int, width: int,
                       max_position: int, num_heads: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
    """Learned 2-D relative logits (epfml/attention-cnn ``Learned2DRelativeSelfAttention``).

    Args:
        variant: ``position_only`` | ``query_position`` | ``content_query_position``.
        x: ``(B, N, D)`` flattened input (unused for position_only).
        params: ``e_row``, ``e_col`` ``(2M-1, P)``; position_only: ``w_row``, ``w_col`` ``(H, P)``,
            ``b_row``, ``b_col`` ``(H,)``; otherwise ``wq`` ``(H*Dk, D)``, ``bq``; content: ``wk``, ``bk``.
        key_source: ``(B, N, D)`` input of the keys (content only), ``None`` = ``x``.

    Returns:
        ``(1, H, N, N)`` (position_only) or ``(B, H, N, N)`` float64.
    """
    p = {k: v.detach().double() for k, v in params.items()}
    n = height * width
    off = max_position - 1
    if variant == "position_only":
        out = torch.zeros(1, num_heads, n, n, dtype=torch.float64)
        for q, k, d1, d2 in pairs(height, width):
            out[0, :, q, k] = (p["w_row"] @ p["e_row"][d1 + off] + p["b_row"]
                               + p["w_col"] @ p["e_col"][d2 + off] + p["b_col"])
        return out
    qh = heads(linear(x, p["wq"], p["bq"]), num_heads)  # (B, H, N, Dk)
    dk = qh.shape[-1]
    half = dk // 2
    if variant == "content_query_position":
        kh = heads(linear(x if key_source is None else key_source, p["wk"], p["bk"]), num_heads)
    out = torch.zeros(x.shape[0], num_heads, n, n, dtype=torch.float64)
    for q, k, d1, d2 in pairs(height, width):
        s = (qh[:, :, q, :half] * p["e_row"][d1 + off]).sum(-1) + (qh[:, :, q, half:] * p["e_col"][d2 + off]).sum(-1)
        if variant == "content_query_position":
            s = s + (qh[:, :, q] * kh[:, :, k]).sum(-1)
        out[:, :, q, k] = s / math.sqrt(dk)
    return out


def ref_content_logits(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                       bk: torch.Tensor | None, num_heads: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
    """Dot-product logits ``q_h(x_q) . k_h(x_k) / sqrt(Dh)`` for every pair.

    Args:
        x: ``(B, N, D)``; ``wq``, ``wk``: ``(H*Dh, D)``; ``bq``, ``bk``: ``(H*Dh,)`` or ``None``.
        key_source: ``(B, N, D)`` input of the keys, ``None`` = ``x``.

    Returns:
        ``(B, H, N, N)`` float64.
    """
    qh = heads(linear(x, wq, bq), num_heads)
    kh = heads(linear(x if key_source is None else key_source, wk, bk), num_heads)
    return torch.einsum("bhqd,bhkd->bhqk", qh, kh) / math.sqrt(qh.shape[-1])


def ref_mhsa(probs: torch.Tensor, x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
             num_heads: int, value_weight: torch.Tensor | None = None,
             value_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head output ``concat_h[P_h V_h] W_out^T + b_out`` (paper eq. (2)).

    Args:
        probs: ``(B or 1, H, N, N)`` attention weights.
        x: ``(B, N, D)``.
        proj_weight: ``(D_out, H*Dh)``; proj_bias ``(D_out,)`` or ``None``.
        value_weight: ``(H*Dh, D)`` or ``None`` (every head reads the raw ``x``, ``Dh = D``).

    Returns:
        ``(B, N, D_out)`` float64.
    """
    x = x.double()
    p = probs.double().expand(x.shape[0], -1, -1, -1)
    if value_weight is None:
        v = [x] * num_heads
    else:
        vh = heads(linear(x, value_weight, value_bias), num_heads)
        v = [vh[:, h] for h in range(num_heads)]
    per_head = [torch.einsum("bqk,bkd->bqd", p[:, h], v[h]) for h in range(num_heads)]
    return linear(torch.cat(per_head, dim=-1), proj_weight, proj_bias)


# -- glue for the tests: read a module's parameters, never call its methods ------------------------
def ref_output(module, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`ref_mhsa` with the value/projection parameters of an attention ``module``.

    Args:
        module: an attention layer (``proj``, optional ``value``, ``num_heads`` are read).
        probs: ``(B or 1, H, N, N)``; x: ``(B, height, width, D)``.

    Returns:
        ``(B, height, width, D_out)`` float64.
    """
    value = getattr(module, "value", None)
    out = ref_mhsa(probs, flatten(x), module.proj.weight, module.proj.bias, module.num_heads,
                   None if value is None else value.weight, None if value is None else value.bias)
    return unflatten(out, x.shape[1], x.shape[2])


def assert_gradients_reach(module, analytically_zero: tuple[str, ...] = (), zero_atol: float = 1e-10) -> None:
    """After a backward pass: every parameter has a gradient, non-zero somewhere.

    ``analytically_zero`` names parameters whose gradient is exactly zero in exact arithmetic
    (a logit term constant along the keys cancels in the softmax); those must be below
    ``zero_atol`` instead (the rounding of the softmax's precision), or have no gradient at all
    (the folded fast path drops those terms, :mod:`satconv.attention.folded`).
    """
    for name, p in module.named_parameters():
        if name in analytically_zero:
            assert p.grad is None or p.grad.abs().max() < zero_atol, \
                f"{name}: expected a zero gradient (softmax shift invariance)"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


#: float64 reference vs vectorised module: only summation order differs
ATOL = 1e-10


def assert_close(actual, expected, atol=ATOL):
    """Same shape, max abs difference <= atol (plain check: torch.testing imports torch.distributed, ~5 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"max abs difference {err:.3g} > {atol:.3g}"


def apply_linear(x, layer):
    """``layer(x)`` written out: ``x W^T + b``, in ``x``'s dtype."""
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)
