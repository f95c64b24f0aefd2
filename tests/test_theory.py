"""Theorem 1 made executable (satconv.theory), checked against nn.Conv2d / F.conv2d as the reference.

Every error below is measured against PyTorch's own convolution of the same weights (an independent
implementation of ``sum_Delta X_{q+Delta} W_Delta``), never against satconv code.  Images are non-square so a
row/column mix-up cannot cancel out.
"""
import math

import pytest
import torch
from torch import nn

from satconv.attention import QuadraticAttention
from satconv.theory import (apply_padded, attention_from_conv, best_fit_error, construction_error,
                            expected_error_bound, head_count_lower_bound, leak_mass, per_head_rank_deficiency,
                            rigorous_error_bound)

#: spec: float32 at alpha = 25; leak 4e^-25 ~ 6e-11 is far below float32 rounding (~1e-7 relative), 1e-4 is the spec
TOL_F32_ALPHA25 = 1e-4
#: spec: float64 at alpha = 45; leak 4e^-45 ~ 1e-19 rounds away, what is left is float64 rounding (~1e-15)
TOL_F64_ALPHA45 = 1e-9
#: error / (4 e^-alpha * scale) must lie in [1/FACTOR, FACTOR]: the estimate ignores the input's local contrast
ESTIMATE_FACTOR = 3.0
#: without padding the border is wrong by O(1) of the output scale; measured 0.3-0.8, so 0.1 is a clear margin
BORDER_MIN_RELATIVE = 0.1
#: a fit by fewer than K^2 heads misses whole conv slices; measured ~0.27 (8 of 9 heads), 0.15 is a clear margin
FEWER_HEADS_MIN_RESIDUAL = 0.15
#: least squares on M samples can undercut the population lower bound by ~sqrt(1 - p / M) (p = 41, M = 400)
FINITE_SAMPLE_SLACK = 0.8

# (K, C_in, C_out): C_out > C_in, C_out < C_in, C_out == C_in, for K = 3 and 5
SHAPES = [(3, 3, 7), (3, 6, 2), (5, 2, 5), (5, 5, 3), (3, 4, 4)]


def make_conv(k, c_in, c_out, bias, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias).to(dtype)


def image(c_in, dtype, batch=2, height=7, width=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c_in, height, width, generator=gen, dtype=dtype)


def attention_vs_conv(conv, x, alpha, padded=True):
    """(attention output, conv output), both NHWC."""
    k = conv.kernel_size[0]
    attn = attention_from_conv(conv, alpha)
    x_nhwc = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        out = apply_padded(attn, x_nhwc, k) if padded else attn(x_nhwc)
        ref = conv(x).permute(0, 2, 3, 1)
    return out, ref


# -- claim 1: the construction ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,c_in,c_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_alpha25_matches_conv(k, c_in, c_out, bias):
    conv = make_conv(k, c_in, c_out, bias)
    x = image(c_in, torch.float32)
    out, ref = attention_vs_conv(conv, x, 25.0)
    assert out.shape == ref.shape == (2, 7, 6, c_out) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= TOL_F32_ALPHA25 * ref.abs().max()


