"""satconv.train: exact resume, the metrics file, the schedule, faults, the run directory's artefacts."""
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import replace

import pytest
import torch

from satconv import train as T
from satconv import steps as S
from satconv import rundir as R
from satconv import provenance as P
from satconv import atlas as A
from satconv.checkpoints import config_diff
from satconv.config import load, override
from satconv.rundir import RunLock
from tests.helpers import TinyNet, tiny_config

#: timing keys differ between any two runs; everything else must match bit for bit on CPU
TIMING_KEYS = {"images_per_s", "epoch_time_s"}
STEPS_PER_EPOCH = 8  # tiny_config: 128 training images, batch 16


def numbers(metrics):
    """A run's metrics without the wall-clock fields."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metrics]


def weights(run_dir):
    """The final weights of a run (last.pt)."""
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def run(out, *overrides, factory=TinyNet, progress=False, **kw):
    """Train the tiny config on the CPU in ``out``."""
    return T.train(tiny_config(*overrides), out_dir=out, device="cpu", progress=progress, model_factory=factory, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run (3 epochs, 24 steps), shared by the tests below."""
    out = tmp_path_factory.mktemp("ref")
    return run(out)


def assert_same_run(a, b):
    """Runs ``a`` and ``b`` have the same metrics (timing aside) and final weights, bit for bit."""
    assert numbers(T.read_metrics(a)) == numbers(T.read_metrics(b))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_stop_mid_epoch_is_exact(reference, tmp_path):
    stopped = run(tmp_path, stop_after_steps=11)  # epoch 2, step 3 of 8
    assert not stopped.completed and len(stopped.metrics) == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 11
    resumed = run(tmp_path)
    assert resumed.completed and resumed.results == reference.results
    assert_same_run(reference.run_dir, tmp_path)
    info = json.loads((tmp_path / "run.json").read_text())
    assert len(info["resumes"]) == 1
    assert info["satconv_source"] == info["resumes"][0]["satconv_source"] == P.source_digest()


def test_resume_after_kill_is_exact(reference, tmp_path):
    # a kill after step 19 (epoch 3): nothing saved since the epoch-2 checkpoint, metrics.jsonl ahead of it
    run(tmp_path, stop_after_steps=19, save_on_stop=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    (tmp_path / ".last.pt.tmp-12345").write_bytes(b"half a checkpoint")  # an interrupted atomic write
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_loss": 99}\n')  # a line the checkpoint does not know
    run(tmp_path)
    assert_same_run(reference.run_dir, tmp_path)
    assert [m["epoch"] for m in T.read_metrics(tmp_path)] == [1, 2, 3]


def test_ctrl_c_checkpoints_then_resumes_exactly(reference, tmp_path):
    class InterruptedNet(TinyNet):
        calls = 0

        def forward(self, x, return_attention=False):
            if self.training:
                InterruptedNet.calls += 1
                if InterruptedNet.calls == 6:
                    os.kill(os.getpid(), signal.SIGINT)  # the handler lets step 6 finish
            return super().forward(x, return_attention)

    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"):
        run(tmp_path, factory=InterruptedNet)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    run(tmp_path)
    assert_same_run(reference.run_dir, tmp_path)


def test_metrics_file_content(reference):
    rows = T.read_metrics(reference.run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [8, 16, 24]
    for r in rows:
        assert set(T.METRIC_KEYS) <= set(r) and all(r[k] is not None for k in T.METRIC_KEYS)
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["images_per_s"] > 0
    assert ["test_acc" in r for r in rows] == [False, True, True]  # test_every=2, and the last epoch
    cfg = tiny_config()
    assert [r["lr"] for r in rows] == [T.lr_at(r["step"] - 1, STEPS_PER_EPOCH, cfg.train) for r in rows]
    best = torch.load(reference.run_dir / "best.pt", weights_only=True)
    val = [r["val_acc"] for r in rows]
    assert best["epoch"] == val.index(max(val)) + 1  # selected on validation
    assert reference.results["final"]["test_acc"] == rows[-1]["test_acc"]
    saved = load(reference.run_dir / "config.yaml")
    assert saved.train == cfg.train and saved.data == cfg.data


def test_cosine_schedule_follows_the_paper():
    t = replace(load("configs/paper_quadratic.yaml").train, lr_step="step")  # 300 epochs of 500 steps
    steps, total = 500, 300 * 500
    lrs = [T.lr_at(s, steps, t) for s in range(total)]
    warm = int(0.05 * total)
    assert lrs[0] == 0 and lrs[warm] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never increases after warm-up
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))
    assert lrs[-1] < 1e-7
    m = load("configs/paper_resnet18.yaml").train
    by_epoch = {e: T.lr_at(e * 10, 10, m) for e in (0, 79, 80, 149, 150, 249, 250, 299)}
    assert by_epoch == pytest.approx({0: 0.1, 79: 0.1, 80: 0.01, 149: 0.01, 150: 1e-3, 249: 1e-3, 250: 1e-4,
                                      299: 1e-4})


