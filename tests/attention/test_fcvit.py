"""FCViT token mixer vs an explicit reference: global context per (group, token), depth-wise conv per footprint key."""
import pytest
import torch
import torch.nn.functional as F

from satconv.attention.fcvit import FCViTTokenMixer
from tests.reference import assert_close


def global_context_ref(gc, x):
    """ma-xu/FCViT GlobalContext, per token: x ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    b, height, width, c = x.shape
    g_n, dg = gc.num_heads, c // gc.num_heads
    out = torch.zeros_like(x)
    for bi in range(b):
        tokens = x[bi].reshape(-1, c)  # (N, C)
        pooled = tokens.mean(0)  # GAP
        sim = torch.stack([torch.stack([tokens[i, h * dg:(h + 1) * dg] @ pooled[h * dg:(h + 1) * dg] / dg ** 0.5
                                        for i in range(len(tokens))]) for h in range(g_n)])  # (G, N)
        sim = (sim - sim.mean()) / (sim.std(unbiased=True) + 1e-5)  # over all (groups, tokens)
        sim = sim * gc.rescale_weight[:, None] + gc.rescale_bias[:, None]
        if gc.compete:
            z = (gc.fc1.weight @ pooled + gc.fc1.bias).view(2, -1).max(dim=0).values  # compete: max of 2 groups
            mlp = gc.fc2.weight @ z + gc.fc2.bias
        else:
            lin1, _, lin2 = gc.fc
            mlp = lin2.weight @ F.gelu(lin1.weight @ pooled + lin1.bias) + lin2.bias
        for i in range(len(tokens)):
            for ch in range(c):
                out[bi, i // width, i % width, ch] = sim[ch // dg, i] * mlp[ch]
    return out


def dwconv_ref(conv, x):
    """Depth-wise k x k conv, zero padding, by loops over pixels and footprint keys: ``(B, H, W, C)``."""
    b, height, width, c = x.shape
    k, r = conv.kernel_size[0], conv.kernel_size[0] // 2
    out = conv.bias.expand(b, height, width, c).clone()
    for i in range(height):
        for j in range(width):
            for a in range(k):
                for bb in range(k):
                    ki, kj = i + a - r, j + bb - r
                    if 0 <= ki < height and 0 <= kj < width:
                        out[:, i, j] += conv.weight[:, 0, a, bb] * x[:, ki, kj]
    return out


def pointwise_ref(seq, x):
    """1x1 conv, GELU, 1x1 conv as channel matrices on ``(B, H, W, C)``."""
    c1, _, c2 = seq
    h = F.gelu(x @ c1.weight[:, :, 0, 0].T + c1.bias)
    return h @ c2.weight[:, :, 0, 0].T + c2.bias


def mixer_ref(m, x):
    x = x + global_context_ref(m.gc1, x)
    x = F.gelu(pointwise_ref(m.fc1, dwconv_ref(m.dw1, x)))
    x = x + global_context_ref(m.gc2, x)
    return F.gelu(pointwise_ref(m.fc2, dwconv_ref(m.dw2, x)))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    m = FCViTTokenMixer(kw.pop("dim", 16), kw.pop("num_heads", 4), **kw).double()
    with torch.no_grad():  # move the per-group affine and biases off their trivial init
        for gc in (m.gc1, m.gc2):
            gc.rescale_weight.normal_()
            gc.rescale_bias.normal_()
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=5, compete=False, out_dim=6)],
                         ids=["k3_compete", "k5_mlp_out_dim"])
def test_matches_explicit_reference(kw):
    m = make(**kw).eval()
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    out, probs = m(x, return_attention=True, key_source=torch.randn_like(x))  # key_source is ignored
    assert_close(out, mixer_ref(m, x))
    assert probs.shape == (1, 4, 12, 12)


def test_attention_is_the_group_averaged_depthwise_kernel():
    """probs[0, h, q, k] = mean over group h's channels of the dw1 tap at k - q (zero outside the window)."""
    m = make(kernel_size=3).eval()
    height, width, dg = 4, 5, 4
    _, probs = m(torch.randn(1, height, width, 16, dtype=torch.float64), return_attention=True)
    expected = torch.zeros(1, 4, height * width, height * width, dtype=torch.float64)
    for h in range(4):
        kernel = m.dw1.weight[h * dg:(h + 1) * dg, 0].mean(0)  # (3, 3)
        for qi in range(height * width):
            for ki in range(height * width):
                da, db = ki // width - qi // width, ki % width - qi % width
                if abs(da) <= 1 and abs(db) <= 1:
                    expected[0, h, qi, ki] = kernel[da + 1, db + 1]
    assert_close(probs, expected)
    # query-irrelevant: two interior queries see the same pattern, shifted
    rows = probs[0].view(4, height * width, height, width)
    assert torch.equal(rows[:, 6, :3, :3], rows[:, 7, :3, 1:4])
    assert not FCViTTokenMixer.row_stochastic
