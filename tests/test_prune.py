"""satconv.prune and the pruned continuation run (train.init_from, train.prune_degenerate_heads).

References are independent of the pruning code: a pruned layer must compute what the unpruned layer
computes once the removed heads' slices of ``W_out`` are zeroed (float64, eval mode), and the degenerate
rule must pick exactly the heads whose spreads were set by hand to be degenerate.
"""
import copy
import json
import math
import shutil

import pytest
import torch

from satconv import train as T
from satconv import steps as S
from satconv.attention import EXPLICIT, SHARED_ROUTES, QuadraticAttention, Routes, using_routes
from satconv.config import ConfigError, ExperimentConfig, load, override
from satconv.models import build_model
from satconv.prune import (find_degenerate_heads, fit_heads_to_state, head_counts, prune_degenerate_heads,
                           prune_heads, quadratic_layers)
from satconv.rundir import save_torch
from tests.helpers import tiny_config
from tests.test_train import assert_same_run, numbers, weights

#: a tiny anisotropic quadratic encoder for the 8x8 synthetic images of tiny_config (4x4 tokens)
TINY_MODEL = ["model.hidden_dim=16", "model.num_layers=2", "model.ffn_dim=32", "model.attention.num_heads=3",
              "model.attention.quadratic.isotropic=false"]


def zeroed(attn: QuadraticAttention, heads) -> QuadraticAttention:
    """A deep copy of ``attn`` whose ``W_out`` columns of ``heads`` are zero: the heads' contributions removed."""
    ref = copy.deepcopy(attn)
    dh = ref.head_dim
    with torch.no_grad():
        for h in heads:
            ref.proj.weight[:, h * dh:(h + 1) * dh] = 0
    return ref


def rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]])


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isotropic", [True, False], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("head_dim", [None, 5], ids=["concat", "value_proj"])
def test_pruned_layer_equals_the_layer_without_those_heads(isotropic, head_dim):
    torch.manual_seed(0)
    attn = QuadraticAttention(6, 5, head_dim=head_dim, isotropic=isotropic, init_spread_std=0.3).double().eval()
    then = torch.nn.Linear(6, 4).double()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    removed = [1, 3]
    ref = zeroed(attn, removed)
    ref_out, ref_probs = ref(x, return_attention=True)
    ref_then = ref(x, then=then)
    attn(x)  # fill the eval-mode probability cache with all five heads
    assert prune_heads(attn, [4, 0, 2]) == removed
    assert attn.num_heads == 3 and attn.attention_centers.shape == (3, 2)
    assert attn.attention_spreads.shape == ((3,) if isotropic else (3, 2, 2))
    assert attn.proj.weight.shape == (6, 3 * attn.head_dim) and attn.proj.in_features == 3 * attn.head_dim
    if head_dim is not None:
        assert attn.value.weight.shape == (15, 6) and attn.value.bias.shape == (15,)
    out, probs = attn(x, return_attention=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, ref_probs[:, [0, 2, 4]], rtol=0, atol=0)
    torch.testing.assert_close(attn(x, then=then), ref_then, rtol=1e-12, atol=1e-12)  # W_out folded with `then`
    with using_routes(attn, EXPLICIT):
        torch.testing.assert_close(attn(x), ref_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", SHARED_ROUTES)
def test_pruned_layer_on_every_shared_route(route):
    """Heads reading the raw input share the batch's probabilities; every route sees the new head count."""
    torch.manual_seed(1)
    attn = QuadraticAttention(4, 4, isotropic=False, init_spread_std=0.2).double().eval()
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    ref = zeroed(attn, [0])
    prune_heads(attn, torch.tensor([False, True, True, True]))
    with using_routes(attn, Routes(shared=route)):
        torch.testing.assert_close(attn(x), ref(x), rtol=1e-12, atol=1e-12)


def test_prune_heads_refuses_bad_requests():
    attn = QuadraticAttention(4, 3)
    with pytest.raises(ValueError, match="all 3 heads"):
        prune_heads(attn, [])
    with pytest.raises(ValueError, match=r"out of range"):
        prune_heads(attn, [0, 3])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        prune_heads(attn, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="QuadraticAttention"):
        prune_heads(torch.nn.Linear(2, 2), [0])
    assert prune_heads(attn, [0, 1, 2]) == [] and attn.num_heads == 3


def test_the_degenerate_rule_picks_the_heads_made_degenerate():
    """cond(Sigma^-1) > 1000 or lambda_max < 1e-5 (epfml/attention-cnn ``find_degenerated_heads``), by hand."""
    attn = QuadraticAttention(4, 6, isotropic=False)
    diag = lambda a, b: torch.diag(torch.tensor([a, b]))  # noqa: E731
    spreads = [  # S = Sigma^{-1/2}; Sigma^-1 = S^T S has eigenvalues a^2, b^2 whatever the rotation
        diag(1.0, 1.0),  # healthy
        diag(1.0, 0.01) @ rotation(0.7),  # cond 1e4: degenerate
        diag(1e-3, 1e-3),  # lambda_max 1e-6: degenerate
        diag(2.0, 2.0 / 30) @ rotation(-1.1),  # cond 900: healthy
        diag(math.sqrt(2e-5), math.sqrt(2e-5)),  # lambda_max 2e-5: healthy
        diag(0.0, 1.0),  # singular: cond inf, degenerate
    ]
    with torch.no_grad():
        attn.attention_spreads.copy_(torch.stack(spreads))
    assert attn.degenerate_heads().tolist() == [False, True, True, False, False, True]
    iso = QuadraticAttention(4, 3, isotropic=True)
    with torch.no_grad():
        iso.attention_spreads.copy_(torch.tensor([1.0, 1e-3, 0.01]))  # s^2 = 1, 1e-6 (< 1e-5), 1e-4
    assert iso.degenerate_heads().tolist() == [False, True, False]


def tiny_encoder(*extra, seed=0):
    torch.manual_seed(seed)
    cfg = override(ExperimentConfig(), ["model.image_size=8", *TINY_MODEL, *extra])
    return build_model(cfg)


def make_degenerate(attn: QuadraticAttention, head: int, kind: str = "elongated") -> None:
    with torch.no_grad():
        attn.attention_spreads[head] = torch.diag(torch.tensor([1.0, 1e-3] if kind == "elongated" else [1e-4, 1e-4]))


def test_prune_degenerate_heads_over_a_model():
    model = tiny_encoder().double().eval()
    layers = quadratic_layers(model)
    assert list(layers) == ["blocks.0.attn", "blocks.1.attn"]
    make_degenerate(layers["blocks.0.attn"], 1)
    make_degenerate(layers["blocks.1.attn"], 0, "flat")
    make_degenerate(layers["blocks.1.attn"], 2)
    assert find_degenerate_heads(model) == {"blocks.0.attn": [1], "blocks.1.attn": [0, 2]}
    ref = copy.deepcopy(model)
    dh = ref.blocks[0].attn.head_dim
    with torch.no_grad():  # the independent route: zero the pruned heads' slices of W_out
        for block, heads in ((ref.blocks[0], [1]), (ref.blocks[1], [0, 2])):
            for h in heads:
                block.attn.proj.weight[:, h * dh:(h + 1) * dh] = 0
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert prune_degenerate_heads(model) == {"blocks.0.attn": [1], "blocks.1.attn": [0, 2]}
    assert head_counts(model) == {"blocks.0.attn": 2, "blocks.1.attn": 1}
    torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-12)
    assert find_degenerate_heads(model) == {"blocks.0.attn": [], "blocks.1.attn": []}