@pytest.mark.parametrize("config", ["paper_quadratic", "paper_learned", "paper_resnet18"])
def test_epoch_lr_steps_match_the_original_scheduler_calls(config):
    # the original train.py: LambdaLR over max_steps, scheduler.step(global_step) once per epoch,
    # after the epoch's optimizer steps; its lambda re-derived here (transformers' cosine with warm-up)
    t = load(f"configs/{config}.yaml").train
    assert t.lr_step == "epoch"
    steps, epochs = 7, 40
    t = replace(t, epochs=epochs, milestones=(10, 25, 33))
    total, warm = epochs * steps, int(t.warmup_ratio * epochs * steps)

    def factor(s):
        if s < warm:
            return s / max(1, warm)
        if t.schedule == "multistep":  # MultiStepLR counts scheduler.step calls: the epoch
            return t.gamma ** sum(s // steps >= m for m in t.milestones)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    expected = []
    for epoch in range(epochs):
        expected += [opt.param_groups[0]["lr"]] * steps
        opt.step()
        with pytest.warns(UserWarning):  # the epoch argument is deprecated, as the original used it
            sched.step((epoch + 1) * steps)
    got = [T.lr_at(s, steps, t) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if t.schedule == "cosine":
        assert got[:steps] == [0.0] * steps  # the whole first epoch at 0
    assert len(set(got[steps:2 * steps])) == 1


def test_lr_step_words_and_the_setting_of_runs_before_the_key():
    from satconv.evaluation import recorded_lr_step
    from satconv.schedule import lr_step_words

    assert (lr_step_words("step"), lr_step_words("epoch")) == ("per batch", "per epoch")
    with pytest.raises(ValueError, match="lr_step"):
        lr_step_words("batch")
    # a run's config.yaml from before train.lr_step existed stepped per batch, the key's default
    assert recorded_lr_step({"epochs": 30}) == "step" and recorded_lr_step({"lr_step": "epoch"}) == "epoch"


def test_tiny_run_lowers_the_loss(reference):
    # the synthetic classes differ in colour: 3 epochs take the validation loss well below chance, ln(10)
    rows = T.read_metrics(reference.run_dir)
    assert rows[-1]["val_loss"] < 0.7 * math.log(10)  # measured: 1.11
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]  # measured: 1.56 vs 2.34
    assert rows[-1]["val_acc"] > 0.4  # chance: 0.1; measured: 0.53


def test_snapshots_and_atlas(reference):
    snaps = sorted((reference.run_dir / "snapshots").glob("epoch_*.pt"))
    assert [p.name for p in snaps] == [f"epoch_{e:04d}.pt" for e in range(4)]
    s0, s3 = (torch.load(p, weights_only=True) for p in (snaps[0], snaps[-1]))
    assert set(s0["params"]) == {"attn.attention_centers", "attn.attention_spreads"}
    assert not torch.equal(s0["params"]["attn.attention_centers"], s3["params"]["attn.attention_centers"])
    assert s3["centre_probs"][0].shape == (2, 16)

    path = reference.run_dir / "atlas.pt"
    assert path.stat().st_size < A.ATLAS_MAX_BYTES
    atlas = A.load_atlas(reference.run_dir)
    probs = atlas["probs"][0]
    assert probs.dtype == torch.float16 and probs.shape == (3, 2, 2, 16)  # (images, heads, queries, N)
    assert atlas["probs_stacked"].shape == (3, 1, 2, 2, 16)
    assert atlas["query_index"][0][0] == 2 * 4 + 2  # the centre pixel (row 2, col 2) of the 4x4 grid comes first
    assert torch.allclose(probs.float().sum(-1), torch.ones(3, 2, 2), atol=1e-2)  # float16 rows
    assert atlas["images"].dtype == torch.uint8 and atlas["labels"].tolist() == [0, 1, 2]
    # the toy attention is input-independent: its centre_mean equals the centre row of any image
    assert torch.allclose(atlas["centre_mean"][0].float(), probs[0, :, 0].float(), atol=1e-3)


def test_snapshot_every_thins_the_snapshots_and_keeps_the_last(reference, tmp_path):
    """train.snapshot_every=2 over 5 epochs: the initial model, epochs 1 and 2, every second epoch after them,
    and the last (5); the default (10) keeps every epoch of a short run (the 3-epoch reference's 0 to 3)."""
    from satconv.records import snapshot_due

    assert [e for e in range(13) if snapshot_due(e, 5, 12)] == [0, 1, 2, 3, 4, 5, 10, 12]
    assert [e for e in range(4) if snapshot_due(e, 1, 3)] == [0, 1, 2, 3]
    result = run(tmp_path, "train.epochs=5", "train.snapshot_every=2")
    names = sorted(p.name for p in (result.run_dir / "snapshots").glob("epoch_*.pt"))
    assert names == [f"epoch_{e:04d}.pt" for e in (0, 1, 2, 4, 5)]
    assert len(list((reference.run_dir / "snapshots").glob("epoch_*.pt"))) == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class NaNNet(TinyNet):
        calls = 0

        def forward(self, x, return_attention=False):
            out = super().forward(x, return_attention)
            if self.training:
                NaNNet.calls += 1
                if NaNNet.calls > 10:
                    out = out * float("nan")
            return out

    with pytest.raises(T.NonFiniteLoss, match=r"NaN or Inf in epoch 2 .*last good checkpoint .*last\.pt "
                                              r"\(epoch 1, step 8\)") as caught:
        run(tmp_path, factory=NaNNet)
    assert "fp32" not in str(caught.value)  # the run is fp32 already (bf16 is CUDA only)
    # the NaN loss's gradients reached every parameter through the SGD step, and the message says so
    n = sum(1 for _ in TinyNet(tiny_config().model).parameters())
    assert f"; non-finite parameters ({n} of {n}): " in str(caught.value)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("NonFiniteLoss: the training loss became NaN")


@pytest.mark.parametrize("phase, key, smaller", [("train", "train.batch_size=16", "train.batch_size=8"),
                                                  ("eval", "train.eval_batch_size=64", "train.eval_batch_size=32")])
def test_out_of_memory_names_the_batch_size(tmp_path, phase, key, smaller):
    class OOMNet(TinyNet):
        def forward(self, x, return_attention=False):
            if self.training == (phase == "train"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return super().forward(x, return_attention)

    with pytest.raises(T.OutOfMemory, match=re.escape(f"at {key}; try a smaller one, e.g. --set {smaller}")):
        run(tmp_path, factory=OOMNet)


def test_evaluation_is_in_eval_mode_and_repeatable(reference):
    cfg = tiny_config()
    model = TinyNet(cfg.model)
    model.train()
    data = T.load_data(cfg)
    loader = T.DeviceLoader(data.val, 64, "cpu", cfg.data.mean, cfg.data.std)
    stats = model.bn.running_mean.clone(), model.bn.running_var.clone()
    first, second = S.evaluate_model(model, loader), S.evaluate_model(model, loader)
    assert first == second and model.training  # dropout off; mode restored
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1])
    res = T.evaluate(reference.run_dir, "test", "last", "cpu", model_factory=TinyNet)
    assert res["acc"] == T.read_metrics(reference.run_dir)[-1]["test_acc"] and res["images"] == 40


