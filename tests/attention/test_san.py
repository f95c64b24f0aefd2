"""SAN pairwise / patchwise attention against explicit per-(query, key) loops (Zhao et al. 2020, eq. 2-4)."""
import pytest
import torch

from satconv.attention.san import SANPairwiseAttention, SANPatchwiseAttention
from satconv.dropout import keep_mask
from tests.reference import assert_close, apply_linear as linear

BN_EPS = 1e-5


def randomise_batchnorms(module, gen):
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))


def make(cls, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(kw.pop("dim", 16), kw.pop("num_heads", 4), **kw).double()
    randomise_batchnorms(m, torch.Generator().manual_seed(seed))
    return m


def batchnorm(f, bn, train):
    """BatchNorm over the rows of ``f: (M, C)``: batch statistics (biased variance) or running ones."""
    mean, var = (f.mean(0), f.var(0, unbiased=False)) if train else (bn.running_mean, bn.running_var)
    return (f - mean) / torch.sqrt(var + BN_EPS) * bn.weight + bn.bias


def gamma_ref(f, seq, train):
    """hszhao/SAN ``conv_w``: BN-ReLU-Linear-BN-ReLU-Linear, applied to all rows at once."""
    bn1, _, lin1, bn2, _, lin2 = seq
    f = linear(torch.relu(batchnorm(f, bn1, train)), lin1)
    return linear(torch.relu(batchnorm(f, bn2, train)), lin2)


def coords(height, width):
    """Normalised (row, col) in [-1, 1], computed per pixel."""
    def c(i, n):
        return -1.0 if n == 1 else -1.0 + 2.0 * i / (n - 1)
    return {(r, s): torch.tensor([c(r, height), c(s, width)], dtype=torch.float64)
            for r in range(height) for s in range(width)}


def footprint_pairs(height, width, k):
    """For every query (r, c): list of (slot, key (kr, kc) or None) in slot order a*k + b."""
    out = {}
    for r in range(height):
        for c in range(width):
            slots = []
            for a in range(k):
                for b in range(k):
                    kr, kc = r + a - k // 2, c + b - k // 2
                    slots.append((a * k + b, (kr, kc) if 0 <= kr < height and 0 <= kc < width else None))
            out[(r, c)] = slots
    return out


def reference(m, x, key_source=None, train=False, pairwise=True, keep=None, p_drop=0.0):
    """Explicit SAN: loops over batch, query pixel and every footprint slot.  ``keep``: a dropout mask of the
    weights, ``(B, N, G, k*k)`` (pairwise) or ``(B, N, k*k, G)`` (patchwise), the survivors scaled by
    ``1 / (1 - p_drop)`` in the output (the returned weights are not dropped)."""
    b, height, width, _ = x.shape
    ks = x if key_source is None else key_source
    k, g, c_out = m.kernel_size, m.num_heads, m.out_dim
    q, kk, v = linear(x, m.query), linear(ks, m.key), linear(x, m.value)
    pos = coords(height, width)
    fp = footprint_pairs(height, width, k)
    feats, owners = [], []
    for bi in range(b):
        for (r, c), slots in fp.items():
            if pairwise:
                for s, key in slots:
                    if key is None:
                        continue  # outside the image: no pair at all
                    rel = q[bi, r, c] - kk[bi, key[0], key[1]]
                    p = linear(pos[(r, c)], m.position) - linear(pos[key], m.position)
                    feats.append(torch.cat([rel, p]))
                    owners.append((bi, r, c, s, key))
            else:
                keys = [kk[bi, key[0], key[1]] if key is not None else torch.zeros_like(q[bi, r, c])
                        for _, key in slots]
                feats.append(torch.cat([q[bi, r, c]] + keys))
                owners.append((bi, r, c))
    w_all = gamma_ref(torch.stack(feats), m.gamma, train)
    n = height * width
    probs = torch.zeros(b, g, n, n, dtype=torch.float64)
    out = torch.zeros(b, height, width, c_out, dtype=torch.float64)
    group = torch.tensor([ch % g for ch in range(c_out)])
    if pairwise:
        logits = {}
        for row, (bi, r, c, s, key) in zip(w_all, owners):
            logits.setdefault((bi, r, c), []).append((key, row, s))
        for (bi, r, c), entries in logits.items():
            z = torch.stack([e[1] for e in entries])  # (valid keys, G)
            w = torch.softmax(z, dim=0)
            for (key, _, s), wj in zip(entries, w):
                probs[bi, :, r * width + c, key[0] * width + key[1]] = wj
                if keep is not None:
                    wj = wj * keep[bi, r * width + c, :, s] / (1 - p_drop)
                out[bi, r, c] += wj[group] * v[bi, key[0], key[1]]  # channel ch uses weight ch % G
    else:
        for row, (bi, r, c) in zip(w_all, owners):
            w = row.view(k * k, g)  # slot s, group g = output s*G + g
            for s, key in fp[(r, c)]:
                if key is None:
                    continue  # zero value: no contribution
                probs[bi, :, r * width + c, key[0] * width + key[1]] = w[s]
                ws = w[s] if keep is None else w[s] * keep[bi, r * width + c, s] / (1 - p_drop)
                out[bi, r, c] += ws[group] * v[bi, key[0], key[1]]  # channel ch uses weight ch % G
    return out, probs


CASES = [dict(kernel_size=3, out_dim=8, rel_dim=3, grid=(4, 5)),
         dict(kernel_size=5, out_dim=12, rel_dim=2, grid=(3, 4))]


@pytest.mark.parametrize("cls", [SANPairwiseAttention, SANPatchwiseAttention])
@pytest.mark.parametrize("case", CASES, ids=["k3", "k5_wider_than_grid"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_explicit_loops(cls, case, train):
    """Output and dense weights equal the per-pair reference; train mode: BN statistics over real pairs only."""
    case = dict(case)
    height, width = case.pop("grid")
    m = make(cls, **case).train(train)
    x = torch.randn(2, height, width, 16, dtype=torch.float64)
    ks = torch.randn_like(x)
    for key_source in (None, ks):
        out, probs = m(x, return_attention=True, key_source=key_source)
        ref_out, ref_probs = reference(m, x, key_source, train, pairwise=cls is SANPairwiseAttention)
        assert probs.shape == (2, 4, height * width, height * width)
        assert_close(out, ref_out)
        assert_close(probs, ref_probs)
    assert cls.row_stochastic == (cls is SANPairwiseAttention)



@pytest.mark.parametrize("cls", [SANPairwiseAttention, SANPatchwiseAttention])
def test_training_dropout_matches_explicit_loops_with_the_drawn_mask(cls):
    """In training with dropout p, the output is the reference's with the weights kept by the mask keep_mask draws
    from the seeded generator: per (query, group, slot) after the softmax (pairwise, shape (B, N, G, k*k)), per
    (query, slot, group) output of gamma (patchwise, (B, N, k*k, G)); the returned weights are not dropped,
    and every parameter's gradient is the explicit loops' (float64)."""
    p, height, width = 0.3, 4, 5
    m = make(cls, kernel_size=3, out_dim=8, rel_dim=3, dropout=p).train()
    x = torch.randn(2, height, width, 16, dtype=torch.float64)
    torch.manual_seed(7)
    out, probs = m(x, return_attention=True)
    pairwise = cls is SANPairwiseAttention
    shape = (2, height * width, 4, 9) if pairwise else (2, height * width, 9, 4)
    torch.manual_seed(7)
    keep = keep_mask(shape, p, x)
    ref_out, ref_probs = reference(m, x, train=True, pairwise=pairwise, keep=keep, p_drop=p)
    assert_close(out, ref_out)
    assert_close(probs, ref_probs)
    assert not keep.all() and keep.any()
    w = torch.randn_like(out)
    params = [q for q in m.parameters() if q.requires_grad]
    got = torch.autograd.grad((w * out).sum(), params, allow_unused=True)
    want = torch.autograd.grad((w * ref_out).sum(), params, allow_unused=True)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            assert_close(g, r)

def test_weights_are_shared_over_channel_groups():
    """Channel c uses group c % G: with beta = identity-like values, channels c and c + G see the same weights."""
    m = make(SANPairwiseAttention, out_dim=8, num_heads=4).eval()
    with torch.no_grad():
        m.value.weight.zero_()
        m.value.bias.fill_(1.0)  # every value channel is 1, so y_i[c] = sum_j w[i, j, c % G]
    out = m(torch.randn(1, 3, 3, 16, dtype=torch.float64))
    assert_close(out[..., :4], out[..., 4:])
    assert_close(out, torch.ones_like(out))  # softmax weights sum to 1