def test_a_layer_whose_heads_are_all_degenerate_is_refused_and_nothing_is_pruned():
    model = tiny_encoder()
    make_degenerate(model.blocks[0].attn, 0)
    for h in range(3):
        make_degenerate(model.blocks[1].attn, h, "flat")
    with pytest.raises(ValueError, match=r"every head of layer\(s\) blocks\.1\.attn is degenerate"):
        prune_degenerate_heads(model)
    assert head_counts(model) == {"blocks.0.attn": 3, "blocks.1.attn": 3}


def test_a_pruned_model_trains_a_step_without_decay_on_centres_and_spreads():
    model = tiny_encoder()
    make_degenerate(model.blocks[0].attn, 2)
    prune_degenerate_heads(model)
    model.train()
    groups = S.param_groups(model, 1e-4)
    no_decay = {id(p) for p in groups[1]["params"]}
    expected = {id(p) for m in quadratic_layers(model).values() for p in (m.attention_centers, m.attention_spreads)}
    assert no_decay == expected and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.blocks[0].attn.attention_centers.grad.shape == (2, 2)
    opt.step()
    for n, p in model.named_parameters():  # first SGD step: p - lr * (grad + wd * p); wd = 0 on centres/spreads
        wd = 0.0 if ("attention_centers" in n or "attention_spreads" in n) else 1e-4
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * (p.grad + wd * before[n]), rtol=1e-6, atol=1e-7)


def test_a_fresh_model_takes_a_pruned_state():
    model = tiny_encoder(seed=3).eval()
    make_degenerate(model.blocks[1].attn, 1)
    prune_degenerate_heads(model)
    fresh = tiny_encoder(seed=4).eval()
    assert fit_heads_to_state(fresh, model.state_dict()) == {"blocks.1.attn": 2}
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds 3 heads but the layer has 2"):
        fit_heads_to_state(model, tiny_encoder().state_dict())


