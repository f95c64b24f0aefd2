"""Timing harness and FLOP counting (satconv.timing): analytic counts, Table 1's convention, B9 rules, the CLI."""
import json

import pytest
import torch
from torch import nn

from satconv import config as C
from satconv import timing
from satconv.models import build_model

paper = lambda name: C.load(C.REPO_ROOT / "configs" / f"{name}.yaml")  # noqa: E731
QUADRATIC_YAML = str(C.REPO_ROOT / "configs" / "paper_quadratic.yaml")

#: Table 1 is printed to two significant digits; paper.md §1.3 asks for agreement within 1%.
TABLE1_TOL = 0.01
#: thop's (2 in - 1) per linear output vs 2 in: relative gap 1/(2 in), at most ~0.1% for these models.
THOP_EXACT_TOL = 0.002


def _build_for_counting(cfg):
    """The network on the meta device (free) when every module supports it, else on the CPU."""
    try:
        with torch.device("meta"):
            model = build_model(cfg)
        timing.paper_convention_flops(model)
        return model
    except Exception:
        return build_model(cfg)


class MLP(nn.Module):
    """(B, 3, 4, 4) -> flatten 48 -> Linear(48, 16) -> ReLU -> Linear(16, 10)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def test_flops_of_linear_layers_equal_analytic_count():
    m = MLP()
    fwd = 2 * (48 * 16 + 16 * 10)
    assert timing.flops_per_image(m, image_size=4, mode="eval") == fwd
    # backward: both weight gradients, plus the input gradient of the second layer only
    # (the images do not require grad, so autograd skips layer 1's input gradient)
    bwd = 2 * (48 * 16 + 16 * 10) + 2 * (16 * 10)
    assert timing.flops_per_image(m, image_size=4, mode="train") == fwd + bwd
    assert all(p.grad is None for p in m.parameters()), "counting must not leave gradients behind"
    assert m.training, "train/eval mode must be restored"


def test_flops_of_tiny_quadratic_encoder_equal_analytic_count():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    m = cfg.model
    d, f, h, L = m.hidden_dim, m.ffn_dim, m.attention.num_heads, m.num_layers
    n = (m.image_size // m.downsample) ** 2
    macs = 12 * d * n + d * m.num_classes  # embedding Linear(12 -> D) per token, classifier once
    macs += L * (h * n * n * d  # softmax(A) X per head, heads concatenated (D_h = D)
                 + h * d * d * n  # proj: Linear(H*D -> D)
                 + d * d * n  # BertSelfOutput.dense
                 + 2 * d * f * n)  # FFN
    model = build_model(cfg)
    assert timing.flops_per_image(model, m.image_size, mode="eval") == 2 * macs
    conv = timing.paper_convention_flops(model)
    assert conv["attention_einsum_macs"] == L * h * n * n * d
    assert conv["total_macs"] == macs


@pytest.mark.parametrize("name,table1", [("paper_quadratic", 6.18e9), ("paper_learned", 6.18e9),
                                         ("paper_learned_content", 15.02e9), ("paper_resnet18", 0.56e9)])
def test_paper_convention_reproduces_table1(name, table1):
    c = timing.paper_convention_flops(_build_for_counting(paper(name)))
    assert abs(c["thop_like"] - table1) / table1 < TABLE1_TOL, c
    assert abs(c["thop_exact"] - c["thop_like"]) / c["thop_like"] < THOP_EXACT_TOL, c
    if name == "paper_resnet18":
        assert c["linear_macs"] == 512 * 10 and c["attention_einsum_macs"] == 0  # conv MACs only
    else:
        assert c["conv_macs"] == 0
        # hypothesis (b): the einsums thop misses, H N^2 D per layer (+ q k^T with content)
        einsum = 6 * 9 * 256 ** 2 * 400
        if name == "paper_learned_content":
            assert c["attention_einsum_macs"] >= 2 * einsum
        else:
            assert abs(c["attention_einsum_macs"] - einsum) / einsum < TABLE1_TOL


def test_bench_rejects_bad_warmup_and_repeats():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    with pytest.raises(ValueError, match="warmup"):
        timing.bench_model(cfg, batch=2, device="cpu", warmup=0)
    with pytest.raises(ValueError, match="repeats"):
        timing.bench_model(cfg, batch=2, device="cpu", repeats=1)


def test_time_repeats_counts_calls():
    calls = []
    times = timing.time_repeats(lambda: calls.append(1), "cpu", warmup=2, repeats=4)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)


KEYS = ["config", "arch", "attention", "device", "torch", "precision", "batch", "image_size", "params",
        "train_img_s", "eval_img_s", "latency_ms_b1", "latency_ms_b1_p10", "latency_ms_b1_p90", "peak_mem_gib",
        "flops_per_image_train", "flops_per_image_eval", "achieved_tflops_train", "mfu", "peak_tflops",
        "peak_tflops_source", "mfu_measured"]


def test_bench_model_on_cpu_returns_every_key():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    row = timing.bench_model(cfg, batch=4, device="cpu", precision="bf16", warmup=1, repeats=3)
    assert set(KEYS) <= set(row)
    assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["latency_ms_b1"] > 0
    assert row["latency_ms_b1_p10"] <= row["latency_ms_b1"] <= row["latency_ms_b1_p90"]
    assert row["precision"] == "fp32" and row["precision_requested"] == "bf16"  # CPU forces fp32
    assert row["peak_mem_gib"] is None and row["mfu"] is None
    assert row["batch"] == 4 and row["attention"] == "quadratic" and row["config"] == "paper_quadratic"
    assert row["flops_per_image_train"] > row["flops_per_image_eval"] > 0
    assert row["achieved_tflops_train"] == pytest.approx(row["flops_per_image_train"] * row["train_img_s"] / 1e12)
    json.dumps(row)


def test_bench_main_prints_json_lines(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    argv = ["--config", QUADRATIC_YAML, "--profile", "quick", "--batch", "4", "--warmup", "1", "--repeats", "3",
            "--out", str(out)]
    assert timing.bench_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["batch"] == 4 and row["device_type"] == "cpu" and row["train_img_s"] > 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == [row]


def test_append_jsonl_appends(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    timing.append_jsonl(out, [{"a": 1}])
    timing.append_jsonl(out, [{"b": 2}, {"c": 3}])
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert list(out.parent.iterdir()) == [out]  # no temp files left


@pytest.mark.parametrize("argv", [
    [],  # --config is required
    ["--config", QUADRATIC_YAML, "--batch", "0"],
    ["--config", QUADRATIC_YAML, "--batch", "many"],
    ["--config", QUADRATIC_YAML, "--warmup", "0"],
    ["--config", QUADRATIC_YAML, "--repeats", "1"],
    ["--config", QUADRATIC_YAML, "--precision", "fp16"],
    ["--config", "configs/does_not_exist.yaml"],
    ["--config", QUADRATIC_YAML, "--set", "model.num_layers=zero"],
    ["--config", QUADRATIC_YAML, "--set", "train.attention_route=flash"],
    ["--config", QUADRATIC_YAML, "--compile", "reduce-overhead", "--set", "train.step_graph=true"],
])
def test_bench_main_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        timing.bench_main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_scaling_widens_learned_embeddings():
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", profile="quick")
    assert timing.with_image_side(cfg, 16).model.attention.learned_relative.max_position == 16
    wide = timing.with_image_side(cfg, 48)
    assert wide.model.image_size == 48 and wide.model.attention.learned_relative.max_position == 24
    rows = timing.scaling(cfg, sides=(8, 36), batch=2, device="cpu", warmup=1, repeats=3)
    assert [(r["side"], r["image_size"]) for r in rows] == [(8, 8), (36, 36)]
    # 18x18 = 324 tokens at side 36 (max_position widened to 18), 16 at side 8: the linear layers
    # cost 324/16 = 20x more per image, the N^2 attention products more still
    assert rows[1]["flops_per_image_eval"] > 20 * rows[0]["flops_per_image_eval"]


def test_helpers():
    assert timing.largest_batch(C.load(QUADRATIC_YAML, profile="quick"), "cpu", start=37) == 37
    assert timing.epoch_time_projection(1000.0, 300) == pytest.approx(300 * 45000 / 1000 / 3600)
    assert timing.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert timing.device_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert timing.device_peak_tflops("NVIDIA H200", "fp32")[0] == 66.9
    assert timing.device_peak_tflops("Some CPU", "fp32")[0] is None


def test_epoch_timing_compares_a_whole_epoch_with_the_model_alone(capsys):
    """The --epoch mode trains real epochs through satconv.train and reports the ratio to bench's figure."""
    from satconv import config as C
    from satconv.timing import bench_main, epoch_timing
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_quadratic.yaml", profile="quick",
                 overrides=["model.num_layers=1", "train.batch_size=32"])
    row = epoch_timing(cfg, device="cpu", epochs=2, model_only_img_s=1000.0, synthetic_images=400)
    train_images = 400 - cfg.data.val_size  # the validation split is held out of the generated set
    assert row["images"] == train_images and row["batch"] == 32 and row["epoch_time_s"] > 0
    assert row["ratio"] == pytest.approx(row["epoch_time_s"] / (train_images / 1000.0))
    # the row names its data set by the label results carry, and the run's seed
    assert row["data"] == "synthetic shapes (generated)" and row["data_root"] is None
    assert row["seed"] == cfg.train.seed and row["epochs"] == 2
    from satconv.train import source_digest
    assert row["satconv_source"] == source_digest()  # which code ran, as bench rows record it
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        epoch_timing(cfg, device="cpu", epochs=1, model_only_img_s=1.0)
    with pytest.raises(SystemExit):
        bench_main(["--config", "configs/paper_quadratic.yaml", "--epoch", "--epochs", "0"])


