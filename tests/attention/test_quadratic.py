"""QuadraticAttention (paper eq. (9), anisotropic form) against explicit per-pair references; bugs B1, B3, B8."""
import pytest
import torch
from torch import nn

from satconv.attention.quadratic import QuadraticAttention, no_decay_param_groups
from tests.reference import pairs, ref_output, ref_quadratic_logits, ref_softmax

#: float64 end to end (logits, softmax in float64, matmuls): only summation-order rounding remains
F64_ATOL = 1e-10
HEIGHT, WIDTH, DIM, HEADS = 4, 5, 6, 3


def make(isotropic=True, **kw):
    """A float64 layer with spreads far from their init so anisotropy and scale matter."""
    m = QuadraticAttention(DIM, HEADS, isotropic=isotropic, init_center_std=1.5, init_spread_std=0.4, **kw).double()
    return m


def test_logits_match_reference(isotropic):
    m = make(isotropic)
    got = m.scores(None, HEIGHT, WIDTH)
    assert got.shape == (1, HEADS, HEIGHT * WIDTH, HEIGHT * WIDTH)
    ref = ref_quadratic_logits(m.attention_centers, m.attention_spreads, HEIGHT, WIDTH)
    torch.testing.assert_close(got[0], ref, atol=F64_ATOL, rtol=0)


@pytest.fixture(params=[True, False], ids=["isotropic", "anisotropic"])
def isotropic(request):
    return request.param


