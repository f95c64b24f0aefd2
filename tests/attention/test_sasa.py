"""SASA local attention against explicit loops over every query and footprint key (Ramachandran et al. 2019, eq. 3)."""
import pytest
import torch

from satconv.attention.sasa import SASAAttention
from tests.reference import assert_close, apply_linear as linear


def reference(m, x, key_source=None):
    """softmax_ab(q_ij.k_ab + q_ij[:Dh/2].r_row[a-i] + q_ij[Dh/2:].r_col[b-j]) v_ab over in-image keys, per head."""
    b, height, width, d = x.shape
    ks = x if key_source is None else key_source
    h, dh, r = m.num_heads, m.head_dim, m.kernel_size // 2
    q = linear(x, m.query).view(b, height, width, h, dh)
    kk = linear(ks, m.key).view(b, height, width, h, dh)
    v = (linear(x, m.value) if m.value is not None else x.repeat(1, 1, 1, h)).view(b, height, width, h, dh)
    n = height * width
    probs = torch.zeros(b, h, n, n, dtype=torch.float64)
    heads_out = torch.zeros(b, height, width, h, dh, dtype=torch.float64)
    for bi in range(b):
        for i in range(height):
            for j in range(width):
                keys, logits = [], []
                for da in range(-r, r + 1):
                    for db in range(-r, r + 1):
                        a, bb = i + da, j + db
                        if not (0 <= a < height and 0 <= bb < width):
                            continue  # outside the image: masked out of the softmax
                        qv = q[bi, i, j]  # (H, Dh): all heads at once
                        score = (qv * kk[bi, a, bb]).sum(-1)
                        score = score + (qv[:, : dh // 2] * m.rel_row[:, da + r]).sum(-1)
                        score = score + (qv[:, dh // 2:] * m.rel_col[:, db + r]).sum(-1)
                        keys.append((a, bb))
                        logits.append(score)
                w = torch.softmax(torch.stack(logits), dim=0)  # (keys, H)
                for (a, bb), wk in zip(keys, w):
                    probs[bi, :, i * width + j, a * width + bb] = wk
                    heads_out[bi, i, j] += wk[:, None] * v[bi, a, bb]
    return linear(heads_out.reshape(b, height, width, h * dh), m.proj), probs


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return SASAAttention(kw.pop("dim", 12), kw.pop("num_heads", 3), **kw).double()


CASES = {
    "default_head_dim": dict(kernel_size=3),  # head_dim = 12 // 3 = 4 with a value projection
    "explicit_head_dim_out_dim": dict(kernel_size=3, head_dim=6, out_dim=5),
    "raw_values": dict(dim=8, num_heads=2, head_dim=8, kernel_size=3),  # head_dim == dim: no value projection
    "window_wider_than_grid": dict(kernel_size=7),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_explicit_loops(case):
    m = make(**case).eval()
    x = torch.randn(2, 3, 4, m.dim, dtype=torch.float64)
    for key_source in (None, torch.randn_like(x)):
        out, probs = m(x, return_attention=True, key_source=key_source)
        ref_out, ref_probs = reference(m, x, key_source)
        assert probs.shape == (2, m.num_heads, 12, 12)
        assert_close(out, ref_out)
        assert_close(probs, ref_probs)


def test_default_head_dim_splits_dim_with_value_projection():
    m = SASAAttention(32, 8, kernel_size=3)
    assert m.head_dim == 4 and m.value is not None and m.rel_row.shape == (8, 3, 2)
