"""Throughput benchmarks (satconv.bench.throughput): bench_model's rows and B9 rules, image sides, the largest
batch, whole epochs."""
import json

import pytest
import torch

from satconv import config as C
from satconv.bench import harness, memory, throughput

QUADRATIC_YAML = str(C.REPO_ROOT / "configs" / "paper_quadratic.yaml")


def test_bench_rejects_bad_warmup_and_repeats():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    with pytest.raises(ValueError, match="warmup"):
        throughput.bench_model(cfg, batch=2, device="cpu", warmup=0)
    with pytest.raises(ValueError, match="repeats"):
        throughput.bench_model(cfg, batch=2, device="cpu", repeats=1)


KEYS = ["config", "arch", "attention", "device", "torch", "precision", "batch", "image_size", "params",
        "train_img_s", "eval_img_s", "latency_ms_b1", "latency_ms_b1_p10", "latency_ms_b1_p90", "peak_mem_gib",
        "flops_per_image_train", "flops_per_image_eval", "achieved_tflops_train", "mfu", "peak_tflops",
        "peak_tflops_source", "mfu_measured"]


def test_bench_model_on_cpu_returns_every_key():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    row = throughput.bench_model(cfg, batch=4, device="cpu", precision="bf16", warmup=1, repeats=3)
    assert set(KEYS) <= set(row)
    assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["latency_ms_b1"] > 0
    assert row["latency_ms_b1_p10"] <= row["latency_ms_b1"] <= row["latency_ms_b1_p90"]
    assert row["precision"] == "fp32" and row["precision_requested"] == "bf16"  # CPU forces fp32
    assert row["peak_mem_gib"] is None and row["mfu"] is None
    assert row["batch"] == 4 and row["attention"] == "quadratic" and row["config"] == "paper_quadratic"
    assert row["flops_per_image_train"] > row["flops_per_image_eval"] > 0
    assert row["achieved_tflops_train"] == pytest.approx(row["flops_per_image_train"] * row["train_img_s"] / 1e12)
    json.dumps(row)


def test_bench_model_train_only_skips_evaluation_and_latency():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    row = throughput.bench_model(cfg, batch=2, device="cpu", warmup=1, repeats=3, train_only=True)
    assert row["train_only"] and row["train_img_s"] > 0
    assert row["eval_img_s"] is None and row["latency_ms_b1"] is None and row["achieved_tflops_eval"] is None


def test_scaling_widens_learned_embeddings():
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", profile="quick")
    assert throughput.with_image_side(cfg, 16).model.attention.learned_relative.max_position == 16
    wide = throughput.with_image_side(cfg, 48)
    assert wide.model.image_size == 48 and wide.model.attention.learned_relative.max_position == 24
    rows = throughput.scaling(cfg, sides=(8, 36), batch=2, device="cpu", warmup=1, repeats=3)
    assert [(r["side"], r["image_size"]) for r in rows] == [(8, 8), (36, 36)]
    # 18x18 = 324 tokens at side 36 (max_position widened to 18), 16 at side 8: the linear layers
    # cost 324/16 = 20x more per image, the N^2 attention products more still
    assert rows[1]["flops_per_image_eval"] > 20 * rows[0]["flops_per_image_eval"]


def test_helpers():
    assert memory.largest_batch(C.load(QUADRATIC_YAML, profile="quick"), "cpu", start=37) == 37
    assert throughput.epoch_time_projection(1000.0, 300) == pytest.approx(300 * 45000 / 1000 / 3600)
    assert harness.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert harness.device_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert harness.device_peak_tflops("NVIDIA H200", "fp32")[0] == 66.9
    assert harness.device_peak_tflops("Some CPU", "fp32")[0] is None


def test_epoch_timing_compares_a_whole_epoch_with_the_model_alone(capsys):
    """The --epoch mode trains real epochs through satconv.train and reports the ratio to bench's figure."""
    from satconv import config as C
    from satconv.bench.cli import bench_main
    from satconv.bench.throughput import epoch_timing
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_quadratic.yaml", profile="quick",
                 overrides=["model.num_layers=1", "train.batch_size=32"])
    row = epoch_timing(cfg, device="cpu", epochs=2, model_only_img_s=1000.0, synthetic_images=400)
    train_images = 400 - cfg.data.val_size  # the validation split is held out of the generated set
    assert row["images"] == train_images and row["batch"] == 32 and row["epoch_time_s"] > 0
    assert row["ratio"] == pytest.approx(row["epoch_time_s"] / (train_images / 1000.0))
    # the row names its data set by the label results carry, and the run's seed
    assert row["data"] == "synthetic shapes (generated)" and row["data_root"] is None
    assert row["seed"] == cfg.train.seed and row["epochs"] == 2
    from satconv.provenance import source_digest
    assert row["satconv_source"] == source_digest()  # which code ran, as bench rows record it
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        epoch_timing(cfg, device="cpu", epochs=1, model_only_img_s=1.0)
    with pytest.raises(SystemExit):
        bench_main(["--config", "configs/paper_quadratic.yaml", "--epoch", "--epochs", "0"])


def test_epochs_from_run_takes_the_median_of_steady_epochs_without_test(tmp_path):
    """Epoch 1 (compilation) and epochs with a test pass are left out; the rest's median is reported."""
    import json as _json
    (tmp_path / "run.json").write_text(_json.dumps({"device": "GPU X", "seed": 7, "data": {
        "description": "CIFAR-10 (JPEG q75 copy)", "sizes": {"train": 45000, "val": 5000, "test": 10000}}}))
    (tmp_path / "config.yaml").write_text("name: demo\ntrain: {batch_size: 100}\n")
    times = [50.0, 6.0, 7.0, 30.0, 5.0]
    rows = [{"epoch": i + 1, "epoch_time_s": t} for i, t in enumerate(times)]
    rows[3]["test_acc"] = 0.5
    (tmp_path / "metrics.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    row = throughput.epochs_from_run(tmp_path)
    assert row["epoch_time_s"] == 6.0 and row["epochs_timed"] == 3 and row["epochs"] == 5
    assert (row["config"], row["device"], row["batch"], row["images"], row["seed"]) == ("demo", "GPU X", 100, 45000, 7)
    rows = rows[:1]
    (tmp_path / "metrics.jsonl").write_text(_json.dumps(rows[0]) + "\n")
    assert throughput.epochs_from_run(tmp_path) is None


def test_bench_batch_backs_off_when_the_searched_batch_runs_out_of_memory(monkeypatch):
    """At the searched largest batch the benchmark retries at 90% until it fits; other errors pass through."""
    tried = []

    def fake_bench(cfg, batch, **kw):
        tried.append(batch)
        if batch > 85:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": batch}

    monkeypatch.setattr(throughput, "largest_batch", lambda *a, **k: 100)
    monkeypatch.setattr(throughput, "bench_model", fake_bench)
    row = throughput.bench_batch(None, "max")
    assert tried == [100, 90, 81] and row == {"batch": 81, "batch_searched": 100}
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        throughput.bench_batch(None, 120)  # a fixed batch is not changed
    assert tried == [120]
    tried.clear()
    monkeypatch.setattr(throughput, "largest_batch", lambda *a, **k: 200)
    with pytest.raises(RuntimeError, match=r"out of memory at every batch tried \[200, 180, 162, 145\] "
                                           r"\(largest_batch found 200\): CUDA out of memory"):
        throughput.bench_batch(None, "max")
    assert tried == [200, 180, 162, 145]
