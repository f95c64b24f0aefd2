"""LearnedRelativeAttention (epfml/attention-cnn, three variants) against explicit per-pair references; B2, B8."""
import pytest
import torch

from satconv.attention.routes import EXPLICIT, using_routes

from satconv.attention.learned_relative import LearnedRelativeAttention
from tests.reference import flatten, ref_learned_logits, ref_output, ref_softmax

#: float64 logits: only summation-order rounding remains
F64_ATOL = 1e-10
#: probabilities/outputs of the input-dependent variants: AttentionBase.forward takes the softmax of
#: ``logits.float()``, so float64 inputs still carry float32 rounding (~1e-7 relative)
BASE_SOFTMAX_ATOL = 1e-10  # float64 end to end (the base softmax upcasts only fp16/bf16)
HEIGHT, WIDTH, DIM, HEADS, MAXPOS = 4, 5, 8, 2, 6
VARIANTS = ["position_only", "query_position", "content_query_position"]


def make(variant, **kw):
    m = LearnedRelativeAttention(DIM, HEADS, variant=variant, max_position=MAXPOS, **kw).double()
    return m


def params_of(m):
    """The raw parameter tensors the reference needs."""
    p = {"e_row": m.row_embeddings.weight, "e_col": m.col_embeddings.weight}
    if m.variant == "position_only":
        p.update(w_row=m.head_keys_row.weight, b_row=m.head_keys_row.bias,
                 w_col=m.head_keys_col.weight, b_col=m.head_keys_col.bias)
    else:
        p.update(wq=m.query.weight, bq=m.query.bias)
        if m.variant == "content_query_position":
            p.update(wk=m.key.weight, bk=m.key.bias)
    return p


def reference_logits(m, x, key_source=None, height=HEIGHT, width=WIDTH):
    ks = None if key_source is None else flatten(key_source)
    return ref_learned_logits(m.variant, flatten(x), params_of(m), height, width, m.max_position, m.num_heads, ks)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kw", [{}, {"head_dim": DIM // HEADS}], ids=["concat", "split"])
def test_logits_match_reference(variant, kw):
    m = make(variant, **kw)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    got = m.scores(x.reshape(2, HEIGHT * WIDTH, DIM), HEIGHT, WIDTH)
    ref = reference_logits(m, x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=F64_ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kw", [{}, {"head_dim": DIM // HEADS}, {"out_dim": 4}, {"head_dim": 6, "out_dim": 7}],
                         ids=["concat", "split", "out_dim", "split_out_dim"])
def test_forward_matches_reference(variant, kw):
    m = make(variant, **kw)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    out, probs = m(x, return_attention=True)
    ref_probs = ref_softmax(reference_logits(m, x))
    atol = F64_ATOL if variant == "position_only" else BASE_SOFTMAX_ATOL
    torch.testing.assert_close(probs, ref_probs, atol=atol, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=atol, rtol=0)
    torch.testing.assert_close(out, ref_output(m, ref_probs, x), atol=atol, rtol=0)
    assert out.shape == (2, HEIGHT, WIDTH, kw.get("out_dim", DIM))
    assert probs.shape[0] == (1 if variant == "position_only" else 2)
    assert m.input_independent == (variant == "position_only")