@pytest.mark.parametrize("kw", [{}, {"head_dim": DIM // HEADS}, {"out_dim": 4}, {"head_dim": 4, "out_dim": 7}],
                         ids=["concat", "split", "out_dim", "split_out_dim"])
def test_forward_matches_reference(isotropic, kw):
    m = make(isotropic, **kw)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    out, probs = m(x, return_attention=True)
    ref_probs = ref_softmax(ref_quadratic_logits(m.attention_centers, m.attention_spreads, HEIGHT, WIDTH))[None]
    torch.testing.assert_close(probs, ref_probs, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(out, ref_output(m, ref_probs, x), atol=F64_ATOL, rtol=0)
    assert out.shape == (2, HEIGHT, WIDTH, kw.get("out_dim", DIM))
    assert (m.value is None) == ("head_dim" not in kw)


def test_large_alpha_peaks_at_query_plus_center(isotropic):
    """Hard-attention limit (Lemma 2): a narrow head puts its argmax (and ~all mass) at q + Delta."""
    h, w = 6, 6
    m = QuadraticAttention(DIM, HEADS, isotropic=isotropic).double()
    centers = torch.tensor([[1.0, -1.0], [0.0, 2.0], [-2.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        m.attention_centers.copy_(centers)
        if isotropic:
            m.attention_spreads.fill_(10.0)  # alpha = 50
        else:
            m.attention_spreads.copy_(torch.tensor([[10.0, 1.0], [0.0, 9.0]]).expand(HEADS, 2, 2))
    probs = m(torch.randn(1, h, w, DIM, dtype=torch.float64), return_attention=True)[1][0]
    checked = 0
    for hd in range(HEADS):
        dr, dc = int(centers[hd, 0]), int(centers[hd, 1])
        for r in range(h):
            for c in range(w):
                if 0 <= r + dr < h and 0 <= c + dc < w:
                    q, target = r * w + c, (r + dr) * w + (c + dc)
                    assert probs[hd, q].argmax().item() == target
                    assert probs[hd, q, target] > 0.99
                    checked += 1
    assert checked > 40


def test_b1_isotropic_zero_center_peaks_at_query():
    """B1: with mu = 0, s = 5 the centre query's mass peaks at delta = (0, 0) (the [Re] typo gives delta_2 = 1)."""
    h = w = 5
    m = QuadraticAttention(DIM, 1).double()
    with torch.no_grad():
        m.attention_centers.zero_()
        m.attention_spreads.fill_(5.0)
    probs = m(torch.zeros(1, h, w, DIM, dtype=torch.float64), return_attention=True)[1]
    centre = 2 * w + 2
    assert probs[0, 0, centre].argmax().item() == centre
    # the expanded target-vector form gives the same distribution
    r = torch.tensor([[d1, d2, d1 * d1, d2 * d2, d1 * d2] for q, k, d1, d2 in pairs(h, w) if q == centre],
                     dtype=torch.float64)
    from_t = torch.softmax(r @ m.target_vectors()[0], dim=-1)
    torch.testing.assert_close(from_t, probs[0, 0, centre], atol=F64_ATOL, rtol=0)


def _plus_half_mahalanobis(values, centers, spreads, isotropic):
    """``values[h, i] + 1/2 (delta_i - mu_h)^T Sigma_h^{-1} (delta_i - mu_h)`` over all pairs ``i``."""
    deltas = torch.tensor([(d1, d2) for _, _, d1, d2 in pairs(HEIGHT, WIDTH)], dtype=torch.float64)  # (P, 2)
    s = spreads.detach()
    inv = (s ** 2)[:, None, None] * torch.eye(2, dtype=torch.float64) if isotropic else s.transpose(1, 2) @ s
    e = deltas[None] - centers.detach()[:, None]  # (H, P, 2)
    return values + 0.5 * torch.einsum("hpi,hij,hpj->hp", e, inv, e)


def test_b1_target_vector_is_the_gaussian_up_to_a_constant(isotropic):
    """B1: t_h . r_delta + 1/2 (delta-mu)^T Sigma^{-1} (delta-mu) is constant over delta, per head."""
    m = make(isotropic)
    r = torch.tensor([[d1, d2, d1 * d1, d2 * d2, d1 * d2] for _, _, d1, d2 in pairs(HEIGHT, WIDTH)],
                     dtype=torch.float64)  # (P, 5)
    t = m.target_vectors().detach()  # (H, 5)
    total = _plus_half_mahalanobis(t @ r.T, m.attention_centers, m.attention_spreads, isotropic)
    assert (total.amax(1) - total.amin(1)).abs().max() < 1e-9
    # the logits themselves: the same statement
    logits = m.scores(None, HEIGHT, WIDTH)[0].detach().reshape(HEADS, -1)
    total = _plus_half_mahalanobis(logits, m.attention_centers, m.attention_spreads, isotropic)
    assert (total.amax(1) - total.amin(1)).abs().max() < 1e-9
    # the check can fail: the [Re]'s typo -2(c + mu2 + b mu1) breaks it
    bad = t.clone()
    inv = m.inverse_covariance().detach()
    b, c, mu1, mu2 = inv[:, 0, 1], inv[:, 1, 1], m.attention_centers[:, 0].detach(), m.attention_centers[:, 1].detach()
    bad[:, 1] = (c + mu2 + b * mu1)
    total = _plus_half_mahalanobis(bad @ r.T, m.attention_centers, m.attention_spreads, isotropic)
    assert (total.amax(1) - total.amin(1)).abs().max() > 1e-3


def test_alpha_and_inverse_covariance():
    m = make(True)
    torch.testing.assert_close(m.alpha, m.attention_spreads ** 2 / 2)
    with pytest.raises(ValueError, match="isotropic"):
        make(False).alpha


def test_init_statistics():
    m = QuadraticAttention(4, 2000, init_center_std=2.0, init_spread_std=0.01)
    assert abs(m.attention_centers.std().item() - 2.0) < 0.1
    assert (m.attention_spreads - 1).abs().max() < 0.06
    a = QuadraticAttention(4, 2000, isotropic=False, init_spread_std=0.01).attention_spreads
    assert a.shape == (2000, 2, 2) and (a - torch.eye(2)).abs().max() < 0.06


def test_degenerate_heads():
    m = QuadraticAttention(DIM, 3, isotropic=False)
    with torch.no_grad():
        m.attention_spreads.copy_(torch.stack([torch.eye(2),  # healthy
                                               torch.diag(torch.tensor([1.0, 0.01])),  # cond(S^T S) = 1e4
                                               torch.eye(2) * 1e-3]))  # largest eigenvalue 1e-6
    assert m.degenerate_heads().tolist() == [False, True, True]
    assert m.degenerate_heads(cond_threshold=1e5).tolist() == [False, False, True]
    iso = QuadraticAttention(DIM, 2)
    with torch.no_grad():
        iso.attention_spreads.copy_(torch.tensor([1.0, 1e-3]))
    assert iso.degenerate_heads().dtype == torch.bool and iso.degenerate_heads().tolist() == [False, True]


def test_no_decay_param_groups_b3(isotropic):
    model = nn.Sequential(QuadraticAttention(DIM, HEADS, isotropic=isotropic), nn.Linear(DIM, DIM))
    groups = no_decay_param_groups(model, weight_decay=0.5)
    no_decay = {n for n, p in model.named_parameters() if any(p is q for g in groups if g["weight_decay"] == 0
                                                                 for q in g["params"])}
    assert no_decay == {"0.attention_centers", "0.attention_spreads"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.5 for g in groups if g["weight_decay"] != 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in no_decay:
            assert torch.equal(p, before[n]), n
        elif before[n].abs().max() > 0:
            assert not torch.equal(p, before[n]), f"{n} should have decayed"


def test_eval_cache_hit_and_invalidation():
    """B8: in eval mode the probabilities are computed once per shape; a parameter update invalidates them."""
    m = make(True)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        p1 = m(x, return_attention=True)[1]
        p2 = m(x * 2, return_attention=True)[1]
        assert p2 is p1
        other = m(torch.randn(1, 3, 3, DIM, dtype=torch.float64), return_attention=True)[1]
        assert other.shape == (1, HEADS, 9, 9)
        assert m(x, return_attention=True)[1] is p1
    # an optimizer step (in-place update) invalidates
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.inference_mode():
        p3 = m(x, return_attention=True)[1]
    assert p3 is not p1 and not torch.allclose(p3, p1)
    ref = ref_softmax(ref_quadratic_logits(m.attention_centers, m.attention_spreads, HEIGHT, WIDTH))[None]
    torch.testing.assert_close(p3, ref, atol=F64_ATOL, rtol=0)
    # load_state_dict invalidates too; the cached tensor (made under inference_mode) is usable with grad
    state = {k: v.clone() for k, v in make(True).state_dict().items()}
    m.load_state_dict(state)
    with torch.no_grad():
        p4 = m(x, return_attention=True)[1]
    ref = ref_softmax(ref_quadratic_logits(state["attention_centers"], state["attention_spreads"], HEIGHT, WIDTH))
    torch.testing.assert_close(p4[0], ref, atol=F64_ATOL, rtol=0)
    # training mode: recomputed every call, differentiable
    m.train()
    a = m(x, return_attention=True)[1]
    assert a is not m(x, return_attention=True)[1] and a.grad_fn is not None


def test_eval_mode_with_grad_recording_is_not_cached():
    m = make(False).eval()
    x = torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    for _ in range(2):  # a stale cached graph would fail on the second backward
        m.zero_grad()
        m(x).sum().backward()
        assert m.attention_centers.grad.abs().max() > 0


def test_state_dict_has_no_grid_buffer():
    m = make(False)
    m(torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64))
    assert "relative_position_offsets" in dict(m.named_buffers())
    assert set(m.state_dict()) == {"attention_centers", "attention_spreads", "proj.weight", "proj.bias"}
