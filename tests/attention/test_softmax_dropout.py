"""satconv.attention.softmax_dropout: softmax and dropout as opaque operators, against the plain
expressions, and the training forward of input-independent attention against an explicit eq. (2) with the same mask."""
import pytest
import torch

from satconv.attention.quadratic import QuadraticAttention
from satconv.attention.softmax_dropout import dropped_softmax, softmax_dropout
from satconv.dropout import Dropout, keep_mask
from tests.reference import ref_output, ref_quadratic_logits, ref_softmax

HEIGHT, WIDTH, DIM, HEADS, P = 4, 5, 6, 3, 0.3
N = HEIGHT * WIDTH


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    logits = (3 * torch.randn(1, HEADS, N, N, dtype=dtype)).requires_grad_()
    keep = torch.rand(1, HEADS, N, N) > P
    return logits, keep


def test_values_and_gradients_match_the_plain_expressions():
    """probs = softmax over keys, dropped = probs * keep / (1 - p); the gradient of any mix of both outputs is
    autograd's of the plain expressions, in float64 to 1e-13."""
    logits, keep = _inputs()
    probs, dropped = softmax_dropout(logits, keep, P)
    ref_probs = ref_softmax(logits.detach()[0])[None]  # per-pair loops, tests/reference.py
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-13)
    torch.testing.assert_close(dropped, ref_probs * keep / (1 - P), rtol=0, atol=1e-13)
    assert probs.dtype == dropped.dtype == torch.float64
    w1, w2 = torch.randn(2, 1, HEADS, N, N, dtype=torch.float64)
    for mix in ((1.0, 0.0), (0.0, 1.0), (0.7, -1.3)):  # dropped only, probs only, both
        (g,) = torch.autograd.grad((mix[0] * w1 * dropped + mix[1] * w2 * probs).sum(), logits, retain_graph=True)
        plain = torch.softmax(logits, -1)
        (ref,) = torch.autograd.grad((mix[0] * w1 * plain * keep / (1 - P) + mix[1] * w2 * plain).sum(), logits)
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-13)
        assert g.dtype == logits.dtype


def test_gradcheck_and_operator_contracts():
    """Finite differences agree (float64), and both operators pass torch.library.opcheck (fake shapes and dtypes,
    schema, autograd registration), in float32 and with a bfloat16 output."""
    logits, keep = _inputs()
    small, k = logits.detach()[:, :1, :5, :5].clone().requires_grad_(), keep[:, :1, :5, :5]
    assert torch.autograd.gradcheck(lambda a: softmax_dropout(a, k, P), (small,))
    scale = 1 / (1 - P)
    f32 = logits.detach().float()
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.satconv.opaque_softmax_dropout.default, (f32, keep, scale, dtype))
        probs, dropped = torch.ops.satconv.opaque_softmax_dropout(f32, keep, scale, dtype)
        assert probs.dtype == torch.float32 and dropped.dtype == dtype
        g = torch.randn_like(dropped)
        torch.library.opcheck(torch.ops.satconv.opaque_softmax_dropout_backward.default,
                              (probs, keep, scale, g, None, torch.float32))


def test_bfloat16_output_is_the_rounded_float32_one():
    logits, keep = _inputs(torch.float32)
    probs, dropped = softmax_dropout(logits, keep, P, torch.bfloat16)
    assert probs.dtype == torch.float32 and dropped.dtype == torch.bfloat16
    assert torch.equal(dropped, (probs * keep / (1 - P)).to(torch.bfloat16))


def test_bad_arguments_are_refused():
    logits, keep = _inputs()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        softmax_dropout(logits, keep, 1.0)
    with pytest.raises(ValueError, match="bool mask of the logits' shape"):
        softmax_dropout(logits, keep[..., :-1], P)
    with pytest.raises(ValueError, match="bool mask"):
        softmax_dropout(logits, keep.float(), P)


