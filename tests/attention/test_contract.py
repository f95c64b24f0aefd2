"""The interface every mechanism of :data:`satconv.attention.ATTENTION` promises, checked for each entry.

``x: (B, height, width, dim) -> (B, height, width, out_dim)``; with ``return_attention=True`` also
``probs: (B or 1, num_heads, N, N)`` taken before dropout, rows summing to 1 where the class says
``row_stochastic``; ``key_source`` feeds the keys or is ignored; gradients reach every parameter that
can influence the output; constructor arguments the classes refuse raise ``ValueError``.  Permutations:
content-only attention is equivariant to any permutation of the pixels, the positional and local
mechanisms are not; every mechanism is equivariant to a permutation of the batch.

Every registry entry needs a recipe in :data:`RECIPES` (a newly registered mechanism fails here until
it has one).  Numerical agreement with the papers' formulas lives in the per-mechanism files.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from satconv.attention import ATTENTION, AttentionBase
from satconv.attention.routes import EXPLICIT, using_routes
from tests.reference import assert_close

DIM, HEADS, BATCH = 8, 2, 2
GRID = (4, 5)  # non-square, larger than a 3x3 window: footprints are cut at the border
#: float64 throughout; only summation order differs between the compared computations
F64_ATOL = 1e-10
#: a gradient "reaches" a parameter when its largest entry exceeds this (rounding noise is ~1e-16)
REACHES = 1e-6


@dataclass(frozen=True)
class Case:
    """One way to build a registered mechanism: ``ATTENTION[name](DIM, HEADS, **kwargs)``.

    Attributes:
        kwargs: constructor keywords.
        uses_keys: ``key_source`` feeds the keys (``False``: it is ignored).
        input_independent: the probabilities depend only on the grid (the layer's ``input_independent``).
        content_only: no positional term, so the layer is equivariant to any pixel permutation.
        local: attends only within the ``kernel_size x kernel_size`` window around the query.
        zero_grad: parameters whose gradient is zero in exact arithmetic (a term that cancels).
        zero_grad_train: further such parameters in training mode only (a shift that BatchNorm's
            batch mean removes).
    """

    kwargs: dict
    uses_keys: bool
    input_independent: bool = False
    content_only: bool = False
    local: bool = False
    zero_grad: tuple[str, ...] = ()
    zero_grad_train: tuple[str, ...] = ()


# Analytically zero gradients:
# * a logit term constant along the keys cancels in the softmax (q . b_key; the learned
#   position-only head biases; SAN pairwise's last gamma bias, one logit per group for every key);
# * SAN pairwise's position bias cancels in P(p_i) - P(p_j);
# * in training mode SAN's first BatchNorm subtracts the batch mean of every feature, so a constant
#   shift of phi (query.bias) or of phi - psi (key.bias, pairwise) has no effect.
RECIPES: dict[str, dict[str, Case]] = {
    "quadratic": {
        "isotropic": Case(dict(), uses_keys=False, input_independent=True),
        "isotropic_split_out_dim": Case(dict(head_dim=4, out_dim=5), uses_keys=False, input_independent=True),
        "anisotropic": Case(dict(isotropic=False), uses_keys=False, input_independent=True),
        "anisotropic_split": Case(dict(isotropic=False, head_dim=2), uses_keys=False, input_independent=True),
    },
    "learned_relative": {
        "position_only": Case(dict(max_position=6), uses_keys=False, input_independent=True,
                              zero_grad=("head_keys_row.bias", "head_keys_col.bias")),
        "position_only_split": Case(dict(max_position=6, head_dim=2), uses_keys=False, input_independent=True,
                                    zero_grad=("head_keys_row.bias", "head_keys_col.bias")),
        "query_position": Case(dict(max_position=6, variant="query_position"), uses_keys=False),
        "query_position_split": Case(dict(max_position=6, variant="query_position", head_dim=2), uses_keys=False),
        "content_query_position": Case(dict(max_position=6, variant="content_query_position"), uses_keys=True,
                                       zero_grad=("key.bias",)),
        "content_query_position_split_out_dim": Case(
            dict(max_position=6, variant="content_query_position", head_dim=2, out_dim=5), uses_keys=True,
            zero_grad=("key.bias",)),
    },
    "content": {
        "concat": Case(dict(), uses_keys=True, content_only=True, zero_grad=("key.bias",)),
        "split_out_dim": Case(dict(head_dim=2, out_dim=5), uses_keys=True, content_only=True,
                              zero_grad=("key.bias",)),
    },
    "san_pairwise": {
        "k3": Case(dict(kernel_size=3), uses_keys=True, local=True, zero_grad=("position.bias", "gamma.5.bias"),
                   zero_grad_train=("query.bias", "key.bias")),
        "k5_rel2_out_dim": Case(dict(kernel_size=5, rel_dim=2, out_dim=4), uses_keys=True, local=True,
                                zero_grad=("position.bias", "gamma.5.bias"),
                                zero_grad_train=("query.bias", "key.bias")),
    },
    "san_patchwise": {
        "k3": Case(dict(kernel_size=3), uses_keys=True, local=True, zero_grad_train=("query.bias",)),
        "k5_rel2_out_dim": Case(dict(kernel_size=5, rel_dim=2, out_dim=4), uses_keys=True, local=True,
                                zero_grad_train=("query.bias",)),
    },
    "sasa": {
        "k3": Case(dict(kernel_size=3), uses_keys=True, local=True),  # head_dim = dim // heads, value projection
        "k3_head_dim_out_dim": Case(dict(kernel_size=3, head_dim=6, out_dim=5), uses_keys=True, local=True),
        "k3_raw_values": Case(dict(kernel_size=3, head_dim=DIM), uses_keys=True, local=True),
        "k7_wider_than_grid": Case(dict(kernel_size=7), uses_keys=True, local=True),
    },
    "fcvit": {
        "k3_compete": Case(dict(kernel_size=3), uses_keys=False, local=True),
        "k5_mlp_out_dim": Case(dict(kernel_size=5, compete=False, out_dim=6), uses_keys=False, local=True),
    },
}

#: constructor arguments every mechanism refuses with ``ValueError`` (``(keywords, message pattern)``;
#: ``dim``/``num_heads`` override :data:`DIM`/:data:`HEADS`)
BAD_FOR_ALL = [
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=-1), "num_heads"),
    (dict(dim=0), None),  # SASA words it as an odd head_dim (dim // num_heads = 0)
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(head_dim=4, value_proj=False), "head_dim"),  # head_dim != dim needs values (SAN, FCViT: no head_dim)
]
#: further refusals of single mechanisms
BAD_ARGUMENTS: dict[str, list[tuple[dict, str]]] = {
    "quadratic": [(dict(init_center_std=-1.0), "init_center_std"), (dict(init_spread_std=-1.0), "init_spread_std")],
    "learned_relative": [(dict(variant="relative"), "variant"),
                         (dict(head_dim=3, variant="query_position"), "head_dim must be even"),
                         (dict(head_dim=3, variant="content_query_position"), "head_dim must be even"),
                         (dict(max_position=0), "max_position")],
    "content": [],
    "san_pairwise": [(dict(head_dim=4), "head_dim"), (dict(value_proj=False), "value_proj"),
                     (dict(num_heads=3), "out_dim"), (dict(num_heads=4, out_dim=6), "out_dim"),
                     (dict(kernel_size=4), "kernel_size"), (dict(kernel_size=0), "kernel_size")],
    "san_patchwise": [(dict(head_dim=4), "head_dim"), (dict(value_proj=False), "value_proj"),
                      (dict(num_heads=3), "out_dim"), (dict(kernel_size=4), "kernel_size")],
    "sasa": [(dict(dim=12, num_heads=4), "even"), (dict(dim=10, num_heads=4), "divisible"),
             (dict(head_dim=3), "even"), (dict(kernel_size=2), "kernel_size")],
    "fcvit": [(dict(head_dim=4), "head_dim"), (dict(value_proj=True), "value_proj"),
              (dict(dim=18, num_heads=4), "multiple"), (dict(kernel_size=6), "kernel_size")],
}


def _cases():
    """``(name, case id)`` for every registry entry; an entry without a recipe yields ``(name, None)``."""
    out = []
    for name in ATTENTION:
        ids = list(RECIPES.get(name, {})) or [None]
        out += [pytest.param(name, cid, id=f"{name}-{cid or 'NO_RECIPE'}") for cid in ids]
    return out


CASES = _cases()


def build(name: str, cid: str | None, dtype=torch.float64, **extra) -> tuple[nn.Module, Case]:
    """A seeded layer of case ``cid`` of ``ATTENTION[name]`` in ``dtype``, training mode."""
    if cid is None:
        pytest.fail(f"ATTENTION[{name!r}] has no construction recipe in tests/attention/test_contract.py: "
                    f"add RECIPES[{name!r}] and BAD_ARGUMENTS[{name!r}]")
    case = RECIPES[name][cid]
    torch.manual_seed(0)
    return ATTENTION[name](DIM, HEADS, **{**case.kwargs, **extra}).to(dtype), case


def inputs(batch=BATCH, grid=GRID, dtype=torch.float64, seed=1, requires_grad=False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *grid, DIM, generator=gen, dtype=dtype).requires_grad_(requires_grad)


def permute_pixels(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` with its pixels (row-major) reordered by ``perm``."""
    b, h, w, c = t.shape
    return t.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c)