# ---------------------------------------------------------------------------------------------
# The pruned continuation run
# ---------------------------------------------------------------------------------------------
def run(out, *overrides, **kw):
    """Train the tiny anisotropic encoder on the CPU in ``out``."""
    return T.train(tiny_config(*TINY_MODEL, *overrides), out_dir=out, device="cpu", progress=False, **kw)


def pruned_overrides(init_dir):
    return [f"train.init_from={init_dir}", "train.prune_degenerate_heads=true", "train.lr=0.01"]


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    """A 1-epoch run whose final weights then get head 1 of the first layer forced degenerate (cond 1e6)."""
    out = tmp_path_factory.mktemp("init")
    run(out, "train.epochs=1")
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["model"]["blocks.0.attn.attention_spreads"][1] = torch.diag(torch.tensor([1.0, 1e-3]))
    save_torch(ck, out / "last.pt")
    return out


@pytest.fixture(scope="module")
def pruned(init_run, tmp_path_factory):
    """The pruned continuation, 3 epochs uninterrupted."""
    out = tmp_path_factory.mktemp("pruned")
    return run(out, *pruned_overrides(init_run))


def test_the_pruned_run_records_its_start(pruned, init_run):
    assert pruned.completed
    info = json.loads((pruned.run_dir / "run.json").read_text())
    init = info["init"]
    assert init["from"] == str(init_run.resolve()) and init["weights"] == "last.pt" and init["epoch"] == 1
    assert init["pruned_heads"] == {"blocks.0.attn": [1], "blocks.1.attn": []}
    assert init["heads"] == {"blocks.0.attn": 3, "blocks.1.attn": 3}
    assert init["heads_after"] == {"blocks.0.attn": 2, "blocks.1.attn": 3}
    # the recorded parameter count is the pruned network's (the config builds one more head), counted anew
    model, _ = T.load_model(pruned.run_dir, "last")
    full, _ = T.load_model(init_run, "last")
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert init["degenerate"]["blocks.0.attn"]["1"]["cond"] == pytest.approx(1e6, rel=1e-3)
    for key in ("loaded", "after_pruning"):
        assert set(init[key]) == {"val_loss", "val_acc", "test_loss", "test_acc"}
    # the loaded weights' accuracy, recomputed independently from the init run's (modified) last.pt
    loaded, _ = T.load_model(init_run, "last")
    assert init["loaded"]["test_acc"] == T.evaluate(init_run, "test", "last", device="cpu")["acc"]
    assert loaded.blocks[0].attn.num_heads == 3
    w = weights(pruned.run_dir)
    assert w["blocks.0.attn.attention_centers"].shape == (2, 2) and w["blocks.0.attn.proj.weight"].shape == (16, 32)
    assert torch.load(pruned.run_dir / "last.pt", weights_only=True)["init"] == init