@pytest.mark.parametrize("groups", [1, 8])
def test_grouped_conv_backward_counts_twice_the_forward(groups):
    """PyTorch's formula ignores groups in the weight gradient; ours counts each gradient as one forward."""
    from satconv.flops import flops_per_image
    torch.manual_seed(0)
    stem = torch.nn.Conv2d(3, 8, 1, bias=False)
    mixer = torch.nn.Conv2d(8, 8, 5, padding=2, groups=groups, bias=False)
    model = torch.nn.Sequential(stem, mixer, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    stem_flops = 2 * 16 * 16 * 8 * 3  # per image: outputs x input channels, 1x1 taps
    mixer_flops = 2 * 16 * 16 * 8 * (8 // groups) * 25  # outputs x input channels per group x taps
    assert flops_per_image(model, 16, "eval", batch=1) == stem_flops + mixer_flops
    # backward: the stem needs only its weight gradient (the images need none), the mixer both
    assert flops_per_image(model, 16, "train", batch=1) == 2 * stem_flops + 3 * mixer_flops


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
    row = timing.epochs_from_run(tmp_path)
    assert row["epoch_time_s"] == 6.0 and row["epochs_timed"] == 3 and row["epochs"] == 5
    assert (row["config"], row["device"], row["batch"], row["images"], row["seed"]) == ("demo", "GPU X", 100, 45000, 7)
    rows = rows[:1]
    (tmp_path / "metrics.jsonl").write_text(_json.dumps(rows[0]) + "\n")
    assert timing.epochs_from_run(tmp_path) is None


def test_bench_batch_backs_off_when_the_searched_batch_runs_out_of_memory(monkeypatch):
    """At the searched largest batch the benchmark retries at 90% until it fits; other errors pass through."""
    tried = []

    def fake_bench(cfg, batch, **kw):
        tried.append(batch)
        if batch > 85:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": batch}

    monkeypatch.setattr(timing, "largest_batch", lambda *a, **k: 100)
    monkeypatch.setattr(timing, "bench_model", fake_bench)
    row = timing.bench_batch(None, "max")
    assert tried == [100, 90, 81] and row == {"batch": 81, "batch_searched": 100}
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        timing.bench_batch(None, 120)  # a fixed batch is not changed
    assert tried == [120]
    tried.clear()
    monkeypatch.setattr(timing, "largest_batch", lambda *a, **k: 200)
    with pytest.raises(RuntimeError, match=r"out of memory at every batch tried \[200, 180, 162, 145\] "
                                           r"\(largest_batch found 200\): CUDA out of memory"):
        timing.bench_batch(None, "max")
    assert tried == [200, 180, 162, 145]


@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_80x256_64x5_1x2_h_bz_coopA_bias_TNN", "matrix product"),
    ("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_256x128_nt_align1>", "matrix product"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "matrix product"),
    ("triton_red_fused__softmax__to_copy_add_exp_native_dropout_prepare_softmax_online_view_23", "softmax"),
    ("triton_per_fused__to_copy_add_native_dropout_backward_native_layer_norm_backward_view_9", "normalisation"),
    ("triton_poi_fused__unsafe_view_bmm_clone_permute_view_13", "layout copy"),
    ("triton_poi_fused__to_copy__unsafe_view_add_bmm_transpose_view_22", "other element-wise"),
    ("triton_per_fused___rshift____to_copy_add_arange_bitwise_and_clone_mul_permute_squeeze_sub_sum_view_16",
     "other element-wise"),
    ("triton_poi_fused_index_put_new_zeros_permute_transpose_view_22", "other element-wise"),
    ("triton_poi_fused__to_copy_7", "layout copy"),
    ("aten::copy_", "layout copy"),
    ("aten::_to_copy", "layout copy"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "layout copy"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>>", "optimizer"),
    ("triton_poi_fused_gelu_gelu_backward_view_6", "other element-wise"),
    ("aten::addmm", "matrix product"),
    ("aten::bmm", "matrix product"),
    ("aten::native_layer_norm_backward", "normalisation"),
    ("aten::mul", "other element-wise"),
])
def test_kernel_names_are_categorised(name, category):
    """Kernel names as an H200 profile of the models printed them (and CPU operator names)."""
    from satconv.kernels import categorise
    assert categorise(name) == category


def test_kernel_breakdown_on_cpu_sums_its_categories():
    from satconv.kernels import categorise, kernel_breakdown
    row = kernel_breakdown(C.load(QUADRATIC_YAML, profile="quick"), batch=4, device="cpu", warmup=1, steps=1, top=5)
    assert row["device_type"] == "cpu" and row["batch"] == 4 and row["step_ms"] > 0 and row["inductor"] is None
    assert abs(sum(row["categories"].values()) - row["kernel_ms"]) < 1e-9
    assert "matrix product" in row["categories"] and "softmax" in row["categories"]
    assert len(row["kernels"]) == 5 and row["kernels"][0]["ms"] >= row["kernels"][-1]["ms"]
    assert row["category_rule"] and all(k["category"] == categorise(k["name"]) for k in row["kernels"])
    json.dumps(row)  # JSON-ready
    with pytest.raises(ValueError, match="warmup, steps and batch"):
        kernel_breakdown(C.load(QUADRATIC_YAML, profile="quick"), batch=4, device="cpu", steps=0)


def test_kernel_launchers_name_the_outermost_aten_operator():
    """A copy kernel launched inside aten::baddbmm's aten::copy_ is baddbmm's, one launched by aten::addmm
    itself is addmm's; kernels with no aten operator above them (Triton, graph replays) are left out."""
    from types import SimpleNamespace as E
    from satconv.kernels import kernel_launchers
    region = E(name="## Call CompiledFxGraph abc", cpu_parent=None, kernels=[])
    baddbmm = E(name="aten::baddbmm", cpu_parent=region, kernels=[E(name="gemm")])
    copy = E(name="aten::copy_", cpu_parent=baddbmm, kernels=[E(name="direct_copy")])
    addmm = E(name="aten::addmm", cpu_parent=region, kernels=[E(name="direct_copy"), E(name="gemm")])
    triton = E(name="triton_poi_fused_add_0", cpu_parent=region, kernels=[E(name="triton_poi_fused_add_0")])
    events = [region, baddbmm, copy, addmm, addmm, triton]
    assert kernel_launchers(events) == {"gemm": {"aten::baddbmm": 1, "aten::addmm": 2},
                                        "direct_copy": {"aten::baddbmm": 1, "aten::addmm": 2}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_kernel_launchers_find_the_bias_copy_of_addmm_into_padded_rows_on_gpu():
    """The case that cost the content models a copy per layer: addmm into an output whose rows are padded
    (not contiguous) cannot add the bias in cuBLASLt's epilogue and copies it into the output first; the
    profile attributes the copy kernels to aten::addmm.  Into a contiguous output there is no copy."""
    from satconv.kernels import kernel_launchers
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    copies = {}
    for stride in (128, 96):  # padded rows, then contiguous
        out = torch.empty_strided((256, 96), (stride, 1), device="cuda", dtype=torch.bfloat16)
        torch.addmm(bias, x, w, out=out)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.addmm(bias, x, w, out=out)
            torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), (x.float() @ w.float() + bias.float()), rtol=2e-2, atol=2e-1)
        copies[stride] = {k: v for k, v in kernel_launchers(prof.events()).items() if "copy" in k}
    # (ATen may copy more than once there, the bias in and a result buffer back: the H200 showed 2 launches)
    assert copies[128] and all(set(ops) == {"aten::addmm"} for ops in copies[128].values())
    assert not copies[96]