def window_mask(height: int, width: int, kernel_size: int) -> torch.Tensor:
    """``(N, N)`` bool: key inside the ``k x k`` window centred on the query."""
    r = torch.arange(height).repeat_interleave(width)
    c = torch.arange(width).repeat(height)
    half = kernel_size // 2
    return ((r[None] - r[:, None]).abs() <= half) & ((c[None] - c[:, None]).abs() <= half)


def has_batchnorm(m: nn.Module) -> bool:
    return any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())


# ---------------------------------------------------------------------------------------------------
def test_every_registry_entry_has_a_recipe_and_the_interface():
    assert set(RECIPES) == set(ATTENTION), "RECIPES must cover exactly the ATTENTION registry"
    assert set(BAD_ARGUMENTS) == set(ATTENTION), "BAD_ARGUMENTS must cover exactly the ATTENTION registry"
    for name, cls in ATTENTION.items():
        assert issubclass(cls, AttentionBase), name
        assert isinstance(cls.row_stochastic, bool) and isinstance(cls.folds_then, bool), name
        params = inspect.signature(cls.forward).parameters
        assert {"x", "return_attention", "key_source"} <= set(params), name


@pytest.mark.parametrize("name, cid", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grid", [GRID, (1, 1), (1, 3)], ids=["4x5", "1x1", "1x3"])
def test_shapes_dtypes_and_finite_values(name, cid, dtype, grid):
    """``(B, H, W, dim) -> (B, H, W, out_dim)``; probabilities ``(B or 1, heads, N, N)``, one for the batch
    when input-independent; same dtype; finite values and input gradients, in training and eval mode, also
    on a single pixel (where a row-stochastic row is exactly 1)."""
    m, case = build(name, cid, dtype)
    assert m.input_independent == case.input_independent
    assert m.out_dim == case.kwargs.get("out_dim", DIM)
    n = grid[0] * grid[1]
    for training in (True, False):
        m.train(training)
        x = inputs(grid=grid, dtype=dtype, requires_grad=True)
        out = m(x)
        assert out.shape == (BATCH, *grid, m.out_dim) and out.dtype == dtype
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all()

        out2, probs = m(x, return_attention=True)
        assert probs.shape in ((BATCH, m.num_heads, n, n), (1, m.num_heads, n, n)), probs.shape
        if m.input_independent:
            assert probs.shape[0] == 1
        assert probs.dtype == dtype and torch.isfinite(probs).all()
        assert_close(out2, out, atol=F64_ATOL if dtype == torch.float64 else 1e-5)
        if n == 1 and m.row_stochastic:
            assert torch.equal(probs, torch.ones_like(probs))


@pytest.mark.parametrize("name, cid", CASES)
def test_returned_attention(name, cid):
    """Rows sum to 1 exactly when the class says ``row_stochastic`` (softmax: non-negative too); local
    mechanisms weigh only keys in their window (softmax ones: every in-image key of it); a batch axis
    of 1 means the matrix does not depend on the input, one per image means it does."""
    m, case = build(name, cid)
    m.eval()
    x = inputs()
    _, probs = m(x, return_attention=True)
    rows = probs.sum(-1)
    sums_to_one = bool((rows - 1).abs().max() < F64_ATOL)
    assert sums_to_one == m.row_stochastic, f"row sums {rows.min().item():.3g}..{rows.max().item():.3g}"
    if m.row_stochastic:
        assert probs.min() >= 0
    if case.local:
        window = window_mask(*GRID, m.kernel_size).expand_as(probs)
        assert torch.count_nonzero(probs[~window]) == 0
        if m.row_stochastic:  # softmax over the real pixels of the window: all of them, nothing else
            assert torch.equal(probs > 0, window)
    _, probs_other = m(inputs(seed=2), return_attention=True)
    if probs.shape[0] == 1:
        assert_close(probs_other, probs, atol=0)
    else:
        assert (probs[0] - probs[1]).abs().max() > 1e-6
        assert (probs_other - probs).abs().max() > 1e-6


@pytest.mark.parametrize("name, cid", CASES)
def test_probabilities_are_returned_before_dropout(name, cid):
    """Dropout acts in training (different seeds, different outputs) but the returned probabilities are
    the undropped ones; in eval mode it is off."""
    m, _ = build(name, cid, dropout=0.5)
    x = inputs()
    runs = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        runs.append(m(x, return_attention=True))
    (out_a, probs_a), (out_b, probs_b) = runs
    assert (out_a - out_b).abs().max() > 1e-6, "dropout had no effect in training mode"
    assert_close(probs_a, probs_b, atol=F64_ATOL)
    if m.row_stochastic:
        assert_close(probs_a.sum(-1), torch.ones_like(probs_a[..., 0]), atol=F64_ATOL)
    m.eval()
    torch.manual_seed(10)
    out_c = m(x)
    torch.manual_seed(11)
    assert_close(m(x), out_c, atol=0)


@pytest.mark.parametrize("name, cid", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("explicit", [False, True], ids=["fast", "explicit"])
def test_gradients_reach_every_parameter_and_the_inputs(name, cid, training, explicit):
    """Every parameter gets a finite gradient, clearly non-zero unless it cancels analytically (then
    zero up to rounding, or none); ``x`` and, where it feeds the keys, ``key_source`` get one too."""
    m, case = build(name, cid)
    m.train(training)
    x = inputs(requires_grad=True)
    ks = inputs(seed=3, requires_grad=True)
    with using_routes(m, EXPLICIT if explicit else m.routes):
        out = m(x, key_source=ks)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    (out * weights).sum().backward()
    zero = set(case.zero_grad) | (set(case.zero_grad_train) if training else set())
    names = {n for n, _ in m.named_parameters()}
    assert zero <= names, f"recipe names unknown parameters {zero - names}"
    for n, p in m.named_parameters():
        if n in zero:
            assert p.grad is None or p.grad.abs().max() < F64_ATOL, f"{n}: gradient should cancel"
            continue
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        assert p.grad.abs().max() > REACHES, f"{n}: gradient {p.grad.abs().max().item():.3g} is (almost) zero"
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > REACHES
    if case.uses_keys:
        assert torch.isfinite(ks.grad).all() and ks.grad.abs().max() > REACHES
    else:
        assert ks.grad is None


@pytest.mark.parametrize("name, cid", CASES)
def test_key_source_feeds_the_keys_or_is_ignored(name, cid):
    m, case = build(name, cid)
    x = inputs()
    ks = inputs(seed=3)
    out, probs = m(x, return_attention=True)
    out_ks, probs_ks = m(x, key_source=ks, return_attention=True)
    if case.uses_keys:
        assert (out_ks - out).abs().max() > 1e-6 and (probs_ks - probs).abs().max() > 1e-6
        assert_close(m(x, key_source=x), out, atol=F64_ATOL)  # key_source=x is the default
    else:
        assert torch.equal(out_ks, out) and torch.equal(probs_ks, probs)


@pytest.mark.parametrize("name, cid", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_images_of_a_batch_do_not_mix(name, cid, training):
    """Equivariant to a permutation of the batch; each image's output depends on that image only
    (in training mode BatchNorm's batch statistics are the exception)."""
    m, case = build(name, cid)
    m.train(training)
    x = inputs(batch=3)
    ks = inputs(batch=3, seed=3)
    perm = torch.tensor([2, 0, 1])
    out, probs = m(x, key_source=ks, return_attention=True)
    out_p, probs_p = m(x[perm], key_source=ks[perm], return_attention=True)
    assert_close(out_p, out[perm], atol=F64_ATOL)
    assert_close(probs_p, probs[perm] if probs.shape[0] > 1 else probs, atol=F64_ATOL)
    if not (training and has_batchnorm(m)):
        out_1, probs_1 = m(x[1:2], key_source=ks[1:2], return_attention=True)
        assert_close(out_1, out[1:2], atol=F64_ATOL)
        assert_close(probs_1, probs[1:2] if probs.shape[0] > 1 else probs, atol=F64_ATOL)


@pytest.mark.parametrize("name, cid", CASES)
def test_pixel_permutations(name, cid):
    """Content-only attention: ``out(P x) = P out(x)`` and ``probs(P x) = P probs P^T`` for any pixel
    permutation ``P``.  Positional and local mechanisms see where a pixel is: the same does not hold."""
    m, case = build(name, cid)
    m.eval()
    x = inputs()
    ks = inputs(seed=3)
    perm = torch.randperm(GRID[0] * GRID[1], generator=torch.Generator().manual_seed(5))
    out, probs = m(x, key_source=ks, return_attention=True)
    out_p, probs_p = m(permute_pixels(x, perm), key_source=permute_pixels(ks, perm), return_attention=True)
    if case.content_only:
        assert_close(out_p, permute_pixels(out, perm), atol=F64_ATOL)
        assert_close(probs_p, probs[:, :, perm][..., perm], atol=F64_ATOL)
    else:
        assert (out_p - permute_pixels(out, perm)).abs().max() > 1e-3


@pytest.mark.parametrize("name, cid", CASES)
def test_then_is_the_following_linear_layer(name, cid):
    """``folds_then``: ``forward(x, then=L) = L(forward(x))`` (fast paths fold ``L`` into ``W_out``);
    otherwise ``forward`` takes no ``then``."""
    m, _ = build(name, cid)
    if not m.folds_then:
        assert "then" not in inspect.signature(m.forward).parameters
        return
    torch.manual_seed(6)
    then = nn.Linear(m.out_dim, 3).double()
    x = inputs()
    out, probs = m(x, return_attention=True)
    out_then, probs_then = m(x, then=then, return_attention=True)
    assert out_then.shape == (BATCH, *GRID, 3)
    assert_close(out_then, then(out), atol=F64_ATOL)
    assert_close(probs_then, probs, atol=F64_ATOL)


def _bad_arguments():
    out = []
    for name in ATTENTION:
        for kw, match in BAD_FOR_ALL + BAD_ARGUMENTS.get(name, []):
            label = ",".join(f"{k}={v}" for k, v in kw.items())
            out.append(pytest.param(name, kw, match, id=f"{name}-{label}"))
    return out


@pytest.mark.parametrize("name, kw, match", _bad_arguments())
def test_bad_constructor_arguments_raise(name, kw, match):
    kw = dict(kw)
    dim, heads = kw.pop("dim", DIM), kw.pop("num_heads", HEADS)
    with pytest.raises(ValueError, match=match):
        ATTENTION[name](dim, heads, **kw)


@pytest.mark.parametrize("name, cid", CASES)
@pytest.mark.parametrize("shape", [(BATCH, 20, DIM), (BATCH, 1, *GRID, DIM), (BATCH, *GRID, DIM + 2)],
                         ids=["rank3", "rank5", "wrong_dim"])
def test_bad_inputs_raise(name, cid, shape):
    """Inputs of the wrong rank or channel count are refused with a message naming the expected shape
    (``AttentionBase.check_input``), not broadcast into some output or failed deep inside a matmul."""
    m, _ = build(name, cid)
    with pytest.raises(ValueError, match=rf"takes x of shape \(batch, height, width, {DIM}\), got"):
        m(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("name, cid", CASES)
@pytest.mark.parametrize("ks_shape", [(BATCH + 1, *GRID, DIM), (BATCH, GRID[1], GRID[0], DIM)],
                         ids=["other_batch", "transposed_grid"])
def test_key_source_of_another_shape_is_refused(name, cid, ks_shape):
    """A ``key_source`` must have the shape of ``x`` (same batch, same grid), also where it is ignored."""
    m, _ = build(name, cid)
    with pytest.raises(ValueError, match="key_source must have the shape of x"):
        m(torch.randn(BATCH, *GRID, DIM, dtype=torch.float64), key_source=torch.randn(ks_shape, dtype=torch.float64))