def test_no_weight_decay_on_centres_and_spreads():
    model = TinyNet(tiny_config().model)
    groups = S.param_groups(model, 1e-4)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {id(model.attn.attention_centers), id(model.attn.attention_spreads)}


def test_sigterm_checkpoints_then_resumes_exactly(reference, tmp_path):
    """SIGTERM (job schedulers, ``timeout``, container stops) is Ctrl-C: the step finishes, a checkpoint is
    written, :class:`Interrupted` names the signal, and the handlers are restored afterwards."""
    class TerminatedNet(TinyNet):
        calls = 0

        def forward(self, x, return_attention=False):
            if self.training:
                TerminatedNet.calls += 1
                if TerminatedNet.calls == 13:
                    os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(x, return_attention)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(T.Interrupted, match="stopped by SIGTERM; checkpoint saved in .*last.pt") as caught:
        run(tmp_path, factory=TerminatedNet)
    assert caught.value.signum == signal.SIGTERM and isinstance(caught.value, KeyboardInterrupt)
    assert {s: signal.getsignal(s) for s in before} == before
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 13
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGTERM"
    run(tmp_path)
    assert_same_run(reference.run_dir, tmp_path)


def test_training_in_another_thread_installs_no_handlers(reference, tmp_path):
    """A notebook may train off the main thread; signal handlers can only be set in the main one."""
    results = []
    thread = threading.Thread(target=lambda: results.append(run(tmp_path)))
    thread.start()
    thread.join()
    assert results and results[0].completed
    assert_same_run(reference.run_dir, tmp_path)


