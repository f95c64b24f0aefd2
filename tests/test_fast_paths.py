"""Fast paths pinned to explicit ones (paper.md §6; performance issue).

On CPU: the folded content attention (:mod:`satconv.attention.folded`), the batched routes of ``AttentionBase.combine`` and the per-axis q.r
gather against the explicit route (``Routes(fast=False)``, :func:`satconv.attention.routes.using_routes`) or plain
broadcast products, in float64, with gradients.  On CUDA (skipped elsewhere): bf16 autocast and ``torch.compile``
against the float32 eager model, with stated tolerances.
"""
import pytest
import torch

from satconv import config as C
from satconv.attention import ContentAttention, LearnedRelativeAttention, QuadraticAttention
from satconv.attention import folded as folded_module
from satconv.attention.base import fold_following
from satconv.attention.routes import EXPLICIT, SHARED_ROUTES, Routes, using_routes
from satconv.attention.folded import (SoftmaxDropoutMix, fold_query_key, key_axis_codes, pack_mask, window_codes,
                                      unpack_mask)
from satconv.models import build_model

EXACT = dict(rtol=0, atol=1e-12)  # float64, same arithmetic up to summation order
#: bf16 has an 8-bit mantissa; logits of 6 layers compound it: relative L2 error of the logits
BF16_REL = 3e-2
#: inductor reorders float32 reductions and fuses kernels
COMPILE_REL = 1e-3


def _explicit_combine(module, probs, v):
    """``softmax(A) V`` per head by broadcasting, heads concatenated, then ``W_out``."""
    b = v.shape[0]
    out = (probs.expand(b, -1, -1, -1) @ v.expand(-1, probs.shape[1], -1, -1))  # (B, H, N, D)
    return module.proj(out.transpose(1, 2).reshape(b, out.shape[2], -1))