def test_compiled_equals_eager_on_cpu():
    """Inside torch.compile (the operators opaque to inductor) the outputs and the gradient are eager's."""
    logits, keep = _inputs(torch.float32)
    w = torch.randn(1, HEADS, N, N)

    def loss(a):
        probs, dropped = softmax_dropout(a, keep, P)
        return (w * dropped).sum() + (probs ** 2).sum()

    (eager,) = torch.autograd.grad(loss(logits), logits)
    (comp,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, dynamic=False)(logits), logits)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-7)



def test_dropped_softmax_over_an_inner_axis():
    """dropped_softmax over axis 2 of a (B, N, K, H) tensor with -inf entries (SASA's and SAN's windows): the
    probabilities are exp / sum over that axis (0 at -inf), the mask is keep_mask's draw for the (B, N, H, K)
    layout moved back, and the gradient is autograd's of the plain expressions (float64).  In evaluation no
    mask is drawn (the generator does not move) and the dropped probabilities are the probabilities."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 5, 4, 3, dtype=torch.float64)
    logits[:, :, 3, 0] = float("-inf")  # one slot outside the image for head 0
    logits.requires_grad_()
    drop = Dropout(P).train()
    torch.manual_seed(3)
    probs, dropped = dropped_softmax(logits, drop, dim=2, dtype=torch.float64)
    torch.manual_seed(3)
    keep = keep_mask((2, 5, 3, 4), P, logits).movedim(-1, 2)  # drawn in the layout with the keys last
    ref = ref_softmax(logits.detach().movedim(2, -1)).movedim(-1, 2)
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-13)
    assert (probs[:, :, 3, 0] == 0).all()
    torch.testing.assert_close(dropped, ref * keep / (1 - P), rtol=0, atol=1e-13)
    w = torch.randn_like(dropped)
    (g,) = torch.autograd.grad((w * dropped).sum(), logits)
    (want,) = torch.autograd.grad((w * torch.softmax(logits, 2) * keep / (1 - P)).sum(), logits)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-13)
    drop.eval()
    state = torch.get_rng_state()
    probs, dropped = dropped_softmax(logits.detach().float(), drop, dim=2, dtype=torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(probs.double(), ref, rtol=0, atol=1e-6)
    assert dropped.dtype == torch.bfloat16 and torch.equal(dropped, probs.to(torch.bfloat16))

@pytest.mark.parametrize("isotropic", [True, False], ids=["isotropic", "anisotropic"])
def test_training_forward_is_eq2_with_one_mask_for_the_batch(isotropic):
    """In training, quadratic attention with dropout p is eq. (2) with softmax(A) * keep / (1 - p) for one mask
    (drawn by keep_mask from the seeded generator), shared by every image; the gradients of the centres and
    spreads are those of that explicit expression (float64)."""
    torch.manual_seed(1)
    m = QuadraticAttention(DIM, HEADS, isotropic=isotropic, init_center_std=1.5, init_spread_std=0.4,
                           dropout=P).double().train()
    x = torch.randn(3, HEIGHT, WIDTH, DIM, dtype=torch.float64)
    torch.manual_seed(7)
    out, probs = m(x, return_attention=True)
    torch.manual_seed(7)
    keep = keep_mask((1, HEADS, N, N), P, x)
    ref_probs = ref_softmax(ref_quadratic_logits(m.attention_centers, m.attention_spreads, HEIGHT, WIDTH))[None]
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-10)
    ref = ref_output(m, ref_probs * keep / (1 - P), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # the gradients: autograd through the layer's own logits (checked against the per-pair reference in
    # test_quadratic.py), the plain softmax and mask, and the reference eq. (2)
    plain = ref_output(m, torch.softmax(m.position_scores(HEIGHT, WIDTH), -1) * keep / (1 - P), x)
    w = torch.randn_like(out)
    params = [m.attention_centers, m.attention_spreads]
    got = torch.autograd.grad((w * out).sum(), params)
    want = torch.autograd.grad((w * plain).sum(), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    assert not keep.all() and keep.any()  # the mask did drop some and keep some
    m.eval()
    torch.testing.assert_close(m(x), ref_output(m, ref_probs, x), rtol=0, atol=1e-10)  # no dropout in evaluation