@pytest.mark.parametrize("variant", VARIANTS)
def test_b2_transposing_the_grid_transposes_the_output(variant):
    """B2: with symmetric position terms (e_row = e_col, equal row/column halves), transpose commutes."""
    m = make(variant)
    with torch.no_grad():
        m.col_embeddings.weight.copy_(m.row_embeddings.weight)
        if variant == "position_only":
            m.head_keys_col.load_state_dict(m.head_keys_row.state_dict())
        else:  # q[:Dk/2] = q[Dk/2:] per head, so q_row . e[a] + q_col . e[b] is symmetric in (a, b)
            w = m.query.weight.view(HEADS, 2, DIM // 2, DIM)
            w[:, 1] = w[:, 0]
            b = m.query.bias.view(HEADS, 2, DIM // 2)
            b[:, 1] = b[:, 0]
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)  # non-square: 4x5 -> 5x4
    out = m(x)
    out_t = m(x.transpose(1, 2))
    atol = F64_ATOL if variant == "position_only" else BASE_SOFTMAX_ATOL
    torch.testing.assert_close(out_t, out.transpose(1, 2), atol=atol, rtol=0)
    torch.testing.assert_close(out, ref_output(m, ref_softmax(reference_logits(m, x)), x),
                               atol=BASE_SOFTMAX_ATOL, rtol=0)


def test_b2_transpose_check_can_fail_without_symmetry():
    """The previous test is not vacuous: generic row/column embeddings break transpose equivariance."""
    m = make("query_position")
    x = torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    assert not torch.allclose(m(x.transpose(1, 2)), m(x).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_source(variant):
    m = make(variant)
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    ks = torch.randn_like(x)
    out, out_ks = m(x), m(x, key_source=ks)
    if variant == "content_query_position":
        assert not torch.allclose(out, out_ks, atol=1e-6)
        ref = ref_output(m, ref_softmax(reference_logits(m, x, key_source=ks)), x)
        torch.testing.assert_close(out_ks, ref, atol=BASE_SOFTMAX_ATOL, rtol=0)
    else:  # no keys: ignored
        torch.testing.assert_close(out_ks, out, atol=0, rtol=0)


def test_grid_larger_than_max_position_is_a_clear_error():
    m = LearnedRelativeAttention(DIM, HEADS, max_position=4)
    m(torch.randn(1, 4, 4, DIM))  # the largest grid that fits
    for variant in VARIANTS:
        with pytest.raises(ValueError, match="max_position=4"):
            LearnedRelativeAttention(DIM, HEADS, variant=variant, max_position=4)(torch.randn(1, 4, 5, DIM))


def test_grid_change_and_state_dict_has_no_index_buffer():
    m = make("content_query_position")
    x = torch.randn(1, 3, 3, DIM, dtype=torch.float64)
    m(torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64))
    out = m(x)  # a new grid rebuilds the index
    torch.testing.assert_close(out, ref_output(m, ref_softmax(reference_logits(m, x, height=3, width=3)), x),
                               atol=BASE_SOFTMAX_ATOL, rtol=0)
    assert not any("index" in k for k in m.state_dict())
    pos = make("position_only")  # its explicit route keeps the (2, N, N) index as a buffer
    with using_routes(pos, EXPLICIT):
        pos(torch.randn(1, HEIGHT, WIDTH, DIM, dtype=torch.float64))
        pos(x)
    assert dict(pos.named_buffers())["relative_position_index"].shape == (2, 9, 9)
    assert not any("index" in k for k in pos.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts(variant):
    """Per layer at the paper's size (dim 400, 9 heads concatenated, max_position 16)."""
    m = LearnedRelativeAttention(400, 9, variant=variant)
    proj = 3600 * 400 + 400
    expected = {
        "position_only": proj + 2 * 31 * 400 + 2 * (400 * 9 + 9),
        "query_position": proj + (400 * 3600 + 3600) + 2 * 31 * 200,
        "content_query_position": proj + 2 * (400 * 3600 + 3600) + 2 * 31 * 200,
    }[variant]
    assert sum(p.numel() for p in m.parameters()) == expected


def test_position_only_eval_cache():
    m = make("position_only").eval()
    x = torch.randn(2, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    with torch.no_grad():
        p1 = m(x, return_attention=True)[1]
        assert m(torch.randn_like(x), return_attention=True)[1] is p1
        m.row_embeddings.weight.add_(1.0)  # in-place update: version counter moves
        p2 = m(x, return_attention=True)[1]
    assert p2 is not p1
    torch.testing.assert_close(p2, ref_softmax(reference_logits(m, x)), atol=F64_ATOL, rtol=0)
    q = make("query_position").eval()
    with torch.no_grad():
        assert q(x, return_attention=True)[1] is not q(x, return_attention=True)[1]
