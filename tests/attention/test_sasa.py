"""SASA local attention against explicit loops over every query and footprint key (Ramachandran et al. 2019, eq. 3)."""
import copy

import pytest
import torch

from satconv.attention.sasa import SASAAttention
from satconv.dropout import keep_mask
from tests.reference import assert_close, apply_linear as linear


def reference(m, x, key_source=None, keep=None, p=0.0):
    """softmax_ab(q_ij.k_ab + q_ij[:Dh/2].r_row[a-i] + q_ij[Dh/2:].r_col[b-j]) v_ab over in-image keys, per head;
    ``keep``: a ``(B, N, H, k*k)`` dropout mask over the footprint slots (slot ``(a-i+r)*k + (b-j+r)``), the
    surviving weights scaled by ``1 / (1 - p)`` in the output (the returned probabilities are not dropped)."""
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
                keys, logits, slots = [], [], []
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
                        slots.append((da + r) * m.kernel_size + db + r)
                w = torch.softmax(torch.stack(logits), dim=0)  # (keys, H)
                for (a, bb), wk, slot in zip(keys, w, slots):
                    probs[bi, :, i * width + j, a * width + bb] = wk
                    if keep is not None:
                        wk = wk * keep[bi, i * width + j, :, slot] / (1 - p)
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


def test_training_dropout_is_eq3_with_the_drawn_mask():
    """In training, the output is eq. (3) with each (query, head, footprint slot) weight kept by the mask that
    keep_mask draws from the seeded generator (shape (B, N, H, k*k)) and scaled by 1 / (1 - p); the returned
    probabilities are not dropped; and every parameter's gradient is the explicit loops' (float64)."""
    p = 0.3
    m = make(kernel_size=3, dropout=p).train()
    x = torch.randn(2, 3, 4, m.dim, dtype=torch.float64)
    torch.manual_seed(7)
    out, probs = m(x, return_attention=True)
    torch.manual_seed(7)
    keep = keep_mask((2, 12, m.num_heads, 9), p, x)
    ref_out, ref_probs = reference(m, x, keep=keep, p=p)
    assert_close(out, ref_out)
    assert_close(probs, ref_probs)
    assert not keep.all() and keep.any()
    w = torch.randn_like(out)
    params = [q for q in m.parameters() if q.requires_grad]
    got = torch.autograd.grad((w * out).sum(), params)
    want = torch.autograd.grad((w * ref_out).sum(), params)
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.slow
def test_compiled_training_with_dropout_equals_eager_on_cpu():
    """torch.compile (inductor, CPU) of a SASA layer in training with dropout: the opaque softmax-dropout
    operators inside the graph give eager's output and gradients for the same seeded mask (float32)."""
    eager = make(kernel_size=3, dropout=0.3).float().train()
    twin = copy.deepcopy(eager)
    x = torch.randn(2, 5, 6, eager.dim)
    w = torch.randn(2, 5, 6, eager.out_dim)
    results = []
    for model, forward in ((eager, eager), (twin, torch.compile(twin, fullgraph=True, dynamic=False))):
        torch.manual_seed(11)
        out = forward(x)
        grads = torch.autograd.grad((w * out).sum(), [q for q in model.parameters() if q.requires_grad])
        results.append((out, grads))
    (out, grads), (out_c, grads_c) = results
    assert_close(out_c, out, atol=1e-5)
    for g, gc in zip(grads, grads_c):
        assert_close(gc, g, atol=1e-5)
