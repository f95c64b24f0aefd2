"""satconv.dropout: nn.Dropout's law, one opaque draw per call in compiled graphs."""
import math

import pytest
import torch
from torch import nn

from satconv.dropout import Dropout, dropout, keep_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_with_probability_one_minus_p(device, p):
    """Bernoulli(1 - p) entries: the keep rate of 10^6 draws is within 5 standard errors of 1 - p, and
    neighbouring entries are uncorrelated (the rate of "both kept" is (1 - p)^2)."""
    torch.manual_seed(0)
    m = keep_mask((1000, 1000), p, torch.empty(0, device=device))
    assert m.dtype == torch.bool and m.shape == (1000, 1000) and m.device.type == device
    q, n = 1 - p, m.numel()
    assert abs(m.float().mean().item() - q) < 5 * math.sqrt(q * p / n)
    both = (m[:, 1:] & m[:, :-1]).float().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n // 2))


def test_keep_mask_follows_the_seed_and_rejects_bad_p():
    anchor = torch.empty(0)
    torch.manual_seed(3)
    a = keep_mask((50, 40), 0.3, anchor)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((50, 40), 0.3, anchor, salt=9))  # the salt does not change the draw
    assert not torch.equal(a, keep_mask((50, 40), 0.3, anchor))  # the generator moved on
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            keep_mask((2,), bad, anchor)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Dropout(bad)


def test_dropout_is_nn_dropouts_function_for_its_mask():
    """Survivors scaled by 1 / (1 - p), the rest zero; gradient the same mask and scale; identity in
    evaluation mode and at p = 0 (the very tensor, as nn.Dropout returns it)."""
    torch.manual_seed(0)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    d = Dropout(0.25).train()
    torch.manual_seed(1)
    y = d(x)
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.25, x)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0), rtol=0, atol=1e-15)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, keep.double() / 0.75, rtol=0, atol=1e-15)
    assert d.eval()(x) is x and dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert isinstance(d, nn.Dropout) and d.p == 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_graphs_draw_every_mask_once_and_keep_it_for_backward(device):
    """In a compiled function two dropouts of the same tensor by two modules, and one of another tensor,
    are three draws (not merged), the compiled draws are the eager ones for the same seed, and the
    backward pass uses the forward's mask (not a fresh draw): the gradient's zeros are exactly the output's."""
    d1, d2 = Dropout(0.3), Dropout(0.3)

    def f(x):
        return d1(x), d2(x), dropout(x + 1.0, 0.3)

    modes = [None] + (["reduce-overhead"] if device == "cuda" else [])
    for mode in modes:
        cf = torch.compile(f, mode=mode, dynamic=False)
        x = torch.rand(128, 96, device=device) + 0.5  # no zeros of its own
        for _ in range(3):  # CUDA graphs: record, then replay
            torch.manual_seed(5)
            xa = x.clone().requires_grad_()
            a, b, c = cf(xa)
            (ga,) = torch.autograd.grad(a.sum(), xa)
            assert ((a == 0) == (ga == 0)).all()
            for u, v in ((a, b), (a, c), (b, c)):
                assert 0.2 < ((u == 0) != (v == 0)).float().mean().item() < 0.6  # independent masks
            if device == "cpu":
                torch.manual_seed(5)
                for got, want in zip((a, b, c), f(x)):
                    assert torch.equal(got, want)


@pytest.mark.parametrize("name, per_block, extra", [("paper_learned_content", 3, 0), ("re_vit", 3, 1),
                                                    ("paper_learned", 3, 0)])
def test_every_mask_of_a_model_has_arguments_of_its_own(name, per_block, extra):
    """Compiled graphs may merge custom-operator calls with equal arguments (torch 2.11 does, whatever the
    tag), so every ``keep_mask`` of a training forward pass must differ from the others in its anchor
    tensor or its salt: per block the attention's mask (the batch-shared one of position-only attention
    too) and the two hidden dropouts, plus ViT's embedding dropout."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from satconv import config as C
    from satconv.models import build_model

    cfg = C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", ["model.num_layers=2"])
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 32, 32)
    gm = make_fx(lambda t: model(t))(x)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.satconv.keep_mask.default]
    assert len(calls) == 2 * per_block + extra
    keys = {(n.args[2], n.args[3]) for n in calls}
    assert len(keys) == len(calls)


def test_compiled_model_trains_with_eagers_dropout_masks():
    """The content model compiled by inductor (CPU) draws the very masks eager PyTorch draws for the same
    seed, attention and hidden dropout alike, so in training mode its logits and gradients match eager's
    to float32 rounding; a model whose masks were merged or redrawn would not."""
    from satconv import config as C
    from satconv.models import build_model
    from satconv.steps import compile_model

    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned_content.yaml",
                 ["model.num_layers=1", "model.dropout=0.3", "model.attention.dropout=0.3"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 32, 32)

    def step(m):
        torch.manual_seed(11)
        logits = m(x)
        return logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()), allow_unused=True,
                                           materialize_grads=True)

    eager_logits, eager_grads = step(model)
    fast_logits, fast_grads = step(compile_model(model, "default"))
    torch.manual_seed(12)
    other = model(x)  # another seed: other masks, other logits (the masks matter)
    assert (other - eager_logits).abs().max() > 1e-3
    torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-4, atol=1e-5)
    for f, e in zip(fast_grads, eager_grads):
        torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-5)
