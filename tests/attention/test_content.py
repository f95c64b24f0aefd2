"""ContentAttention (q.k / sqrt(Dh)) against an explicit einsum reference; bugs B2 and B13."""
import pytest
import torch

from satconv.attention.content import ContentAttention
from tests.reference import flatten, ref_content_logits, ref_output, ref_softmax

#: float64 logits: only summation-order rounding remains
F64_ATOL = 1e-10
#: probabilities/outputs: AttentionBase.forward takes the softmax of ``logits.float()``, so float64
#: inputs still carry float32 rounding (~1e-7 relative)
BASE_SOFTMAX_ATOL = 1e-10  # float64 end to end (the base softmax upcasts only fp16/bf16)
HEIGHT, WIDTH, DIM, HEADS = 4, 5, 6, 3
CONFIGS = [{}, {"head_dim": DIM // HEADS}, {"out_dim": 4}, {"head_dim": 4, "out_dim": 7}, {"qkv_bias": False}]
IDS = ["concat", "split", "out_dim", "split_out_dim", "no_qkv_bias"]


def make(**kw):
    return ContentAttention(DIM, HEADS, **kw).double()


def reference_logits(m, x, key_source=None):
    ks = None if key_source is None else flatten(key_source)
    return ref_content_logits(flatten(x), m.query.weight, m.query.bias, m.key.weight, m.key.bias, HEADS, ks)


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_matches_reference(kw):
    m = make(**kw)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    ref = reference_logits(m, x)
    torch.testing.assert_close(m.scores(x.reshape(2, -1, DIM), HEIGHT, WIDTH), ref, atol=F64_ATOL, rtol=0)
    out, probs = m(x, return_attention=True)
    ref_probs = ref_softmax(ref)
    torch.testing.assert_close(probs, ref_probs, atol=BASE_SOFTMAX_ATOL, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=BASE_SOFTMAX_ATOL, rtol=0)
    torch.testing.assert_close(out, ref_output(m, ref_probs, x), atol=BASE_SOFTMAX_ATOL, rtol=0)
    assert out.shape == (2, HEIGHT, WIDTH, kw.get("out_dim", DIM))
    assert (m.query.bias is None) == (kw.get("qkv_bias") is False)


def test_b13_permuting_tokens_permutes_the_output():
    """B13: no positional term, so out(P x) = P out(x) for any permutation P of the pixels."""
    m = make(head_dim=2)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    perm = torch.randperm(HEIGHT * WIDTH)
    out = m(x).reshape(2, -1, DIM)
    out_p = m(x.reshape(2, -1, DIM)[:, perm].reshape(x.shape)).reshape(2, -1, DIM)
    torch.testing.assert_close(out_p, out[:, perm], atol=BASE_SOFTMAX_ATOL, rtol=0)


def test_b13_heads_are_split_by_channel_slices():
    """Each head reads only its own channel slice of q and k (a view(B, H, N, Dh) split mixes them)."""
    m = make(head_dim=2)
    x = torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    base = m.scores(x.reshape(1, -1, DIM), HEIGHT, WIDTH)
    with torch.no_grad():
        m.query.weight[2:4] += 1.0  # channels of head 1 only
    moved = m.scores(x.reshape(1, -1, DIM), HEIGHT, WIDTH)
    changed = [not torch.allclose(base[:, h], moved[:, h]) for h in range(HEADS)]
    assert changed == [False, True, False]


def test_b2_transposing_the_grid_transposes_the_output():
    m = make()
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x.transpose(1, 2)), m(x).transpose(1, 2), atol=BASE_SOFTMAX_ATOL, rtol=0)


def test_key_source_changes_the_output():
    m = make(head_dim=2)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    ks = torch.randn_like(x)
    out = m(x, key_source=ks)
    assert not torch.allclose(out, m(x), atol=1e-6)
    ref = ref_output(m, ref_softmax(reference_logits(m, x, key_source=ks)), x)
    torch.testing.assert_close(out, ref, atol=BASE_SOFTMAX_ATOL, rtol=0)
    assert not ContentAttention.input_independent and ContentAttention.row_stochastic
