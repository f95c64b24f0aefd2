"""Throughput of a config: training, evaluation and batch-1 latency on random input, and whole epochs.

:func:`bench_model` follows paper doc §4.2 B9 and §6.6: warm-up excluded (at least 1), at least 3
repeats, ``cudnn.benchmark = True``, one CUDA event pair per repeat and one synchronise at the end,
medians with p10/p90, device name, precision, batch size and torch version stored with every number.
On CPU each repeat is timed with ``time.perf_counter`` (CPU ops are synchronous), precision is forced
to fp32 and peak memory is ``null`` (the process RSS high-water mark cannot be reset between runs, so
it would not measure this model).  FLOPs for MFU come from :mod:`satconv.flops`.

Around it: :func:`bench_batch` (at the largest batch that fits, backing off when it does not),
:func:`scaling` over image sides (:func:`with_image_side`, :func:`image_side_rule`), and whole training
epochs against the model alone (:func:`epoch_timing`, :func:`epochs_from_run`,
:func:`epoch_time_projection`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import tempfile
from pathlib import Path
from typing import Iterable

import torch
import yaml

from .. import config as cfgmod
from ..config import ExperimentConfig
from ..evaluation import read_metrics, read_run_info
from ..flops import config_flops
from ..provenance import device_name, resolve_device, source_digest, utc_now
from .harness import (GIB, check_counts, device_peak_tflops, first_line, inductor_settings, is_oom,
                      make_train_step, measure_matmul_peak, percentile, random_batch, resolve_precision,
                      run_options, step_graph_conflict, synchronize, time_repeats, train_setup)
from .memory import largest_batch


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def bench_model(cfg: ExperimentConfig, batch: int = 100, device=None, precision: str | None = None,
                compile: bool = False, warmup: int = 5, repeats: int = 20, channels_last: bool = False,
                measure_peak: bool = True, train_only: bool = False) -> dict:
    """Time one config: a training step, an eval forward and batch-1 latency, on random input.

    Args:
        cfg: the experiment config (model built by ``satconv.models.build_model``).
        batch: images per training / eval step.
        device: ``None`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"fp32"`` or ``"bf16"`` (``torch.autocast`` on CUDA); ``None``: bf16 on CUDA,
            fp32 on CPU.  CPU always runs fp32 (``precision_requested`` keeps what was asked).
        compile: ``torch.compile(model, dynamic=False)``; compile time falls in the warm-up.
        warmup: untimed calls before each timed phase (>= 1).
        repeats: timed calls per phase (>= 3); medians are reported with p10/p90.
        channels_last: model and input in ``torch.channels_last`` (for the conv networks).
        measure_peak: on CUDA also time an 8192^3 GEMM for ``mfu_measured``.
        train_only: time the training step only (no evaluation pass, no batch-1 latency: with
            ``torch.compile`` each of those compiles the model again); their keys are ``None``.

    Returns:
        One JSON-ready dict.  Throughputs: ``train_img_s`` (forward, cross-entropy, backward, SGD
        step), ``eval_img_s`` (forward under ``inference_mode``), ``latency_ms_b1`` (+ p10/p90).
        ``peak_mem_gib``: CUDA ``max_memory_allocated`` during training (parameters, optimizer state
        and activations); ``null`` on CPU.  ``flops_per_image_*``: :func:`satconv.flops.flops_per_image`;
        ``achieved_tflops_train = flops_per_image_train * train_img_s``, where the model FLOPs are those
        of the explicit formulation (``flops_per_image_train_executed``: what the fast paths run, fewer
        for folded attention); ``mfu`` against the
        datasheet ``peak_tflops`` (``peak_tflops_source``), ``mfu_measured`` against the GEMM rate.
        ``satconv_source``: :func:`satconv.provenance.source_digest` of the code that ran.
        In fp32 PyTorch leaves TF32 off for matmuls but on for cuDNN convolutions
        (``tf32_matmul``/``tf32_cudnn``), so a conv network's fp32 MFU can exceed the plain-FP32
        peak (the H200's ResNet18 reached ``mfu_measured`` 1.01): compare fp32 conv MFU with care.

    Raises:
        ValueError: ``warmup < 1``, ``repeats < 3``, ``batch < 1``, an unknown precision, or
            ``train.step_graph`` under a compile mode with CUDA graphs of its own.
    """
    check_counts(warmup, repeats)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    conflict = step_graph_conflict(cfg, compile)
    if conflict:
        raise ValueError(conflict)
    device = resolve_device(device)
    requested = precision
    precision = resolve_precision(precision, device)
    is_cuda = device.type == "cuda"
    prev_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        torch.manual_seed(cfg.train.seed)
        model, run, opt = train_setup(cfg, device, precision, channels_last, compile)
        from ..models import count_parameters
        params = count_parameters(model)
        flops_train, flops_eval, flops_executed = config_flops(cfg, model, executed=True)

        # (a) training step
        model.train()
        x, y = random_batch(cfg, batch, device, channels_last)
        if is_cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        # with train.step_graph the warm-up and capture run here: the peak must see the capture, as
        # replays allocate nothing (the graph's activations stay in its private memory pool)
        step = make_train_step(run, opt, x, y, device, precision, cfg.train)
        t_train = time_repeats(step, device, warmup, repeats)
        peak_mem = torch.cuda.max_memory_allocated(device) / GIB if is_cuda else None
        opt.zero_grad(set_to_none=True)

        # (b) eval forward at the same batch
        model.eval()

        def forward(inp):
            def fn():
                with torch.inference_mode(), _autocast(device, precision):
                    return run(inp)
            return fn

        t_eval = t_lat = peak_eval = None
        if not train_only:
            if is_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t_eval = time_repeats(forward(x), device, warmup, repeats)
            peak_eval = torch.cuda.max_memory_allocated(device) / GIB if is_cuda else None

            # (c) batch-1 latency
            x1, _ = random_batch(cfg, 1, device, channels_last)
            t_lat = time_repeats(forward(x1), device, warmup, repeats)
            del x1
        model = run = opt = x = y = step = None  # release them before emptying the cache
        if is_cuda:
            gc.collect()
            torch.cuda.empty_cache()

        name = device_name(device)
        peak, source = device_peak_tflops(name, precision) if is_cuda else (None, "no datasheet peak for CPU")
        measured = None
        if is_cuda and measure_peak:
            measured = measure_matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    finally:
        torch.backends.cudnn.benchmark = prev_benchmark

    train_s = statistics.median(t_train)
    eval_s = None if t_eval is None else statistics.median(t_eval)
    train_img_s, eval_img_s = batch / train_s, None if eval_s is None else batch / eval_s
    ach_train = flops_train * train_img_s / 1e12
    ach_eval = None if eval_img_s is None else flops_eval * eval_img_s / 1e12
    m = cfg.model
    return {
        "config": cfg.name,
        "arch": m.arch,
        "attention": None if m.arch == "resnet18" else m.attention.kind,
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "precision": precision,
        "precision_requested": requested,
        "precision_note": None if is_cuda or requested in (None, "fp32") else "CPU runs in fp32",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if is_cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if is_cuda else None,
        "cpu_threads": None if is_cuda else torch.get_num_threads(),
        "compile": compile,
        "channels_last": channels_last,
        **run_options(cfg, device),
        "inductor": inductor_settings(compile) if compile else None,
        "batch": batch,
        "image_size": m.image_size,
        "params": params,
        "warmup": warmup,
        "repeats": repeats,
        "train_img_s": train_img_s,
        "train_step_ms": train_s * 1e3,
        "train_step_ms_p10": percentile(t_train, 10) * 1e3,
        "train_step_ms_p90": percentile(t_train, 90) * 1e3,
        "train_only": train_only,
        "eval_img_s": eval_img_s,
        "eval_step_ms": None if eval_s is None else eval_s * 1e3,
        "latency_ms_b1": None if t_lat is None else statistics.median(t_lat) * 1e3,
        "latency_ms_b1_p10": None if t_lat is None else percentile(t_lat, 10) * 1e3,
        "latency_ms_b1_p90": None if t_lat is None else percentile(t_lat, 90) * 1e3,
        "peak_mem_gib": peak_mem,
        "peak_mem_eval_gib": peak_eval,
        "flops_per_image_train": flops_train,
        "flops_per_image_eval": flops_eval,
        "flops_per_image_train_executed": flops_executed,
        "achieved_tflops_train": ach_train,
        "achieved_tflops_eval": ach_eval,
        "peak_tflops": peak,
        "peak_tflops_source": source,
        "mfu": None if peak is None else ach_train / peak,
        "measured_matmul_tflops": measured,
        "mfu_measured": None if measured is None else ach_train / measured,
        "date": utc_now(),
        "satconv_source": source_digest(),
    }


def oom_row(cfg: ExperimentConfig, batch, device, detail: str | None = None) -> dict:
    """The row recorded for a (config, batch) that ran out of memory.

    Returns:
        ``{"config", "arch", "image_size", "batch", "device", "torch", "error": "out of memory"}``, with
        ``error_detail`` (what was tried) when ``detail`` is given.
    """
    device = resolve_device(device)
    row = {"config": cfg.name, "arch": cfg.model.arch, "image_size": cfg.model.image_size, "batch": batch,
           "device": device_name(device), "torch": torch.__version__, "error": "out of memory"}
    if detail:
        row["error_detail"] = detail
    return row


def bench_batch(cfg: ExperimentConfig, batch: int | str, backoff: float = 0.9, tries: int = 4,
                **bench_kwargs) -> dict:
    """:func:`bench_model` at ``batch``, or at the largest batch that fits for ``batch="max"``.

    The largest batch is searched with two bare training steps
    (:func:`satconv.bench.memory.largest_batch`); the benchmark itself also holds an evaluation pass,
    timing buffers and a fragmented cache, so at that batch it can still run out of memory.  It then
    retries at ``backoff`` times the batch, up to ``tries`` times in all, and records the searched batch
    as ``batch_searched``.

    Returns:
        One row of :func:`bench_model`.

    Raises:
        RuntimeError: out of memory at a fixed batch, or at every try; for ``"max"`` the message names
            the searched batch and every batch tried.
    """
    if batch != "max":
        return bench_model(cfg, batch=batch, **bench_kwargs)
    searched = largest_batch(cfg, bench_kwargs.get("device"), bench_kwargs.get("precision"),
                             channels_last=bench_kwargs.get("channels_last", False))
    b, tried, failure = searched, [], None
    for _ in range(tries):
        tried.append(b)
        try:
            row = bench_model(cfg, batch=b, **bench_kwargs)
            row["batch_searched"] = searched
            return row
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            failure = first_line(exc)
        # outside the except block: the failed attempt's frames (and tensors) are released first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if b <= 1:
            break
        b = max(1, int(b * backoff))
    raise RuntimeError(f"out of memory at every batch tried {tried} (largest_batch found {searched}): {failure}")


# ---------------------------------------------------------------------------------------------
# Image sides
# ---------------------------------------------------------------------------------------------
def image_side_rule(cfg: ExperimentConfig) -> tuple[int, int, str]:
    """Which image sides ``cfg``'s network takes.

    Returns:
        ``(step, minimum, why)``: the sides are the multiples of ``step`` that are at least ``minimum``;
        ``why`` names the setting behind the rule ("" when any side goes).
    """
    m = cfg.model
    if m.arch == "encoder":
        return m.downsample, m.downsample, f"model.downsample is {m.downsample}"
    if m.arch == "vit":
        return m.vit.patch_size, m.vit.patch_size, f"model.vit.patch_size is {m.vit.patch_size}"
    if m.arch == "sasa":  # a 2x2 average pool before every stage but the first (three stages by default)
        stages = len(m.stage_depths or m.stage_widths or (2, 2, 2))
        return 1, 2 ** (stages - 1), f"{stages} stages, each after the first pooled 2x2"
    return 1, 1, ""


def with_image_side(cfg: ExperimentConfig, side: int) -> ExperimentConfig:
    """``cfg`` at input side ``side``; learned relative embeddings are widened to cover the token grid.

    Raises:
        satconv.config.ConfigError: the overridden config is invalid.
    """
    overrides = [f"model.image_size={side}"]
    m = cfg.model
    if m.arch != "resnet18" and m.attention.kind == "learned_relative":
        grid = -(-side // m.downsample) if m.arch == "encoder" else side
        if m.attention.learned_relative.max_position < grid:
            overrides.append(f"model.attention.learned_relative.max_position={grid}")
    return cfgmod.override(cfg, overrides, source=f"{cfg.name} at side {side}")


def scaling(cfg: ExperimentConfig, sides: Iterable[int] = (16, 32, 64), batch: int | str = 100,
            **bench_kwargs) -> list[dict]:
    """:func:`bench_model` at each image side (throughput and memory against side).

    Args:
        cfg: the experiment config.
        sides: input sides; ``model.image_size`` is overridden (and ``max_position`` for learned
            relative attention, so the embeddings cover ``side / downsample`` tokens).
        batch: images per step, or ``"max"`` for :func:`satconv.bench.memory.largest_batch` at each side.
        bench_kwargs: passed to :func:`bench_model` (device, precision, compile, warmup, ...).

    Returns:
        One row per side (``side`` added); a side that runs out of CUDA memory gives a row with
        ``error: "out of memory"`` (:func:`oom_row`) instead of stopping the sweep.
    """
    rows = []
    for side in sides:
        c = with_image_side(cfg, side)
        try:
            row = bench_batch(c, batch, **bench_kwargs)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            row = oom_row(c, batch, bench_kwargs.get("device"))
            gc.collect()
            torch.cuda.empty_cache()
        row["side"] = side
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Whole epochs
# ---------------------------------------------------------------------------------------------
def epoch_time_projection(img_s: float, epochs: int, train_images: int = 45000) -> float:
    """Hours for ``epochs`` passes over ``train_images`` images at ``img_s`` training images/s.

    45,000 = CIFAR-10's 50,000 training images minus the 5,000 held out for validation.

    Raises:
        ValueError: ``img_s <= 0``.
    """
    if img_s <= 0:
        raise ValueError(f"img_s must be > 0, got {img_s}")
    return epochs * train_images / img_s / 3600


def epoch_timing(cfg: ExperimentConfig, device=None, precision: str | None = None, compile=False,
                 channels_last: bool = False, data: str | None = None, epochs: int = 2,
                 model_only_img_s: float | None = None, synthetic_images: int = 50000, **bench_kwargs) -> dict:
    """Whole training epochs through :func:`satconv.train.train` against the model alone.

    A real epoch also indexes and augments the device-resident images, steps the schedule, and
    evaluates on the validation split; :func:`bench_model` feeds one fixed batch.  This trains
    ``epochs`` epochs (the first absorbs compilation; the last is reported) with the config's batch
    size, in a temporary run directory, without snapshots, atlas or a large test evaluation.

    Args:
        cfg: the experiment (its ``train.batch_size`` is used for both measurements).
        device, precision, compile, channels_last: as for :func:`bench_model`.
        data: an image-folder root (e.g. the unpacked CIFAR-10 JPEG copy); ``None``: generated images
            of CIFAR-10's size and count (50,000 training, 5,000 held out for validation).
        epochs: epochs to train (>= 2).
        synthetic_images: training-set size of the generated images when ``data`` is ``None``.
        model_only_img_s: the model-only throughput to compare with; ``None`` runs :func:`bench_model`.
        bench_kwargs: passed to :func:`bench_model` (warmup, repeats, ...).

    Returns:
        A JSON-ready dict: ``config``, ``device``, ``precision``, ``compile``, ``batch``, ``data`` (the
        data set's label, e.g. "CIFAR-10 (JPEG q75 copy)"), ``data_root``, ``seed``, ``epochs``,
        ``images`` (training images per epoch), ``epoch_time_s`` (last epoch, validation included),
        ``model_only_img_s``, ``ratio`` (epoch time over the model-only time for as many images),
        ``torch``, ``date`` and ``satconv_source`` (:func:`satconv.provenance.source_digest`).

    Raises:
        ValueError: ``epochs < 2``.
    """
    from ..train import train
    if epochs < 2:
        raise ValueError(f"epochs must be >= 2 (the first absorbs warm-up and compilation), got {epochs}")
    device = resolve_device(device)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = cfg.train.batch_size
    if model_only_img_s is None:
        row = bench_model(cfg, batch=batch, device=device, precision=precision, compile=compile,
                          channels_last=channels_last, **{**bench_kwargs, "train_only": True})
        model_only_img_s = row["train_img_s"]
    mode = compile if isinstance(compile, str) else "default"
    sets = [f"train.epochs={epochs}", f"train.precision={precision}", f"train.compile={str(bool(compile)).lower()}",
            f"train.compile_mode={mode}", f"train.channels_last={str(channels_last).lower()}",
            "train.snapshot_attention=false", "train.atlas_images=0", f"train.checkpoint_every={epochs}",
            f"train.test_every={epochs}", "data.test_subset=100"]
    if data is None:
        sets += ["data.source=synthetic", f"data.synthetic_train={synthetic_images}", "data.synthetic_test=1000"]
    else:
        sets += ["data.source=imagefolder", f"data.root={data}"]
    if compile:
        torch._dynamo.reset()  # a fresh compile cache for the training run (see harness.train_setup)
    with tempfile.TemporaryDirectory(prefix="satconv-epoch-") as tmp:
        result = train(cfg, out_dir=tmp, overrides=sets, device=device, progress=False)
        info = json.loads((Path(tmp) / "run.json").read_text())
    images = info["data"]["sizes"]["train"]
    last = result.metrics[-1]
    model_only_s = images / model_only_img_s
    return {"config": cfg.name, "device": device_name(device), "precision": precision, "compile": compile,
            "channels_last": channels_last, **run_options(cfg, device), "batch": batch,
            "data": info["data"]["description"], "data_root": data, "seed": info.get("seed"), "epochs": epochs,
            "images": images,
            "epoch_time_s": last["epoch_time_s"], "model_only_img_s": model_only_img_s,
            "ratio": last["epoch_time_s"] / model_only_s, "torch": torch.__version__,
            "date": utc_now(), "satconv_source": source_digest()}


def epochs_from_run(run_dir: str | Path) -> dict | None:
    """Whole-epoch timing of a finished training run, in the shape of :func:`epoch_timing`'s rows.

    The median ``epoch_time_s`` of ``metrics.jsonl`` over the epochs after the first (which absorbs
    compilation), leaving out epochs with a test pass (runs written before ``epoch_time_s`` stopped
    at validation counted the test pass in).

    Args:
        run_dir: a run directory of :func:`satconv.train.train` (``run.json``, ``metrics.jsonl``).

    Returns:
        ``{"config", "device", "batch", "data", "images", "epoch_time_s", "epochs_timed", "epochs",
        "seed", "source": "training run", "run"}``, or ``None`` when fewer than two epochs ran or no
        epoch without a test pass remains.
    """
    run_dir = Path(run_dir)
    info, rows = read_run_info(run_dir), read_metrics(run_dir)
    times = [r["epoch_time_s"] for r in rows[1:] if "test_acc" not in r and r.get("epoch_time_s")]
    if not times:
        return None
    cfg_file = run_dir / "config.yaml"
    cfg = (yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None) or {}
    return {"config": cfg.get("name") or run_dir.name, "device": info.get("device"),
            "batch": (cfg.get("train") or {}).get("batch_size"),
            "data": (info.get("data") or {}).get("description"), "images": info["data"]["sizes"]["train"],
            "epoch_time_s": statistics.median(times), "epochs_timed": len(times), "epochs": len(rows),
            "seed": info.get("seed"), "source": "training run", "run": run_dir.name}


__all__ = ["bench_model", "oom_row", "bench_batch", "image_side_rule", "with_image_side", "scaling",
           "epoch_time_projection", "epoch_timing", "epochs_from_run"]