def test_unreadable_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, caplog):
    run(tmp_path, stop_after_steps=19, save_on_stop=False)  # checkpoints of epochs 1 and 2
    last = tmp_path / "last.pt"
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["epoch"] == 1
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path)
    assert f"{last} is unreadable: truncated" in caplog.text
    assert "resuming from the previous checkpoint last.prev.pt" in caplog.text
    assert "weights_only" not in caplog.text
    assert result.completed and result.results == reference.results
    assert_same_run(reference.run_dir, tmp_path)


def test_no_readable_checkpoint_is_said_and_nothing_is_started(tmp_path, capsys):
    run(tmp_path, stop_after_steps=3)
    (tmp_path / "last.pt").write_bytes(b"\x00garbage" * 100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(T.CorruptFile, match=r"last\.pt is unreadable: truncated or not a PyTorch checkpoint.*"
                                            r"no readable checkpoint is left") as caught:
        run(tmp_path)
    assert "weights_only" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_disk_full_keeps_the_last_good_checkpoint_and_says_so(reference, tmp_path, monkeypatch):
    real_fsync, seen = os.fsync, []

    def fsync(fd):  # the second checkpoint (epoch 2) finds the disk full
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/.last.pt.tmp-{os.getpid()}"):
            seen.append(fd)
            if len(seen) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(T.DiskFull, match=re.escape(f"No space left on device in {tmp_path} (writing last.pt); the run "
                                                   f"stopped and the last good checkpoint {tmp_path / 'last.pt'} "
                                                   f"(epoch 1, step 8) is kept. Free some space")):
        run(tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp-*"))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("No space left on device")
    run(tmp_path)
    assert_same_run(reference.run_dir, tmp_path)


def test_out_that_is_a_file_is_refused_before_data_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_data", lambda cfg: pytest.fail("data loaded for an unusable run directory"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(R.BadRunDir, match="is a file"):
        run(tmp_path / "f")
    with pytest.raises(ValueError, match=f"cannot create the run directory {tmp_path / 'f' / 'run'}"):
        run(tmp_path / "f" / "run")
    assert (tmp_path / "f").read_text() == "x"


def test_eval_names_the_unreadable_file(reference, tmp_path, capsys):
    from satconv.__main__ import main
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    (run_dir / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:-50])
    with pytest.raises(T.CorruptFile, match=f"{run_dir / 'best.pt'} is unreadable: truncated"):
        T.evaluate(run_dir, weights="best", device="cpu", model_factory=TinyNet)
    assert T.evaluate(run_dir, weights="last", device="cpu", model_factory=TinyNet)["epoch"] == 3
    for text, reason in [("train: {lr: [1\n", "not valid YAML"), ("", "empty"), ("- 1\n", "a YAML list"),
                         ("train: {lr: -1}\n", "not a valid config .*train.lr: got -1")]:
        (run_dir / "config.yaml").write_text(text)
        with pytest.raises(T.CorruptFile, match=f"config.yaml is unreadable: {reason}"):
            T.evaluate(run_dir, device="cpu", model_factory=TinyNet)
    assert main(["eval", "--run", str(run_dir), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "config.yaml is unreadable: not a valid config" in err and "Traceback" not in err


def test_eval_of_a_run_that_died_says_so(reference, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "running"}))  # as a killed run leaves it
    with caplog.at_level(logging.WARNING):
        res = T.evaluate(run_dir, "test", "last", "cpu", model_factory=TinyNet)
    assert res["run_status"] == "died" and "the run died while training" in caplog.text
    assert T.evaluate(reference.run_dir, "test", "last", "cpu", model_factory=TinyNet)["run_status"] == "completed"


def test_a_run_directory_in_use_is_refused_before_any_file_is_touched(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_data", lambda cfg: pytest.fail("data loaded for a busy run directory"))
    with RunLock(tmp_path):
        with pytest.raises(R.RunDirBusy, match=f"{tmp_path} is in use by another process \\(pid {os.getpid()}"):
            run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_resume_refuses_another_config(reference, tmp_path):
    run(tmp_path, stop_after_steps=3)
    with pytest.raises(ValueError, match=r"different config \(train\.lr: 0\.2 -> 0\.01\)"):
        run(tmp_path, "train.lr=0.01")


def test_build_model_quick_profile(tmp_path):
    cfg = load("configs/paper_quadratic.yaml", profile="quick")
    cfg = override(cfg, ["data.source=synthetic", "data.synthetic_train=48", "data.synthetic_test=16",
                         "data.val_size=16", "model.image_size=8", "train.batch_size=16", "train.atlas_images=1"])
    result = T.train(cfg, out_dir=tmp_path, device="cpu", progress=False)
    assert result.completed and len(result.metrics) == 1
    atlas = A.load_atlas(tmp_path)
    assert atlas["probs_stacked"].shape == (1, 2, 4, 2, 16)  # images, layers, heads, queries, N = 4x4 tokens


@pytest.mark.parametrize("route", ["folded", "sdpa"])
def test_training_takes_the_configured_attention_route(route, tmp_path, monkeypatch):
    """``train.attention_route`` reaches every training step: the "sdpa" route calls the fused attention
    (once per layer and step), the folded route never does."""
    from satconv.attention import folded
    calls, real = [], folded.F.scaled_dot_product_attention
    monkeypatch.setattr(folded.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load("configs/paper_learned_content.yaml", profile="quick")
    cfg = override(cfg, ["data.source=synthetic", "data.synthetic_train=48", "data.synthetic_test=16",
                         "data.val_size=16", "model.image_size=8", "train.batch_size=16", "train.atlas_images=0",
                         "train.snapshot_attention=false", f"train.attention_route={route}"])
    result = T.train(cfg, out_dir=tmp_path, device="cpu", progress=False)
    assert result.completed and math.isfinite(result.metrics[-1]["train_loss"])
    layers, steps = cfg.model.num_layers, 2  # 32 training images in batches of 16
    assert len(calls) >= (layers * steps if route == "sdpa" else 0)
    assert (len(calls) > 0) == (route == "sdpa")


def test_progress_bar_only_when_asked_for_and_in_a_terminal(tmp_path, monkeypatch, capsys):
    assert not T._progress_enabled(True)  # pytest's captured stderr is no terminal: quiet
    assert not T._progress_enabled(False)
    monkeypatch.setattr(T, "_progress_enabled", lambda progress: progress)
    run(tmp_path, "train.epochs=1", progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "acc=" in err and "img_s=" in err


def test_evaluation_records_no_autograd_graph():
    """B5 / memory: evaluation runs without autograd, so its running sums cannot keep every batch's graph
    alive (on a GPU that held ~100 GiB after one validation pass)."""
    cfg = tiny_config()
    model = TinyNet(cfg.model)
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    data = T.load_data(cfg)
    loader = T.DeviceLoader(data.val, 16, "cpu", cfg.data.mean, cfg.data.std)
    S.evaluate_model(model, loader)
    assert seen and not any(grad or req for grad, req in seen)


def test_source_digest_follows_the_file_contents(tmp_path):
    """Equal for equal sources wherever they lie, different when one byte changes; ignores non-Python files."""
    from satconv.provenance import source_digest
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "sub").mkdir(parents=True)
        (root / "x.py").write_text("x = 1\n")
        (root / "sub" / "y.py").write_text("y = 2\n")
    (tmp_path / "b" / "notes.txt").write_text("not code")
    a, b = source_digest(tmp_path / "a"), source_digest(tmp_path / "b")
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    (tmp_path / "b" / "sub" / "y.py").write_text("y = 3\n")
    assert source_digest(tmp_path / "b") != a
    (tmp_path / "b" / "sub" / "y.py").write_text("y = 2\n")
    (tmp_path / "b" / "sub" / "y.py").rename(tmp_path / "b" / "sub" / "z.py")  # a renamed file counts
    assert source_digest(tmp_path / "b") != a
    assert len(source_digest()) == 16  # the package itself


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_model_keeps_static_shapes(mode, monkeypatch):
    """The training run compiles like the benchmark (``dynamic=False``): a smaller last batch or the
    evaluation batch gets its own graph instead of turning every later step shape-generic."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    S.compiled(torch.nn.Linear(2, 2), mode)
    assert seen["dynamic"] is False and seen["options"] == S.compile_options(mode)
    assert seen["options"].get("triton.cudagraphs", False) is (mode == "reduce-overhead")


def test_compile_options_are_the_modes_plus_satconvs_unless_the_environment_says(monkeypatch):
    """The mode's own inductor options (CUDA graphs for reduce-overhead) plus INDUCTOR_OPTIONS (LayerNorm's
    mixed-order reduction and comprehensive padding off); a set TORCHINDUCTOR_* variable leaves that option
    to inductor."""
    import torch._inductor.config as ic
    monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPREHENSIVE_PADDING", raising=False)
    mixed = {"triton.mix_order_reduction": False} if hasattr(ic.triton, "mix_order_reduction") else {}
    padding = {"comprehensive_padding": False} if hasattr(ic, "comprehensive_padding") else {}
    assert S.compile_options("max-autotune")["max_autotune"] is True
    assert S.compile_options("default") == S.compile_options(None) == {**mixed, **padding}
    assert S.compile_options("reduce-overhead")["triton.cudagraphs"] is True
    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
    assert S.compile_options("default") == padding
    monkeypatch.setenv("TORCHINDUCTOR_COMPREHENSIVE_PADDING", "1")
    assert S.compile_options("default") == {}



def test_step_graph_refuses_compile_modes_with_their_own_cuda_graphs():
    from satconv.config import ConfigError
    with pytest.raises(ConfigError, match="train.step_graph.*reduce-overhead"):
        tiny_config("train.step_graph=true", "train.compile=true", "train.compile_mode=reduce-overhead")
    assert tiny_config("train.step_graph=true", "train.compile=true").train.step_graph  # default mode: fine


def test_captured_step_needs_an_eager_warmup():
    with pytest.raises(ValueError, match="warmup"):
        S.CapturedStep(lambda x, y: (x,), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), warmup=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")


@cuda
def test_captured_step_replays_the_eager_steps():
    """Replays of the captured step (forward, loss, backward, fused momentum SGD with a changing learning
    rate, BatchNorm statistics) leave the same weights as eager steps; a batch of another shape after the
    capture runs eagerly and the replays after it stay right."""
    torch.manual_seed(0)
    cfg = tiny_config()
    nets = [TinyNet(cfg.model).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net.drop.p = 0.0  # the RNG streams of eager and replayed dropout are not compared here
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True) for n in nets]

    def body_for(net, opt):
        def body(x, y):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return (loss.detach(),)
        return body

    captured = S.CapturedStep(body_for(nets[1], opts[1]), opts[1], warmup=2)
    eager_body = body_for(nets[0], opts[0])
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(9):
        b = 5 if step == 6 else 16
        x = torch.randn(b, 3, 8, 8, device="cuda", generator=g)
        y = torch.randint(0, 10, (b,), device="cuda", generator=g)
        lr = 0.1 * (0.8 ** step)
        for group in opts[0].param_groups:
            group["lr"] = lr
        opts[0].zero_grad(set_to_none=True)
        (expected,) = eager_body(x, y)
        captured.set_lr(lr)
        (got,) = captured(x, y)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert captured.graph is not None
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


@cuda
def test_training_with_a_step_graph_matches_eager_training(tmp_path):
    """``train.step_graph`` on a whole (tiny) run: the same losses as the eager run, within float tolerance."""
    cfgs = {mode: tiny_config("train.epochs=2", f"train.step_graph={mode}") for mode in ("false", "true")}
    results = {}
    for mode, cfg in cfgs.items():
        results[mode] = T.train(cfg, out_dir=tmp_path / mode, device="cuda", progress=False, model_factory=TinyNet)
    for a, b in zip(results["false"].metrics, results["true"].metrics):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 and abs(a["val_loss"] - b["val_loss"]) < 0.05


def test_config_diff_counts_keys_an_older_config_lacks_as_their_defaults():
    """A checkpoint written before a config key existed resumes when the key keeps its default."""
    from satconv.config import to_dict
    cfg = tiny_config()
    old = to_dict(cfg)
    del old["train"]["fused_forward"]
    assert config_diff(old, cfg) == []
    del old["train"]["lr"]  # a key whose value differs from the default is still a difference
    cfg_lr = tiny_config("train.lr=0.5")
    assert config_diff(old, cfg_lr) == ["train.lr: 0.1 -> 0.5"]


def test_find_runs_lists_whole_run_directories_of_a_config_best_first(tmp_path):
    """Completed before unfinished, then most epochs, then lowest seed; folders missing a run file, of another
    config, or with an unreadable run.json are left out."""
    import json

    from satconv.evaluation import find_runs

    def fake(folder, name, seed, epochs, status="completed"):
        d = tmp_path / folder
        d.mkdir()
        (d / "config.yaml").write_text(f"name: {name}\ntrain: {{seed: {seed}}}\n")
        (d / "run.json").write_text(json.dumps({"status": status, "seed": seed}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1}) + "\n" for e in range(epochs)))
        return d

    a = fake("a", "q", 43, 300)
    b = fake("b", "q", 42, 300)
    c = fake("c", "q", 42, 30)
    d = fake("d", "q", 41, 500, status="interrupted")
    fake("e", "other", 1, 300)
    bad = fake("f", "q", 40, 300)
    (bad / "run.json").write_text("{not json")
    partial = tmp_path / "g"
    partial.mkdir()
    (partial / "config.yaml").write_text("name: q\n")
    assert find_runs(tmp_path, "q") == [b, a, c, d]
    assert len(find_runs(tmp_path)) == 5


def test_parameter_health_names_the_non_finite_parameters_or_the_largest():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
        net[0].bias[1] = -7.0
        net[1].weight[0, 2] = 2.0
    assert S.parameter_health(net, show=2) == "every parameter is finite; largest |value|: 0.bias 7, 1.weight 2"
    assert S.parameter_health(net).endswith("1.weight 2, 0.weight 0.5")  # ties keep named_parameters order
    with torch.no_grad():
        net[1].bias[0] = float("inf")
        net[0].weight[1, 0] = float("nan")
    assert S.parameter_health(net, show=1) == "non-finite parameters (2 of 4): 0.weight, ..."
    assert S.parameter_health(net) == "non-finite parameters (2 of 4): 0.weight, 1.bias"
    with pytest.raises(ValueError, match="show"):
        S.parameter_health(net, show=0)