@pytest.mark.parametrize("k,c_in,c_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_float64_alpha45_matches_conv(k, c_in, c_out, bias):
    conv = make_conv(k, c_in, c_out, bias, torch.float64)
    x = image(c_in, torch.float64)
    out, ref = attention_vs_conv(conv, x, 45.0)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() <= TOL_F64_ALPHA45 * ref.abs().max()


def test_constructed_layer_is_the_papers():
    conv = make_conv(3, 4, 5, True, torch.float64)
    attn = attention_from_conv(conv, 7.0)
    assert isinstance(attn, QuadraticAttention) and attn.isotropic
    assert attn.num_heads == 9 and attn.dim == 4 and attn.out_dim == 5 and attn.value is None
    assert attn.proj.weight.dtype == torch.float64
    torch.testing.assert_close(attn.alpha, torch.full((9,), 7.0, dtype=torch.float64))
    # head h = a*3 + c sits at key - query = (a - 1, c - 1): check against an explicit list of the 3x3 shifts
    expected = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    assert attn.attention_centers.tolist() == [[float(r), float(c)] for r, c in expected]
    # concat = sum: proj block h is the conv tap weight[:, :, a, c]
    for h, (dr, dc) in enumerate(expected):
        torch.testing.assert_close(attn.proj.weight[:, 4 * h:4 * (h + 1)], conv.weight[:, :, dr + 1, dc + 1])
    torch.testing.assert_close(attn.proj.bias, conv.bias)


def test_error_decays_like_four_exp_minus_alpha():
    conv = make_conv(3, 4, 5, True, torch.float64)
    x = image(4, torch.float64, height=8, width=9)
    errors = []
    for alpha in (5.0, 10.0, 15.0):
        out, ref = attention_vs_conv(conv, x, alpha)
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        assert 1 / ESTIMATE_FACTOR <= rel / expected_error_bound(alpha) <= ESTIMATE_FACTOR, (alpha, rel)
        assert (out - ref).abs().max().item() <= rigorous_error_bound(conv, x, alpha)
        errors.append(rel)
    assert errors[0] > errors[1] > errors[2]


def test_leak_mass_is_the_lattice_softmax():
    for alpha in (0.5, 2.0, 10.0):
        # brute force: softmax of -alpha |delta|^2 over a 41 x 41 patch of Z^2, mass off the centre
        r = torch.arange(-20, 21, dtype=torch.float64)
        d2 = r[:, None] ** 2 + r[None, :] ** 2
        p = torch.softmax(-alpha * d2.flatten(), 0)
        assert leak_mass(alpha) == pytest.approx(1 - p.max().item(), rel=1e-9, abs=1e-15)
    assert leak_mass(20.0) / expected_error_bound(20.0) == pytest.approx(1.0, rel=1e-6)


# -- claim 2: no padding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 5])
def test_unpadded_border_wrong_interior_right(k):
    conv = make_conv(k, 3, 4, True, torch.float64)
    x = image(3, torch.float64, height=9, width=10)
    out, ref = attention_vs_conv(conv, x, 45.0, padded=False)
    err = (out - ref).abs().amax(dim=(0, 3))  # (H, W)
    scale = ref.abs().max()
    p = k // 2
    interior = err[p:-p, p:-p]
    border = err.clone()
    border[p:-p, p:-p] = 0
    assert interior.max() <= TOL_F64_ALPHA45 * scale
    assert border.max() >= BORDER_MIN_RELATIVE * scale
    # construction_error reports the same split
    res = construction_error(conv, x, [45.0], torch.float64, padded=False)
    assert res["interior_max_abs"][0] == pytest.approx(interior.max().item(), abs=1e-12)
    assert res["border_max_abs"][0] == pytest.approx(border.max().item(), rel=1e-9)
    padded = construction_error(conv, x, [10.0, 45.0], torch.float64)
    out10, ref10 = attention_vs_conv(conv, x, 10.0)
    assert padded["max_abs"][0] == pytest.approx((out10 - ref10).abs().max().item(), rel=1e-9)
    assert padded["relative"][1] <= TOL_F64_ALPHA45


# -- claim 3: fewer than K^2 heads -------------------------------------------------------------------------
def test_fewer_heads_cannot_fit_a_generic_conv():
    conv = make_conv(3, 5, 6, True, torch.float64)
    x = image(5, torch.float64, batch=4, height=10, width=10)
    bound = head_count_lower_bound(conv, 8, 10, 10)
    assert bound > 0.1
    for alpha in (4.0, 16.0, math.inf):
        fit = best_fit_error(conv, x, 8, alpha)
        assert fit["residual"] >= FEWER_HEADS_MIN_RESIDUAL, alpha
        assert fit["residual"] >= FINITE_SAMPLE_SLACK * bound, alpha
    assert best_fit_error(conv, x, 9, math.inf)["residual"] < 1e-10
    assert best_fit_error(conv, x, 9, 20.0)["residual"] < 1e-6


def test_fewer_heads_suffice_when_a_tap_is_zero():
    conv = make_conv(3, 3, 4, True, torch.float64)
    with torch.no_grad():
        conv.weight[:, :, 0, 2] = 0  # tap at key - query = (-1, +1) unused
    x = image(3, torch.float64, batch=3, height=8, width=7)
    fit = best_fit_error(conv, x, 8, math.inf)
    assert fit["residual"] < 1e-10
    assert [-1.0, 1.0] not in fit["centers"].tolist()
    greedy = best_fit_error(conv, x, 8, math.inf, max_subsets=1)  # backward elimination instead of all subsets
    assert greedy["residual"] < 1e-10 and [-1.0, 1.0] not in greedy["centers"].tolist()


# -- claim 4: split heads ----------------------------------------------------------------------------------
def test_split_heads_rank_deficient_concat_exact():
    conv = make_conv(3, 6, 4, True, torch.float64)
    x = image(6, torch.float64, batch=8, height=9, width=8)
    ref = conv(x).permute(0, 2, 3, 1)
    linear = ref - conv.bias
    for head_dim, deficient in ((1, True), (2, True), (4, False), (6, False)):
        info = per_head_rank_deficiency(conv, head_dim)
        assert info["deficient"] == deficient and info["slice_ranks"] == [4] * 9
        attn = attention_from_conv(conv, 45.0, head_dim=head_dim)
        with torch.no_grad():
            out = apply_padded(attn, x.permute(0, 2, 3, 1), 3)
        rel = ((out - ref).norm() / linear.norm()).item()
        if deficient:  # the truncated-SVD heads miss what the Eckart-Young tail predicts
            assert rel > 0.2 and rel == pytest.approx(info["relative_error"], rel=0.25)
        else:
            assert (out - ref).abs().max() <= TOL_F64_ALPHA45 * ref.abs().max()


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv,attribute", [
    (nn.Conv2d(3, 4, 4), "kernel_size"),
    (nn.Conv2d(3, 4, (3, 5)), "kernel_size"),
    (nn.Conv2d(3, 4, 3, stride=2), "stride"),
    (nn.Conv2d(4, 4, 3, groups=2), "groups"),
    (nn.Conv2d(3, 4, 3, dilation=2), "dilation"),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), "padding_mode"),
])
def test_rejects_unsupported_conv(conv, attribute):
    with pytest.raises(ValueError, match=attribute):
        attention_from_conv(conv, 10.0)


def test_rejects_bad_alpha():
    for alpha in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            attention_from_conv(nn.Conv2d(3, 4, 3), alpha)
