"""Theorem 1 of arXiv 1911.03584, executable: a K x K convolution as multi-head self-attention.

Construction (paper §3, Lemma 1 + Lemma 2 with the quadratic encoding, eq. 9).  A ``K x K`` conv
(PyTorch *cross-correlation*, zero "same" padding ``p = K // 2``)::

    Conv(X)_q = b + sum_{Delta in {-p..p}^2} X_{q + Delta} W_Delta,      W_Delta = weight[:, :, Delta_1 + p, Delta_2 + p].T

is realised by ``K^2`` quadratic-attention heads, head ``h = a * K + c`` centred at the shift
``Delta^(h) = (a - p, c - p)`` (a *key - query* offset, the convention of ``attention_centers``), with
precision ``alpha`` (``spread s = sqrt(2 alpha)``), no value projection (``W_val^(h) = I``) and
``W_out = [W_{Delta^(1)}; ...; W_{Delta^(K^2)}]`` (the concatenation-vs-sum identity, Lemma 1).
Head ``h`` puts probability ``-> 1`` on the key ``k = q + Delta^(h)``; summed over heads this is the
cross-correlation above.  (A *true* convolution ``sum X_{q - Delta} W_Delta`` would need centres
``-Delta^(h)``; since the shift set is symmetric only the head-to-slice pairing changes.  The paper's
bijection ``f(h) = q - k`` and slice ``W_{-f(h)}`` is the same pairing, ``-f(h) = k - q = Delta^(h)``.)

Boundaries: attention's softmax only spans pixels that exist, so the construction is applied to the
input zero-padded by ``p`` and the output cropped by ``p`` (:func:`apply_padded`).  Without padding a
border query whose target ``q + Delta`` is outside the image puts its mass on the nearest in-image
pixel instead of on a zero: an ``O(1)`` error on the ``p``-pixel border (claim 2).

What the theory chapter uses:

* :func:`attention_from_conv`, :func:`apply_padded`: the construction (claim 1).
* :func:`construction_error`: error per ``alpha``, padded or not, split into interior / border (claims 1, 2).
* :func:`expected_error_bound`, :func:`leak_mass`, :func:`rigorous_error_bound`: the ``4 e^{-alpha}``
  estimate and a proven bound.
* :func:`best_fit_error`, :func:`head_count_lower_bound`: fewer than ``K^2`` heads cannot fit (claim 3).
* :func:`per_head_rank_deficiency` (+ ``attention_from_conv(head_dim=...)``): split heads (claim 4).
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import QuadraticAttention
from .attention.positions import relative_offsets


# -- the construction ---------------------------------------------------------------------------------------
def check_conv(conv: nn.Conv2d) -> int:
    """Validate that ``conv`` is a layer the construction covers and return its kernel size ``K``.

    Args:
        conv: an ``nn.Conv2d`` with a square odd kernel, stride 1, dilation 1, groups 1 and zero padding mode
            (its ``padding`` attribute is not used: the construction realises the zero "same" conv,
            ``F.conv2d(x, weight, bias, padding=K // 2)``).

    Raises:
        ValueError: naming the offending attribute.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"conv.kernel_size must be square and odd, got {conv.kernel_size}")
    if tuple(conv.stride) != (1, 1):
        raise ValueError(f"conv.stride must be 1, got {conv.stride} (stride = conv followed by subsampling)")
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(f"conv.dilation must be 1, got {conv.dilation}")
    if conv.groups != 1:
        raise ValueError(f"conv.groups must be 1, got {conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
    return kh


def kernel_shifts(kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The shift grid ``{-p..p}^2``, ``p = kernel_size // 2``, in head order.

    Returns:
        ``(K*K, 2)``; row ``h = a * K + c`` is ``(a - p, c - p)`` = (row, col) offset key - query, i.e. the
        kernel tap ``weight[:, :, a, c]`` of a PyTorch (cross-correlation) conv.
    """
    p = kernel_size // 2
    r = torch.arange(-p, p + 1, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)  # (K*K, 2)


def conv_slices(conv: nn.Conv2d) -> torch.Tensor:
    """Per-shift filters ``W_Delta`` of a conv, in :func:`kernel_shifts` order.

    Returns:
        ``(K*K, C_in, C_out)``; ``[h] = weight[:, :, a, c].T`` for head ``h = a * K + c``.
    """
    k = check_conv(conv)
    w = conv.weight.detach()  # (C_out, C_in, K, K)
    return w.permute(2, 3, 1, 0).reshape(k * k, conv.in_channels, conv.out_channels)  # (K*K, C_in, C_out)


def attention_from_conv(conv: nn.Conv2d, alpha: float, *, head_dim: int | None = None) -> QuadraticAttention:
    """Build the quadratic MHSA layer that computes ``conv`` (Theorem 1; Lemma 1 + eq. 9).

    ``K^2`` isotropic heads, head ``h`` centred at ``Delta^(h)`` (:func:`kernel_shifts`) with
    ``alpha_h = alpha`` (spread ``sqrt(2 alpha)``), dropout 0.  With ``head_dim=None`` (the paper): no value
    projection and ``proj.weight = [W_{Delta^(1)}; ...; W_{Delta^(K^2)}]^T``, ``proj.bias = conv.bias``
    (zeros without bias).  Apply it with :func:`apply_padded`; the error against the conv is
    ``O(e^{-alpha})`` (:func:`expected_error_bound`).

    With ``head_dim = D_h != C_in`` (claim 4, split heads) a value projection exists and the per-head map
    ``W_val^(h) W_out^(h)`` (rank ``<= D_h``) is the best rank-``D_h`` approximation (truncated SVD) of
    ``W_Delta``: exact iff ``D_h >= rank W_Delta`` (generically ``min(C_in, C_out)``).

    Args:
        conv: ``nn.Conv2d(C_in, C_out, K)``, see :func:`check_conv`; weights ``(C_out, C_in, K, K)``.
        alpha: head precision ``alpha > 0`` (finite).
        head_dim: per-head value size ``D_h``; ``None`` (or ``C_in``) = concatenated heads, no value projection.

    Returns:
        ``QuadraticAttention(dim=C_in, num_heads=K*K, out_dim=C_out, isotropic=True)`` in the conv's dtype and
        device, mapping ``(B, H, W, C_in) -> (B, H, W, C_out)``.
    """
    k = check_conv(conv)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    c_in, c_out = conv.in_channels, conv.out_channels
    if head_dim is not None and head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer or None, got {head_dim}")
    split = head_dim is not None and head_dim != c_in
    w = conv.weight
    attn = QuadraticAttention(c_in, k * k, head_dim=head_dim if split else None, out_dim=c_out, dropout=0.0,
                              bias=True, isotropic=True)
    attn = attn.to(device=w.device, dtype=w.dtype)
    slices = conv_slices(conv)  # (K*K, C_in, C_out)
    with torch.no_grad():
        attn.attention_centers.copy_(kernel_shifts(k, dtype=w.dtype, device=w.device))
        attn.attention_spreads.fill_(math.sqrt(2.0 * alpha))  # alpha = s^2 / 2
        if not split:
            attn.proj.weight.copy_(slices.reshape(k * k * c_in, c_out).T)  # (C_out, K*K*C_in), heads stacked
        else:
            u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (K*K, C_in, r), (K*K, r), (K*K, r, C_out)
            r = min(head_dim, s.shape[-1])
            root = s[:, :r].sqrt()  # (K*K, r)
            val = torch.zeros(k * k, head_dim, c_in, dtype=w.dtype, device=w.device)
            val[:, :r] = (u[:, :, :r] * root[:, None, :]).transpose(1, 2)  # W_val^(h)^T: (K*K, r, C_in)
            out = torch.zeros(k * k, head_dim, c_out, dtype=w.dtype, device=w.device)
            out[:, :r] = root[:, :, None] * vh[:, :r]  # W_out^(h): (K*K, r, C_out)
            attn.value.weight.copy_(val.reshape(k * k * head_dim, c_in))  # (H*Dh, C_in)
            attn.value.bias.zero_()
            attn.proj.weight.copy_(out.reshape(k * k * head_dim, c_out).T)  # (C_out, H*Dh)
        attn.proj.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(attn.proj.bias))
    return attn


def apply_padded(attn: nn.Module, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad by ``p = kernel_size // 2``, apply ``attn``, crop ``p`` again: the "same" conv's boundary.

    Args:
        attn: an attention layer ``(B, H+2p, W+2p, C_in) -> (B, H+2p, W+2p, C_out)``.
        x: ``(B, H, W, C_in)`` (NHWC, the attention layout).
        kernel_size: odd ``K``.

    Returns:
        ``(B, H, W, C_out)``.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    p = kernel_size // 2
    _, height, width, _ = x.shape
    out = attn(F.pad(x, (0, 0, p, p, p, p)))  # (B, H+2p, W+2p, C_out)
    return out[:, p:p + height, p:p + width]  # (B, H, W, C_out)


def reference_conv(conv: nn.Conv2d, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """The map the construction realises: ``F.conv2d(x, weight, bias, padding=K // 2)`` in ``dtype``.

    Args:
        x: ``(B, C_in, H, W)``.

    Returns:
        ``(B, C_out, H, W)``.
    """
    k = check_conv(conv)
    dtype = dtype or conv.weight.dtype
    b = None if conv.bias is None else conv.bias.detach().to(dtype)
    return F.conv2d(x.to(dtype), conv.weight.detach().to(dtype), b, padding=k // 2)


# -- error of the construction (claims 1, 2) ---------------------------------------------------------------
def leak_mass(alpha: float) -> float:
    """Probability a head puts off its target on the infinite lattice: ``1 - 1 / theta(alpha)^2``.

    ``theta(alpha) = sum_{n in Z} e^{-alpha n^2}``, so ``theta^2 = sum_{delta in Z^2} e^{-alpha |delta|^2}`` and the
    target's probability is ``1 / theta^2``.  On a finite (padded) grid fewer keys compete, so this is an upper
    bound there.  ``leak_mass(alpha) = 4 e^{-alpha} + O(e^{-2 alpha})``.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    m = int(math.ceil(math.sqrt(60.0 / alpha))) + 1
    rest = 2.0 * sum(math.exp(-alpha * n * n) for n in range(1, m + 1))  # theta - 1
    return (2.0 * rest + rest * rest) / (1.0 + rest) ** 2  # 1 - 1/(1+rest)^2 without cancellation


def expected_error_bound(alpha: float) -> float:
    """The leak estimate ``4 e^{-alpha}``: error of the construction relative to the conv output's scale.

    Derivation: head ``h`` gives the key at ``q + Delta^(h) + e`` the weight ``e^{-alpha |e|^2} / theta^2``.
    The 4 nearest leak sites (``|e|^2 = 1``) each get ``~e^{-alpha}``, the next (``|e|^2 = 2``) only
    ``e^{-2 alpha}``, so the off-target mass is ``4 e^{-alpha} + O(e^{-2 alpha})`` (:func:`leak_mass`).  The error at
    a pixel is ``sum_h sum_{e != 0} p_h(e) (X_{q+Delta+e} - X_{q+Delta}) W_Delta``: the off-target mass times a
    conv of input *differences*, which has the scale of the conv output.  Hence
    ``max |MHSA - Conv| ~ 4 e^{-alpha} * max |Conv|`` (an estimate, not a bound; a proven bound is
    :func:`rigorous_error_bound`).  Floating point: the target probability rounds to 1 once
    ``4 e^{-alpha} < 2^-24`` (float32, alpha >~ 18) or ``2^-53`` (float64, alpha >~ 38); past that the error is the
    arithmetic's rounding (~1e-7 relative in float32).

    Args:
        alpha: head precision.

    Returns:
        ``4 e^{-alpha}`` (a relative error).
    """
    return 4.0 * math.exp(-alpha)


def rigorous_error_bound(conv: nn.Conv2d, x: torch.Tensor, alpha: float) -> float:
    """Proven bound on ``max |apply_padded(attention_from_conv(conv, alpha)) - conv|`` (exact arithmetic).

    ``|err_{q,o}| <= sum_h sum_{k != t_h} p_h(k) |(X_k - X_{t_h}) W_h[:, o]| <= leak * 2 max|X| * max_o sum_{h,c} |W_h[c, o]|``
    with ``leak = leak_mass(alpha)`` (on the padded grid every target ``t_h = q + Delta^(h)`` exists and fewer
    keys compete than on the infinite lattice).  The bias cancels.

    Args:
        conv: the conv (see :func:`check_conv`).
        x: ``(B, C_in, H, W)`` input.
        alpha: head precision.
    """
    w = conv.weight.detach().double()  # (C_out, C_in, K, K)
    col = w.abs().sum(dim=(1, 2, 3)).max().item()  # max_o sum_{h,c} |W_h[c, o]|
    return leak_mass(alpha) * 2.0 * x.detach().double().abs().max().item() * col


def construction_error(conv: nn.Conv2d, x: torch.Tensor, alphas, dtype=torch.float64, padded: bool = True) -> dict:
    """Error of the construction against the zero-padded conv, per ``alpha`` (claims 1 and 2).

    Args:
        conv: the conv (see :func:`check_conv`).
        x: ``(B, C_in, H, W)`` input (NCHW, the conv layout).
        alphas: iterable of head precisions.
        dtype: arithmetic of both the conv reference and the attention.
        padded: apply the attention to the zero-padded input and crop (:func:`apply_padded`); ``False`` applies
            it to ``x`` as is, which leaves the ``K // 2``-pixel border wrong (the softmax has no zeros to attend to).

    Returns:
        dict with ``alpha`` (list), ``scale`` (``max |conv(x)|``, float) and per-alpha lists ``max_abs``,
        ``relative`` (``max_abs / scale``), ``interior_max_abs``, ``border_max_abs`` and their ``*_relative``;
        "border" = pixels within ``K // 2`` of the image edge, "interior" = the others; also ``estimate``
        (:func:`expected_error_bound`, relative) and ``rigorous_bound`` (:func:`rigorous_error_bound`, absolute,
        valid for ``padded=True``).
    """
    k = check_conv(conv)
    p = k // 2
    conv_d = copy.deepcopy(conv).to(dtype)
    x = x.detach().to(dtype=dtype, device=conv_d.weight.device)
    ref = reference_conv(conv_d, x).permute(0, 2, 3, 1)  # (B, H, W, C_out)
    scale = ref.abs().max().item()
    height, width = ref.shape[1:3]
    border = torch.ones(height, width, dtype=torch.bool, device=ref.device)
    border[p:height - p, p:width - p] = False
    keys = ("max_abs", "relative", "interior_max_abs", "interior_relative", "border_max_abs", "border_relative",
            "estimate", "rigorous_bound")
    res = {"alpha": [], "scale": scale, **{name: [] for name in keys}}
    x_nhwc = x.permute(0, 2, 3, 1)  # (B, H, W, C_in)
    for alpha in alphas:
        attn = attention_from_conv(conv_d, float(alpha))
        with torch.no_grad():
            out = apply_padded(attn, x_nhwc, k) if padded else attn(x_nhwc)  # (B, H, W, C_out)
        err = (out - ref).abs().amax(dim=(0, 3))  # (H, W): worst over batch and channels
        inner = err[~border].max().item() if (~border).any() else 0.0
        edge = err[border].max().item() if border.any() else 0.0
        res["alpha"].append(float(alpha))
        res["max_abs"].append(err.max().item())
        res["relative"].append(err.max().item() / scale)
        res["interior_max_abs"].append(inner)
        res["interior_relative"].append(inner / scale)
        res["border_max_abs"].append(edge)
        res["border_relative"].append(edge / scale)
        res["estimate"].append(expected_error_bound(float(alpha)))
        res["rigorous_bound"].append(rigorous_error_bound(conv_d, x, float(alpha)))
    return res


# -- fewer heads (claim 3) ---------------------------------------------------------------------------------
def head_probabilities(height: int, width: int, centers: torch.Tensor, alpha: float = math.inf,
                       dtype=torch.float64) -> torch.Tensor:
    """Quadratic-encoding attention probabilities, computed directly (float64 softmax).

    ``P_h[q, k] = softmax_k(-alpha |k - q - centers_h|^2)``; ``alpha = inf`` is the hard limit: the nearest key(s)
    to ``q + centers_h`` share the mass equally.

    Args:
        height, width: grid size, ``N = height * width`` (row-major).
        centers: ``(n, 2)`` (row, col) key - query offsets.
        alpha: precision, ``> 0`` or ``math.inf``.

    Returns:
        ``(n, N, N)``, rows sum to 1.
    """
    delta = relative_offsets(height, width, dtype=dtype)  # (N, N, 2)
    dist = ((delta[None] - centers.to(dtype)[:, None, None, :]) ** 2).sum(-1)  # (n, N, N)
    if math.isinf(alpha):
        hard = (dist == dist.amin(dim=-1, keepdim=True)).to(dtype)
        return hard / hard.sum(-1, keepdim=True)
    return torch.softmax(-alpha * dist, dim=-1)


def _lstsq_fit(feats: torch.Tensor, target: torch.Tensor, linear_part: torch.Tensor) -> dict:
    """Least squares ``target ~ [feats, 1] beta``; residual relative to ``|| linear_part ||_F``."""
    design = torch.cat([feats, torch.ones_like(feats[:, :1])], dim=1)  # (M, n*C_in + 1)
    beta = torch.linalg.lstsq(design, target, driver="gelsd").solution  # (n*C_in + 1, C_out)
    resid = target - design @ beta  # (M, C_out)
    return {"residual": (resid.norm() / linear_part.norm()).item(), "max_abs": resid.abs().max().item(),
            "relative_max": (resid.abs().max() / target.abs().max()).item()}


def best_fit_error(conv: nn.Conv2d, x: torch.Tensor, num_heads: int, alpha: float = math.inf, *,
                   centers: torch.Tensor | None = None, max_subsets: int = 500) -> dict:
    """Best least-squares fit of ``conv`` by ``num_heads`` quadratic heads with free value/output weights.

    Given the (input-independent) probabilities ``P_h``, MHSA is linear in its weights:
    ``Y ~ sum_h P_h X W^(h) + b`` with ``W^(h) = W_val^(h) W_out^(h)`` (Lemma 1's concat = sum), so the best
    ``W^(h), b`` solve one least-squares problem (computed on the zero-padded input, cropped, float64).
    With ``centers=None`` the centres are chosen among the ``K^2`` kernel shifts: all subsets of size ``num_heads``
    if there are at most ``max_subsets``, otherwise greedy backward elimination.  (Non-grid centres do not help as
    ``alpha -> inf``: a head then attends to its nearest grid shift(s) with a fixed split, still one filter.)
    For ``num_heads < K^2`` the residual stays above :func:`head_count_lower_bound` for every ``alpha`` (claim 3);
    with ``K^2`` heads on the grid it tends to 0.

    Args:
        conv: the conv (see :func:`check_conv`).
        x: ``(B, C_in, H, W)``; use ``B*H*W >> num_heads*C_in`` samples (else the fit overfits the sample).
        num_heads: ``1 <= n <= K^2`` when searching; any ``n`` with explicit ``centers``.
        alpha: head precision (``math.inf`` = hard attention).
        centers: ``(num_heads, 2)`` fixed centres (key - query), or ``None`` to search the grid.

    Returns:
        dict: ``residual`` (``||Y - Y_fit||_F / ||Y - b||_F``, the conv's linear part), ``max_abs``,
        ``relative_max`` (``max_abs / max |Y|``), ``centers`` (``(num_heads, 2)`` used).
    """
    k = check_conv(conv)
    p = k // 2
    x = x.detach().double()
    b, c_in, height, width = x.shape
    y = reference_conv(conv, x, torch.float64).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)  # (M, C_out)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels).double()
    linear_part = y - bias
    xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1).reshape(b, -1, c_in)  # (B, Np, C_in)
    hp, wp = height + 2 * p, width + 2 * p

    def features(cs: torch.Tensor) -> torch.Tensor:
        probs = head_probabilities(hp, wp, cs, alpha)  # (n, Np, Np)
        z = torch.einsum("hqk,bkc->bqhc", probs, xp).reshape(b, hp, wp, -1, c_in)  # (B, Hp, Wp, n, C_in)
        return z[:, p:p + height, p:p + width].reshape(b * height * width, -1)  # (M, n*C_in)

    if centers is not None:
        centers = torch.as_tensor(centers, dtype=torch.float64).reshape(-1, 2)
        if centers.shape[0] != num_heads:
            raise ValueError(f"centers must have num_heads={num_heads} rows, got {centers.shape[0]}")
        return {**_lstsq_fit(features(centers), y, linear_part), "centers": centers}
    if not 1 <= num_heads <= k * k:
        raise ValueError(f"num_heads must be in 1..{k * k} (K^2) when searching the grid, got {num_heads}")
    grid = kernel_shifts(k, dtype=torch.float64)  # (K*K, 2)
    if math.comb(k * k, num_heads) <= max_subsets:
        subsets = [list(s) for s in itertools.combinations(range(k * k), num_heads)]
        fits = [(_lstsq_fit(features(grid[s]), y, linear_part), s) for s in subsets]
        best, chosen = min(fits, key=lambda f: f[0]["residual"])
    else:  # greedy backward elimination from all K^2 shifts
        chosen = list(range(k * k))
        while len(chosen) > num_heads:
            trials = [(_lstsq_fit(features(grid[[j for j in chosen if j != i]]), y, linear_part), i) for i in chosen]
            best, drop = min(trials, key=lambda f: f[0]["residual"])
            chosen.remove(drop)
        best = _lstsq_fit(features(grid[chosen]), y, linear_part)
    return {**best, "centers": grid[chosen]}


def head_count_lower_bound(conv: nn.Conv2d, num_heads: int, height: int | None = None,
                           width: int | None = None) -> float:
    """Lower bound on the relative residual of ANY ``num_heads``-head input-independent attention fit.

    The conv is the linear operator ``sum_Delta S_Delta (x) W_Delta`` (``S_Delta``: shift by ``Delta`` on the padded
    grid, cropped).  An MHSA layer whose probabilities ``P_h`` do not depend on the input is
    ``sum_h P_h (x) W^(h)``: Kronecker rank ``<= num_heads``.  For inputs with i.i.d. unit-variance pixels,
    ``E ||Y - Y_fit||^2`` is the squared Frobenius distance of the operators (restricted to real pixels).  The
    ``S_Delta`` have disjoint supports, with ``n_Delta = (H - |Delta_1|)(W - |Delta_2|)`` ones, so by Eckart-Young
    the distance is at least the tail of the singular values of ``M = [sqrt(n_Delta) vec(W_Delta)]_Delta``
    (``K^2 x C_in C_out``)::

        residual >= sqrt(sum_{i > num_heads} sigma_i(M)^2) / ||M||_F

    independent of ``alpha`` and of the centres.  Generic convs have ``rank M = min(K^2, C_in C_out)``, so the bound
    is > 0 for ``num_heads < K^2 <= C_in C_out``.  (A finite sample of ``M`` pixels lets least squares undercut
    it by about a factor ``sqrt(1 - num_heads C_in / M)``.)

    Args:
        conv: the conv (see :func:`check_conv`).
        num_heads: number of heads.
        height, width: image size (weights ``n_Delta``); ``None`` = an infinite image (equal weights).

    Returns:
        the relative residual bound in ``[0, 1]``.
    """
    k = check_conv(conv)
    slices = conv_slices(conv).double().reshape(k * k, -1)  # (K*K, C_in*C_out)
    if height is not None and width is not None:
        shifts = kernel_shifts(k, dtype=torch.float64).abs()  # (K*K, 2)
        slices = slices * ((height - shifts[:, 0]) * (width - shifts[:, 1])).clamp(min=0).sqrt()[:, None]
    sv = torch.linalg.svdvals(slices)
    return (sv[num_heads:].norm() / sv.norm()).item()


# -- split heads (claim 4) ---------------------------------------------------------------------------------
def per_head_rank_deficiency(conv: nn.Conv2d, head_dim: int) -> dict:
    """What split heads (``D_h = head_dim``) lose: per-head maps ``W_val^(h) W_out^(h)`` have rank ``<= D_h``.

    With one hard head per shift, head ``h`` must realise ``W_{Delta^(h)}`` (``C_in x C_out``, generically of rank
    ``min(C_in, C_out)``).  The shifts are orthogonal, so the best a rank-``D_h`` head can do is the truncated SVD
    of its slice (Eckart-Young); :func:`attention_from_conv` with ``head_dim=D_h`` builds exactly that layer.  The
    usual split ``D_h = D_out / N_h`` is deficient; concatenation (``D_h = C_in``, or any
    ``D_h >= min(C_in, C_out)``) is exact.  (Optimal among "one head per shift" layers; not claimed optimal over
    every head placement.)

    Args:
        conv: the conv (see :func:`check_conv`).
        head_dim: ``D_h``.

    Returns:
        dict: ``slice_ranks`` (list of ``K^2`` ints), ``head_dim``, ``deficient`` (some slice rank > ``D_h``),
        ``relative_error`` (``sqrt(sum_Delta sum_{i > D_h} sigma_i(W_Delta)^2) / ||W||_F``: the expected relative
        residual ``||MHSA - Conv|| / ||Conv - b||`` for i.i.d. inputs on a large image, as ``alpha -> inf``).
    """
    slices = conv_slices(conv).double()  # (K*K, C_in, C_out)
    sv = torch.linalg.svdvals(slices)  # (K*K, r)
    ranks = torch.linalg.matrix_rank(slices).tolist()
    return {"slice_ranks": ranks, "head_dim": head_dim, "deficient": max(ranks) > head_dim,
            "relative_error": (sv[:, head_dim:].norm() / sv.norm()).item()}