def test_bench_model_train_only_skips_evaluation_and_latency():
    cfg = C.load(QUADRATIC_YAML, profile="quick")
    row = timing.bench_model(cfg, batch=2, device="cpu", warmup=1, repeats=3, train_only=True)
    assert row["train_only"] and row["train_img_s"] > 0
    assert row["eval_img_s"] is None and row["latency_ms_b1"] is None and row["achieved_tflops_eval"] is None


def test_saved_activation_bytes_separates_activations_from_weights():
    """The first linear layer keeps its input (it grows with the batch), ReLU its output, which the second
    linear layer keeps as its input too (one storage, counted once), and the second layer keeps its weight
    (the first needs no input gradient, so it keeps no weight)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    per_image, fixed = timing.saved_activation_bytes(model, image_size=4, batch=3, bf16=False)
    assert per_image == 3 * 4 * 4 * 4 + 5 * 4  # float32: the flattened image, the ReLU output
    assert fixed == 2 * 5 * 4  # the second layer's weight
    with pytest.raises(ValueError):
        timing.saved_activation_bytes(model, batch=0)


def test_saved_activation_bytes_of_the_compiled_graphs_never_exceed_eager():
    """Inductor's partition keeps at most what eager autograd keeps (here: the same input, and ReLU's mask
    or output), and still grows with the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    eager, _ = timing.saved_activation_bytes(model, image_size=4, batch=3, bf16=False)
    compiled, _ = timing.saved_activation_bytes(model, image_size=4, batch=3, bf16=False, compile=True)
    assert 3 * 4 * 4 * 4 <= compiled <= eager


def test_inductor_settings_follow_the_config():
    # inductor's own patch: monkeypatch's undo deleted the setting from the config module, so compiles in
    # later tests failed ("coordinate_descent_tuning does not exist")
    import torch._inductor.config as ic
    with ic.patch(coordinate_descent_tuning=True):
        assert timing.inductor_settings()["coordinate_descent_tuning"] is True
    with ic.patch(coordinate_descent_tuning=False):
        assert timing.inductor_settings()["coordinate_descent_tuning"] is False