def test_the_pruned_run_starts_from_the_loaded_weights_minus_the_pruned_heads(pruned, init_run):
    """The run's first snapshot (epoch 0, before any step) holds the init run's centres of the kept heads."""
    snap = torch.load(pruned.run_dir / "snapshots" / "epoch_0000.pt", weights_only=True)
    init = torch.load(init_run / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(snap["params"]["blocks.0.attn.attention_centers"],
                               init["blocks.0.attn.attention_centers"][[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(snap["params"]["blocks.1.attn.attention_spreads"],
                               init["blocks.1.attn.attention_spreads"], rtol=0, atol=0)


def test_a_pruned_run_loads_and_evaluates(pruned):
    for which in ("best", "last"):
        model, info = T.load_model(pruned.run_dir, which)
        assert model.blocks[0].attn.num_heads == 2 and model.blocks[1].attn.num_heads == 3
    result = T.evaluate(pruned.run_dir, "test", "last", device="cpu")
    assert result["acc"] == pruned.results["final"]["test_acc"]


def test_a_pruned_run_resumes_bit_for_bit_without_its_init_directory(pruned, init_run, tmp_path):
    """Stopped mid-epoch, then resumed after the init run's directory is gone: the head counts come from the
    run's own checkpoint, and the metrics and final weights equal the uninterrupted run's."""
    init_copy = tmp_path / "init_copy"
    shutil.copytree(init_run, init_copy)
    out = tmp_path / "run"
    stopped = run(out, *pruned_overrides(init_copy), stop_after_steps=11)  # epoch 2, step 3 of 8
    assert not stopped.completed
    shutil.rmtree(init_copy)
    resumed = run(out, *pruned_overrides(init_copy))
    assert resumed.completed and resumed.results == pruned.results
    assert_same_run(pruned.run_dir, out)
    info = json.loads((out / "run.json").read_text())
    assert len(info["resumes"]) == 1 and info["init"]["pruned_heads"] == {"blocks.0.attn": [1], "blocks.1.attn": []}


def test_a_pruned_run_killed_after_a_checkpoint_resumes_exactly(pruned, init_run, tmp_path):
    run(tmp_path, *pruned_overrides(init_run), stop_after_steps=19, save_on_stop=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    run(tmp_path, *pruned_overrides(init_run))
    assert numbers(T.read_metrics(tmp_path)) == numbers(T.read_metrics(pruned.run_dir))
    assert_same_run(pruned.run_dir, tmp_path)


def test_a_pruned_run_resumed_with_another_config_names_the_difference(init_run, tmp_path):
    run(tmp_path, *pruned_overrides(init_run), stop_after_steps=3)
    with pytest.raises(ValueError, match=r"different config \(train\.lr: 0\.01 -> 0\.02\)"):
        run(tmp_path, *pruned_overrides(init_run), "train.lr=0.02")


def test_init_from_resolves_relative_paths_and_without_pruning_loads_all_heads(init_run, tmp_path, monkeypatch):
    shutil.copytree(init_run, tmp_path / "init")
    monkeypatch.chdir(tmp_path)
    result = run(tmp_path / "run", "train.init_from=init", "train.epochs=1")
    info = json.loads((result.run_dir / "run.json").read_text())["init"]
    assert info["from"] == str((tmp_path / "init").resolve())
    assert "pruned_heads" not in info and info["heads"] == {"blocks.0.attn": 3, "blocks.1.attn": 3}
    assert weights(result.run_dir)["blocks.0.attn.attention_centers"].shape == (3, 2)


def test_init_from_problems_are_said_before_the_data_is_loaded(init_run, tmp_path, monkeypatch):
    def no_data(cfg):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(T, "load_data", no_data)
    with pytest.raises(ConfigError, match=r"train\.init_from: got .*no run directory at .*nowhere"):
        run(tmp_path / "a", f"train.init_from={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no last.pt"):
        run(tmp_path / "b", f"train.init_from={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"differs from this config's \(model\.hidden_dim: 16 -> 24\)"):
        run(tmp_path / "c", f"train.init_from={init_run}", "model.hidden_dim=24")
    with pytest.raises(ConfigError, match=r"differs from this config's \(model\.attention\.quadratic\.isotropic"):
        run(tmp_path / "d", f"train.init_from={init_run}", "model.attention.quadratic.isotropic=true")
    for d in "abcd":
        assert not (tmp_path / d / "last.pt").exists()


def test_an_unfinished_or_damaged_init_run_is_refused(init_run, tmp_path):
    run(tmp_path / "half", "train.epochs=2", stop_after_steps=3)
    with pytest.raises(ConfigError, match=r"holds epoch 0 of 2: that run has not finished"):
        run(tmp_path / "a", f"train.init_from={tmp_path / 'half'}", "train.epochs=2")
    damaged = tmp_path / "damaged"
    shutil.copytree(init_run, damaged)
    (damaged / "last.pt").write_bytes(b"garbage")
    with pytest.raises(T.CorruptFile, match="last.pt"):
        run(tmp_path / "b", f"train.init_from={damaged}")


def test_every_head_of_a_layer_degenerate_stops_the_start(init_run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(init_run, bad)
    ck = torch.load(bad / "last.pt", weights_only=True)
    ck["model"]["blocks.1.attn.attention_spreads"][:] = 1e-4 * torch.eye(2)
    save_torch(ck, bad / "last.pt")
    with pytest.raises(ValueError, match=r"every head of layer\(s\) blocks\.1\.attn is degenerate"):
        run(tmp_path / "run", *pruned_overrides(bad))


def test_the_paper_config_is_the_original_pruned_run():
    cfg = load("configs/paper_quadratic_anisotropic_pruned.yaml")
    base = load("configs/paper_quadratic_anisotropic.yaml")
    assert cfg.model == base.model
    t = cfg.train
    assert (t.init_from, t.prune_degenerate_heads, t.lr, t.epochs) == ("runs/paper_quadratic_anisotropic", True,
                                                                      0.01, 100)
    assert (t.schedule, t.warmup_ratio, t.lr_step, t.batch_size) == ("cosine", 0.05, "epoch", 100)


def test_prune_degenerate_heads_needs_quadratic_attention(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  attention: {kind: content}\ntrain:\n  prune_degenerate_heads: true\n")
    with pytest.raises(ConfigError, match=r"train\.prune_degenerate_heads: got True; needs quadratic attention"):
        load(path)
    path.write_text("train:\n  init_from: ''\n")
    with pytest.raises(ConfigError, match=r"train\.init_from: got ''; must be a run directory path or null"):
        load(path)