@pytest.mark.parametrize("route", SHARED_ROUTES)
@pytest.mark.parametrize("shared_probs", [True, False])
def test_combine_routes_equal_broadcast_product(shared_probs, route):
    """Every route of AttentionBase.combine, with gradients to the probabilities, values and W_out."""
    torch.manual_seed(0)
    m = QuadraticAttention(6, 3).double()
    b, n = 4, 12
    probs = torch.softmax(torch.randn(1 if shared_probs else b, 3, n, n, dtype=torch.float64), -1).requires_grad_()
    v = torch.randn(b, 1, n, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(b, n, 6, dtype=torch.float64)

    def run(fn):
        out = fn(probs, v)
        return (out, *torch.autograd.grad((out * g).sum(), [probs, v, m.proj.weight]))
    with using_routes(m, Routes(shared=route)):
        got = run(m.combine)
    for a, e in zip(got, run(lambda p, x: _explicit_combine(m, p, x))):
        torch.testing.assert_close(a, e, **EXACT)


def test_shared_probability_product_in_autocast_keeps_the_input_dtypes():
    """SharedProbabilityProduct (the bmm_gemm route) under CPU bf16 autocast: the product runs in bf16,
    and the float32 probabilities and values get float32 gradients close to the float64 ones (the
    gradient of P is the one GEMM over batch and features, of P^T the batched one)."""
    from satconv.attention.shared import SharedProbabilityProduct
    torch.manual_seed(0)
    p64 = torch.softmax(torch.randn(15, 12, dtype=torch.float64), -1)
    x64, g64 = torch.randn(4, 12, 8, dtype=torch.float64), torch.randn(4, 15, 8, dtype=torch.float64)
    p, x = p64.float().requires_grad_(), x64.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SharedProbabilityProduct.apply(p, x)
    assert out.dtype == torch.bfloat16
    d_p, d_x = torch.autograd.grad(out, [p, x], g64.to(torch.bfloat16))
    assert d_p.dtype == d_x.dtype == torch.float32
    ref = torch.einsum("rn,bnd->brd", p64, x64)
    ref_p, ref_x = torch.einsum("brd,bnd->rn", g64, x64), torch.einsum("rn,brd->bnd", p64, g64)
    for got, want in ((out, ref), (d_p, ref_p), (d_x, ref_x)):
        assert _rel(got, want) < 2e-2


def test_query_position_gather_equals_full_index():
    """The per-axis gather of q.r equals indexing the (N, N) relative-offset table directly."""
    torch.manual_seed(0)
    m = LearnedRelativeAttention(8, 2, variant="content_query_position", max_position=6).double()
    h, w = 4, 5
    q = torch.randn(3, 2, h * w, 8, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = rows[None, :] - rows[:, None] + 5  # key - query, shifted into the table
    d_col = cols[None, :] - cols[:, None] + 5
    e_row, e_col = m.row_embeddings.weight, m.col_embeddings.weight
    expected = (torch.einsum("bhqc,qkc->bhqk", q[..., :4], e_row[d_row])
                + torch.einsum("bhqc,qkc->bhqk", q[..., 4:], e_col[d_col]))
    torch.testing.assert_close(m.query_position_scores(q, h, w), expected, **EXACT)


def _forward_and_grads(m, x, key_source, return_attention=True, then=None):
    x = x.clone().requires_grad_()
    extra = {} if then is None else {"then": then}
    out, probs = m(x, return_attention=True, key_source=key_source, **extra) if return_attention else \
        (m(x, key_source=key_source, **extra), None)
    params = [*m.parameters(), *([] if then is None else then.parameters())]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                [x, *params], allow_unused=True, materialize_grads=True)
    return out, probs, grads


def _following_layer(m, follow: bool):
    """``None``, or a random float64 ``Linear(out_dim -> 5)`` that follows ``m`` (the encoder block's
    ``dense``, which the fast paths fold into ``W_out``)."""
    if not follow:
        return None
    then = torch.nn.Linear(m.out_dim, 5).double()
    for p in then.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return then


FOLLOW = pytest.mark.parametrize("follow", [False, True], ids=["alone", "dense folded into W_out"])


FOLDED = {
    "content, heads concatenated": lambda: ContentAttention(8, 3),
    "content, value projection folded into W_out": lambda: ContentAttention(8, 3, value_proj=True, out_dim=6),
    "content, head_dim > dim": lambda: ContentAttention(8, 2, head_dim=10, value_proj=True),
    "learned q.k + q.r": lambda: LearnedRelativeAttention(8, 3, variant="content_query_position", max_position=6),
    "learned position-only (shared probabilities)": lambda: LearnedRelativeAttention(8, 3, max_position=6),
    "quadratic (shared probabilities)": lambda: QuadraticAttention(8, 3),
}


@FOLLOW
@pytest.mark.parametrize("shared", SHARED_ROUTES)
@pytest.mark.parametrize("return_attention", [True, False], ids=["with probabilities", "fused softmax-dropout"])
@pytest.mark.parametrize("hierarchical", [False, True], ids=["own keys", "key_source"])
@pytest.mark.parametrize("name", FOLDED)
def test_fast_path_equals_explicit_path_with_gradients(name, hierarchical, return_attention, shared, follow):
    """Folded weights and shared-probability products compute eq. (2) exactly: outputs, probabilities and
    every gradient agree with the explicit route in float64 (biases and weights random, not zero).  Without
    ``return_attention`` the folded route runs :class:`SoftmaxDropoutMix`.  With a following layer
    (``then``) the fast paths multiply it into ``W_out`` and the explicit route applies the two in turn."""
    torch.manual_seed(0)
    m = FOLDED[name]().double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    then = _following_layer(m, follow)
    x = torch.randn(3, 4, 5, 8, dtype=torch.float64)
    ks = torch.randn(3, 4, 5, 8, dtype=torch.float64) if hierarchical else None
    with using_routes(m, Routes(shared=shared)):
        fast = _forward_and_grads(m, x, ks, return_attention, then)
    with using_routes(m, EXPLICIT):
        ref = _forward_and_grads(m, x, ks, return_attention, then)
    if follow:
        assert fast[0].shape[-1] == 5
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    if return_attention:
        torch.testing.assert_close(fast[1].expand_as(ref[1]), ref[1], rtol=0, atol=1e-12)
    for a, b in zip(fast[2], ref[2]):  # the key bias: zero by softmax shift invariance on both routes
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


SDPA_ROUTED = ["content, heads concatenated", "content, value projection folded into W_out", "learned q.k + q.r"]


def _count_sdpa_calls(monkeypatch) -> list:
    calls, real = [], folded_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(folded_module.F, "scaled_dot_product_attention", counting)
    return calls


@FOLLOW
@pytest.mark.parametrize("hierarchical", [False, True], ids=["own keys", "key_source"])
@pytest.mark.parametrize("name", SDPA_ROUTED)
def test_sdpa_route_equals_explicit_path_with_gradients(name, hierarchical, follow, monkeypatch):
    """The ``"sdpa"`` route (one scaled_dot_product_attention of N*heads queries, the q.r term as
    extra query/key features, rowsum(P) as a ones column) computes eq. (2) exactly: outputs and every
    gradient agree with the explicit route in float64.  Feature counts (8 + 4 + 5, 8 + 1) are not
    multiples of the alignment, so the zero padding is exercised too."""
    calls = _count_sdpa_calls(monkeypatch)
    torch.manual_seed(0)
    m = FOLDED[name]().double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    then = _following_layer(m, follow)
    x = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    ks = torch.randn(3, 4, 5, 8, dtype=torch.float64) if hierarchical else None
    weights = torch.linspace(-1, 1, 3 * 4 * 5 * (5 if follow else m.out_dim), dtype=torch.float64).view(3, 4, 5, -1)
    params = [*m.parameters(), *([] if then is None else then.parameters())]

    def run():
        out = m(x, key_source=ks, **({} if then is None else {"then": then}))
        return out, torch.autograd.grad((out * weights).sum(), [x, *params], allow_unused=True,
                                        materialize_grads=True)
    with using_routes(m, Routes(dense="sdpa")):
        fast = run()
    assert len(calls) == 1 and calls[0][2] == 4 * 5 * 3  # one attention of N * heads queries
    with using_routes(m, EXPLICIT):
        ref = run()
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    for a, b in zip(fast[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["content, value projection folded into W_out", "learned q.k + q.r"])
def test_sdpa_route_dropout_is_unbiased(name):
    """In training the route drops probabilities (outputs vary) and, as the layer is linear in the
    probabilities, the mean over independent masks is the eval-mode output (within 5 standard errors)."""
    torch.manual_seed(0)
    m = FOLDED[name]().double()
    m.attn_drop.p = 0.5
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    many = x.expand(4000, -1, -1, -1)
    with using_routes(m, Routes(dense="sdpa")), torch.no_grad():
        ref = m.eval()(x)[0]
        samples = m.train()(many)  # (4000, 2, 3, out_dim): independent masks per image
    std = samples.std(0)
    assert (std > 1e-3).all()
    assert ((samples.mean(0) - ref).abs() < 5 * std / 4000 ** 0.5 + 1e-9).all()


@pytest.mark.parametrize("size, max_position", [(4, 6), (6, 6), (1, 3)])
def test_window_codes_pick_the_relative_table_entries(size, max_position):
    """The one-hot product of the folded q.r route is the gather ``table[k - q + M - 1]``, exactly."""
    table = torch.randn(3, 2 * max_position - 1, 5, dtype=torch.float64)  # (heads, 2M-1, D)
    codes = window_codes(size, max_position, dtype=torch.float64)
    q, k = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    expected = table[:, k - q + max_position - 1].reshape(3, size * size, 5)  # (heads, q*k, D)
    torch.testing.assert_close(codes @ table, expected, rtol=0, atol=0)
    assert codes.sum(-1).eq(1).all()


def test_key_axis_codes_pick_row_and_column_logits():
    """A query's [row logits, column logits] against the key codes is row[r_k] + col[c_k] for every key."""
    h, w = 3, 4
    codes = key_axis_codes(h, w, dtype=torch.float64)
    row, col = torch.randn(h, dtype=torch.float64), torch.randn(w, dtype=torch.float64)
    expected = (row[:, None] + col[None, :]).reshape(-1)  # keys row-major
    torch.testing.assert_close(codes @ torch.cat([row, col]), expected, rtol=0, atol=1e-15)


def test_unknown_route_is_refused_and_the_config_offers_every_route():
    import typing
    from satconv.attention import DENSE_ROUTES
    with pytest.raises(ValueError, match="folded, sdpa"):
        Routes(dense="flash")
    from satconv.attention import SHARED_ROUTES as shared_routes
    hints = typing.get_type_hints(C.TrainConfig)
    assert typing.get_args(hints["attention_route"]) == DENSE_ROUTES
    assert typing.get_args(hints["shared_route"]) == shared_routes
    with pytest.raises(ValueError, match="bmm_gemm, einsum, bmm"):
        Routes(shared="loop")
    with pytest.raises(C.ConfigError, match="train.attention_route"):
        C.override(C.ExperimentConfig(), ["train.attention_route=flash"])


@pytest.mark.parametrize("n", [16, 13])
def test_mask_packing_round_trips(n):
    keep = torch.rand(3, 5, n) > 0.3
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-n // 8))
    assert torch.equal(unpack_mask(packed, n), keep)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_softmax_dropout_mix_matches_autograd_with_the_same_mask(p):
    """The fused softmax, dropout and ``P~ V`` (saving the probabilities and a packed mask, recomputing the
    dropped probabilities in backward) has plain autograd's outputs and gradients, for the mask it drew
    (reproduced from the seed: its one random draw is a ``bernoulli_`` of the probabilities' shape)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 13, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 13, 5, dtype=torch.float64, requires_grad=True)
    g_mixed, g_rowsum = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    torch.manual_seed(7)
    mixed, rowsum = SoftmaxDropoutMix.apply(logits, values, p, torch.float64)
    got = torch.autograd.grad((mixed * g_mixed).sum() + (rowsum * g_rowsum).sum(), [logits, values])
    torch.manual_seed(7)
    keep = torch.empty(2, 6, 13, dtype=torch.uint8).bernoulli_(1 - p).bool()  # satconv.dropout.keep_mask's draw
    dropped = torch.softmax(logits, -1) * keep / (1 - p)
    ref_mixed, ref_rowsum = dropped @ values, dropped.sum(-1)
    expected = torch.autograd.grad((ref_mixed * g_mixed).sum() + (ref_rowsum * g_rowsum).sum(), [logits, values])
    torch.testing.assert_close(mixed, ref_mixed, rtol=0, atol=1e-12)
    torch.testing.assert_close(rowsum, ref_rowsum, rtol=0, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if p:
        assert 0.2 < 1 - keep.float().mean() < 0.6  # the mask really drops entries


def test_softmax_dropout_mix_saves_the_probabilities_low_and_the_mask_packed():
    """In bf16 only the bf16 probabilities, the packed mask and the values are kept for backward (no
    dropped probabilities, no byte-per-entry mask); the gradient stays within bf16 rounding of float32's."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16, requires_grad=True)
    values = torch.randn(2, 16, 5).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        mixed, _ = SoftmaxDropoutMix.apply(logits, values, 0.25, torch.bfloat16)
    assert sorted(saved, key=str) == sorted([(torch.bfloat16, (2, 6, 16)), (torch.uint8, (2, 6, 2)),
                                             (torch.bfloat16, (2, 16, 5))], key=str)
    g = torch.randn(2, 6, 5).bfloat16()
    (low,) = torch.autograd.grad((mixed * g).sum(), logits)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


@pytest.mark.parametrize("name", ["paper_learned", "paper_quadratic", "paper_learned_content"])
def test_encoder_fast_path_equals_explicit_model_with_gradients(name):
    """The paper's encoder on its fast paths (the block's ``dense`` multiplied into ``W_out``, shared
    probabilities, folded queries) computes the explicit model, attention then ``dense``: logits and every
    parameter's gradient agree in float64 (two blocks, evaluation mode so that no dropout is drawn)."""
    torch.manual_seed(0)
    cfg = C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", ["model.num_layers=2"])
    model = build_model(cfg).double().eval()
    assert all(block.attn.folds_then for block in model.blocks)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    w = torch.randn(2, cfg.model.num_classes, dtype=torch.float64)

    def run():
        logits = model(x)
        return logits, torch.autograd.grad((logits * w).sum(), list(model.parameters()), allow_unused=True,
                                           materialize_grads=True)  # the key bias: zero by shift invariance
    fast = run()
    for block in model.blocks:  # the reference: attention alone, then the block's dense, all explicit
        block.attn.folds_then = False
    with using_routes(model, EXPLICIT):
        ref = run()
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(fast[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(p.stem for p in (C.REPO_ROOT / "configs").glob("*.yaml")))
def test_route_family_names_the_route_setting_the_layers_read(name, monkeypatch):
    """``route_family`` (which the engineering appendix and bench labels use) agrees with what a forward pass
    does: the fused attention runs under the ``sdpa`` route exactly when a layer says ``"dense"``, and the
    shared-probability route is consulted exactly when a layer says ``"shared"`` (quick profile, 2 images)."""
    import satconv.attention.base as base
    cfg = C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", profile="quick")
    model = build_model(cfg).train()
    families = {layer.route_family for layer in model.attention_layers() if hasattr(layer, "route_family")}
    sdpa_calls = _count_sdpa_calls(monkeypatch)
    shared_calls, real_shared = [], base.SharedProbabilityProduct.apply  # the default shared route's product
    monkeypatch.setattr(base.SharedProbabilityProduct, "apply", lambda *a: shared_calls.append(1) or real_shared(*a))
    size = cfg.model.image_size
    with torch.no_grad(), using_routes(model, Routes(dense="sdpa")):
        model(torch.randn(2, cfg.model.in_channels, size, size))
    assert bool(sdpa_calls) == ("dense" in families)
    assert bool(shared_calls) == ("shared" in families)


def test_weight_folds_take_the_autocast_dtype():
    """Under autocast the fold products are low-precision GEMMs (tensor cores on a GPU, not float32 on the
    CUDA cores); outside autocast they keep float32, and float64 weights stay float64."""
    torch.manual_seed(0)
    proj, then, m = torch.nn.Linear(12, 6), torch.nn.Linear(6, 5), ContentAttention(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fold_following(proj, then)[0].dtype == torch.bfloat16
        assert fold_query_key(m.query, m.key, 3, scale=0.5)[0].dtype == torch.bfloat16
    assert fold_following(proj, then)[0].dtype == torch.float32
    assert fold_following(proj.double(), then.double())[0].dtype == torch.float64


@pytest.mark.parametrize("name", ["paper_learned", "paper_learned_content", "re_vit"])
def test_bf16_fast_paths_match_the_float32_explicit_model_on_cpu(name):
    """The fast paths under bf16 autocast (folds in bf16, the block's dense folded into W_out) against the
    explicit float32 model, within the bf16 tolerance of the GPU tests (two blocks, CPU autocast)."""
    torch.manual_seed(0)
    model = build_model(C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", ["model.num_layers=2"])).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with using_routes(model, EXPLICIT):
            ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert _rel(low, ref) < BF16_REL


def test_folded_weights_reproduce_query_key_products():
    """``x M_h + c_h`` against y equals ``q_h . k_h`` minus the per-query constant ``q_h . b_h``."""
    torch.manual_seed(0)
    m = ContentAttention(6, 2).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    weight, bias = fold_query_key(m.query, m.key, 2, scale=1.0)
    folded = (x @ weight.t() + bias).view(5, 2, 6)  # (N_q, H, D)
    q, k = m.query(x).view(5, 2, 6), m.key(y).view(7, 2, 6)
    expected = torch.einsum("qhc,khc->qhk", q, k) - torch.einsum("qhc,hc->qh", q, m.key.bias.view(2, 6))[..., None]
    torch.testing.assert_close(torch.einsum("qhd,kd->qhk", folded, y), expected, rtol=0, atol=1e-12)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


ROUTE_CASES = ([(n, "folded", "einsum") for n in ("paper_quadratic", "paper_learned", "paper_learned_content", "re_vit")]
               + [(n, "sdpa", "einsum") for n in ("paper_learned_content", "re_vit")]
               + [("paper_learned", "folded", r) for r in ("bmm", "wfirst", "bmm_gemm")])


def _gpu_model(name: str, layers: int = 2):
    """A paper config on the GPU in eval mode, with fewer layers (the fast paths are per layer; compiling
    six of them would only make the test slower)."""
    return build_model(C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", [f"model.num_layers={layers}"])).cuda().eval()


@cuda
@pytest.mark.parametrize("name, dense, shared", ROUTE_CASES)
def test_bf16_and_compile_match_fp32_on_gpu(name, dense, shared):
    """Fast paths in bf16 autocast, and compiled in float32, against the explicit float32 model, for every
    route (sdpa: fused attention kernels; bmm and wfirst: the shared-probability GEMMs)."""
    torch.manual_seed(0)
    model = _gpu_model(name)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        with using_routes(model, EXPLICIT):
            ref = model(x)
        with using_routes(model, Routes(dense=dense, shared=shared)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = model(x)
            fast = torch.compile(model)(x)
    assert _rel(low, ref) < BF16_REL
    assert _rel(fast, ref) < COMPILE_REL


@cuda
@pytest.mark.parametrize("value_proj", [False, True], ids=["content", "ViT-like"])
def test_sdpa_route_runs_a_fused_kernel_on_gpu(value_proj):
    """At the paper's sizes (9 heads of width 400, 16 x 16 tokens, q.r features) the route's attention is one
    the memory-efficient fused kernel takes, forward and backward, with dropout (the math fallback is
    excluded here, so an unsupported shape fails instead of silently materialising the probabilities)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if value_proj:
        m = ContentAttention(400, 9, value_proj=True, dropout=0.1).cuda().train()
    else:
        m = LearnedRelativeAttention(400, 9, variant="content_query_position", max_position=16, dropout=0.1)
        m = m.cuda().train()
    x = torch.randn(2, 16, 16, 400, device="cuda", requires_grad=True)
    with using_routes(m, Routes(dense="sdpa")), torch.autocast("cuda", dtype=torch.bfloat16), \
            sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = m(x)
        out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


@cuda
@pytest.mark.parametrize("name", ["paper_learned_content", "re_vit"])
def test_sdpa_route_gradients_match_the_folded_route_on_gpu(name):
    """A bf16 training step's gradients (no dropout) agree between the sdpa and folded routes."""
    torch.manual_seed(0)
    model = _gpu_model(name)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    grads = {}
    for route in ("folded", "sdpa"):
        model.zero_grad(set_to_none=True)
        with using_routes(model, Routes(dense=route)), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
        grads[route] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert _rel(grads["sdpa"], grads["folded"]) < BF16_REL


@cuda
def test_return_attention_is_exact_on_gpu():
    """Probabilities returned under autocast are the float32 softmax (rows sum to 1)."""
    m = ContentAttention(16, 2).cuda()
    x = torch.randn(2, 4, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, probs = m(x, return_attention=True)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(2, 2, 16, device="cuda"), rtol=0, atol=1e-2)


def test_folded_path_runs_on_the_meta_device():
    """FLOP counting builds models on ``meta``: the fast path must run there (no autocast query)."""
    with torch.device("meta"):
        m = LearnedRelativeAttention(8, 2, variant="content_query_position", max_position=4)
        out = m(torch.randn(2, 3, 3, 8))
    assert out.shape == (2, 3, 3, 8) and out.device.type == "meta"


def test_layer_norm_keeps_the_autocast_dtype():
    """Under autocast the model's LayerNorm returns bf16 computed from float32 statistics (within bf16
    rounding of ``nn.LayerNorm`` in float32); outside autocast and on the explicit route it is
    ``nn.LayerNorm`` exactly (autocast's float32 output)."""
    from satconv.models.common import LayerNorm
    torch.manual_seed(0)
    ln, ref = LayerNorm(16, eps=1e-12), torch.nn.LayerNorm(16, eps=1e-12)
    for p in ln.parameters():
        torch.nn.init.normal_(p)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(4, 7, 16) * 3 + 1
    torch.testing.assert_close(ln(x), ref(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ln(x)
        with using_routes(ln, EXPLICIT):
            full = ln(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, ref(x), rtol=0, atol=0)
    assert _rel(low, ref(x)) < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g_low,) = torch.autograd.grad(ln(x).float().sum(), ln.weight)
    assert g_low.dtype == torch.float32  # the float32 parameter gets a float32 gradient
