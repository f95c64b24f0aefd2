"""Benchmark harness and FLOP counting (``python -m satconv bench``; issue 5, measurement side).

FLOPs come from :mod:`satconv.flops` (re-exported here): every product the network runs
(:func:`flops_per_image`, used for MFU) and the paper's Table-1 convention (:func:`paper_convention_flops`).

Timing (:func:`bench_model`) follows paper doc §4.2 B9 and §6.6: warm-up excluded (at least 1),
at least 3 repeats, ``cudnn.benchmark = True``, one CUDA event pair per repeat and one synchronise
at the end, medians with p10/p90, device name, precision, batch size and torch version stored with
every number.  On CPU each repeat is timed with ``time.perf_counter`` (CPU ops are synchronous),
precision is forced to fp32 and peak memory is ``null`` (the process RSS high-water mark cannot be
reset between runs, so it would not measure this model).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import yaml

from . import config as cfgmod
from .flops import _config_flops, flops_per_image, paper_convention_flops  # noqa: F401 (public here too)
from .attention import fused
from .attention.base import attention_routes
from .config import ExperimentConfig, TrainConfig
from .provenance import device_name, resolve_device, source_digest
from .steps import (INDUCTOR_OPTIONS, CapturedStep, compile_model, compile_options, inductor_setting, make_optimizer,
                    training_step)

GIB = 2 ** 30

#: Dense (no sparsity) datasheet peaks in TFLOP/s: (name substring, bf16 tensor core, fp32 non-tensor).
#: Matched in order against ``torch.cuda.get_device_name``; more specific names first.  fp32 is the
#: plain FP32 rate: PyTorch leaves TF32 matmuls off by default (the JSON records the flag).
DEVICE_PEAKS: list[tuple[str, float, float, str]] = [
    ("H200 NVL", 835.5, 60.0, "NVIDIA H200 NVL datasheet, dense"),
    ("H200", 989.4, 66.9, "NVIDIA H200 SXM datasheet, dense"),
    ("H100 NVL", 835.5, 60.0, "NVIDIA H100 NVL datasheet (per GPU), dense"),
    ("H100 PCIe", 756.5, 51.2, "NVIDIA H100 PCIe datasheet, dense"),
    ("H100", 989.4, 66.9, "NVIDIA H100 SXM datasheet, dense"),
    ("A100", 312.0, 19.5, "NVIDIA A100 datasheet, dense"),
    ("L40S", 362.1, 91.6, "NVIDIA L40S datasheet, dense"),
    ("L4", 121.0, 30.3, "NVIDIA L4 datasheet, dense"),
]

_MATMUL_PEAK_CACHE: dict[tuple, float] = {}


# ---------------------------------------------------------------------------------------------
# Devices, peaks, timing primitives
# ---------------------------------------------------------------------------------------------
def device_peak_tflops(name: str, precision: str) -> tuple[float | None, str]:
    """Datasheet dense peak for a device name and ``"bf16"``/``"fp32"``; ``(None, reason)`` if unknown."""
    for key, bf16, fp32, source in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return (bf16 if precision == "bf16" else fp32), f"{source} ({precision})"
    return None, f"no datasheet entry for {name!r}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` for each of ``repeats`` calls after ``warmup`` untimed calls.

    CUDA: a ``torch.cuda.Event`` pair around every call, one synchronise after the last (B9);
    CPU: ``time.perf_counter`` around every call.
    """
    device = resolve_device(device)
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_matmul_peak(device=None, dtype: torch.dtype = torch.bfloat16, n: int = 8192, warmup: int = 3,
                        repeats: int = 10) -> float:
    """Achieved TFLOP/s of an ``n x n @ n x n`` GEMM (``2 n^3`` FLOPs), median of ``repeats``.

    The practical ceiling MFU is also reported against (``mfu_measured``); cached per
    (device, dtype, n, TF32 flag).  On CPU it runs too (use a smaller ``n``).
    """
    device = resolve_device(device)
    key = (str(device), device_name(device), dtype, n, torch.backends.cuda.matmul.allow_tf32)
    if key not in _MATMUL_PEAK_CACHE:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_repeats(lambda: torch.mm(a, b), device, warmup, repeats)
        _MATMUL_PEAK_CACHE[key] = 2 * n ** 3 / statistics.median(times) / 1e12
        del a, b
    return _MATMUL_PEAK_CACHE[key]


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first steps include autotuning and compilation, B9), "
                         f"got {warmup}")
    if repeats < 3:
        raise ValueError(f"repeats must be >= 3 (a median needs several samples, B9), got {repeats}")


def _resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision if device.type == "cuda" else "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_setup(cfg: ExperimentConfig, device, precision: str, channels_last: bool, compile: bool):
    """Model on device, the paper's SGD (no decay on Gaussian centres/spreads), and a step function."""
    from .models import build_model
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    opt = make_optimizer(model, t, device)
    if compile:
        # each config builds new modules, and dynamo recompiles shared code (EncoderBlock.forward...) per
        # instance; past torch._dynamo.config.cache_size_limit it silently runs eager, so start afresh
        torch._dynamo.reset()
        run = compile_model(model, compile)
    else:
        run = model
    return model, run, opt


def _inputs(cfg: ExperimentConfig, batch: int, device, channels_last: bool):
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, m.num_classes, (batch,), device=device)
    return x, y


def run_options(cfg: ExperimentConfig, device) -> dict:
    """The training options a bench, epoch or kernel row ran with: the attention routes, ``step_graph``
    where it applied (CUDA only: a CPU row ran plain steps), and ``fused_backward``: whether a folded
    content attention's backward would run the fused Triton kernel (:func:`satconv.attention.fused.on_device`;
    models without one ignore it), ``fused_forward`` the same for the fused forward kernel, and
    ``fused_launch`` the kernels' launch table where either runs (:func:`satconv.attention.fused.launch_table`,
    else ``None``)."""
    t = cfg.train
    backward, forward = fused.on_device(device), fused.forward_on_device(device)
    return {"attention_route": t.attention_route, "shared_route": t.shared_route,
            "step_graph": t.step_graph and torch.device(device).type == "cuda",
            "fused_backward": backward, "fused_forward": forward,
            "fused_launch": fused.launch_table() if backward or forward else None}


def step_graph_conflict(cfg: ExperimentConfig, compile) -> str | None:
    """Why ``cfg.train.step_graph`` cannot run under ``compile``, or ``None`` when it can."""
    if cfg.train.step_graph and compile in cfgmod.CUDA_GRAPH_COMPILE_MODES:
        return (f"train.step_graph captures the whole step in a CUDA graph: compile mode {compile!r} adds CUDA "
                f"graphs of its own; use --compile (default) or --compile max-autotune-no-cudagraphs")
    return None


def _make_train_step(run, opt, x, y, device, precision, train: TrainConfig):
    """A training step on the fixed batch ``(x, y)``: the training's own step body,
    :func:`satconv.steps.training_step` (forward, cross-entropy with ``train.label_smoothing`` on float32
    logits, backward, SGD step), so the benchmark times the step that training runs.

    ``train`` gives the attention routes (``attention_route``, ``shared_route``) and ``step_graph``: on
    CUDA the whole step in one CUDA graph, :class:`satconv.steps.CapturedStep`, whose eager warm-up
    steps and capture run here, so every call of the returned step is a replay.
    """
    t = train
    bf16 = precision == "bf16" and device.type == "cuda"

    def body(xb, yb):
        with attention_routes(t.attention_route, t.shared_route):
            return training_step(run, opt, xb, yb, bf16=bf16, label_smoothing=t.label_smoothing)

    if t.step_graph and device.type == "cuda":
        captured = CapturedStep(body, opt)
        for _ in range(captured.warmup + 1):
            captured(x, y)
        return lambda: captured(x, y)

    def step():
        opt.zero_grad(set_to_none=True)
        body(x, y)
    return step


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
        and activations); ``null`` on CPU.  ``flops_per_image_*``: :func:`flops_per_image`;
        ``achieved_tflops_train = flops_per_image_train * train_img_s``, where the model FLOPs are those
        of the explicit formulation (``flops_per_image_train_executed``: what the fast paths run, fewer
        for folded attention); ``mfu`` against the
        datasheet ``peak_tflops`` (``peak_tflops_source``), ``mfu_measured`` against the GEMM rate.
        ``satconv_source``: :func:`satconv.provenance.source_digest` of the code that ran.
        In fp32 PyTorch leaves TF32 off for matmuls but on for cuDNN convolutions
        (``tf32_matmul``/``tf32_cudnn``), so a conv network's fp32 MFU can exceed the plain-FP32
        peak (the H200's ResNet18 reached ``mfu_measured`` 1.01): compare fp32 conv MFU with care.

    Raises:
        ValueError: ``warmup < 1``, ``repeats < 3``, ``batch < 1`` or an unknown precision.
    """
    _check_counts(warmup, repeats)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    conflict = step_graph_conflict(cfg, compile)
    if conflict:
        raise ValueError(conflict)
    device = resolve_device(device)
    requested = precision
    precision = _resolve_precision(precision, device)
    is_cuda = device.type == "cuda"
    prev_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    with attention_routes(cfg.train.attention_route, cfg.train.shared_route):
        try:
            torch.manual_seed(cfg.train.seed)
            model, run, opt = _train_setup(cfg, device, precision, channels_last, compile)
            from .models import count_parameters
            params = count_parameters(model)
            flops_train, flops_eval, flops_executed = _config_flops(cfg, model, executed=True)

            # (a) training step
            model.train()
            x, y = _inputs(cfg, batch, device, channels_last)
            if is_cuda:
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
            # with train.step_graph the warm-up and capture run here: the peak must see the capture, as
            # replays allocate nothing (the graph's activations stay in its private memory pool)
            step = _make_train_step(run, opt, x, y, device, precision, cfg.train)
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
                x1, _ = _inputs(cfg, 1, device, channels_last)
                t_lat = time_repeats(forward(x1), device, warmup, repeats)
                del x1
            del model, run, opt, x, y, step
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
        "train_step_ms_p10": _percentile(t_train, 10) * 1e3,
        "train_step_ms_p90": _percentile(t_train, 90) * 1e3,
        "train_only": train_only,
        "eval_img_s": eval_img_s,
        "eval_step_ms": None if eval_s is None else eval_s * 1e3,
        "latency_ms_b1": None if t_lat is None else statistics.median(t_lat) * 1e3,
        "latency_ms_b1_p10": None if t_lat is None else _percentile(t_lat, 10) * 1e3,
        "latency_ms_b1_p90": None if t_lat is None else _percentile(t_lat, 90) * 1e3,
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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "satconv_source": source_digest(),
    }


def saved_activation_bytes(model: torch.nn.Module, image_size: int = 32, batch: int = 2, explicit: bool = False,
                           bf16: bool = True, compile: bool = False) -> tuple[float, float]:
    """Bytes autograd keeps for the backward pass of a training forward pass: per image, and fixed.

    Counted on the CPU with ``torch.autograd.graph.saved_tensors_hooks``: each storage that a saved
    tensor views is counted once, whole (views of one tensor share it).  Two batches, ``batch`` and
    ``2 * batch``, separate what grows with the batch (the activations) from what does not (weights
    and products of weights, such as the folded query-key matrices).  Eager, this is what the code
    asks autograd to keep; with ``compile`` it is what inductor's partition of the forward and backward
    graphs keeps (it recomputes cheap element-wise work; one CPU compilation per batch size).

    Args:
        model: ``images (B, 3, image_size, image_size) -> logits``, on the CPU, in training mode (restored).
        image_size: input side.
        batch: the smaller of the two batches (>= 1).
        explicit: count the explicit route (:func:`satconv.attention.explicit_paths`) instead of the fast paths.
        bf16: under bf16 CPU autocast (the dtypes of a bf16 GPU run).
        compile: count the ``torch.compile(model, dynamic=False)`` graphs (on the CPU).

    Returns:
        ``(bytes_per_image, fixed_bytes)``.
    """
    from .attention.base import explicit_paths
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    was_training = model.training
    model.train()
    run = model
    if compile:
        run = compile_model(model)

    def total(b: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return t
        x = torch.randn(b, 3, image_size, image_size)
        with explicit_paths(explicit), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(x)
        del out
        return sum(storages.values())

    try:
        small, large = total(batch), total(2 * batch)
    finally:
        model.train(was_training)
    per_image = (large - small) / batch
    return per_image, small - per_image * batch


#: ``torch._inductor.config`` switches that change the kernels a compiled row ran (set, e.g., through
#: ``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1``)
INDUCTOR_SETTINGS = ("coordinate_descent_tuning", "max_autotune", "max_autotune_gemm", "epilogue_fusion",
                     "fallback_random")


def fused_launch_sweep(cfg: ExperimentConfig, batch: int = 100, device=None, precision: str | None = None,
                       rows_per_program: Sequence[int] = (1, 2, 4, 8, 16), warps: Sequence[int] = (1, 2, 4, 8),
                       warmup: int = 5, repeats: int = 20) -> list[dict]:
    """Time the fused softmax-dropout kernels (:mod:`satconv.attention.fused`) at every launch shape.

    One eager training step of ``cfg`` records the arguments of the first call of each kernel; each kernel
    is then timed on those arguments at every ``(rows per program, warps)`` pair
    (:data:`satconv.attention.fused.LAUNCH` is set for the call and restored).  The fastest pair per kernel
    is what ``LAUNCH`` should hold for that row block.

    Args:
        cfg: an experiment config whose model has a folded content attention (learned + content, ViT).
        batch: images in the recorded step (the scores are ``(batch, N * heads, N_key)``).
        device, precision: as in :func:`bench_model` (a CUDA device).
        rows_per_program, warps: the launch pairs to time.
        warmup, repeats: untimed and timed calls per pair (:func:`time_repeats`; the median is reported).

    Returns:
        One dict per (kernel, rows per program, warps): ``kernel``, ``block`` (the row block, a power of
        two), ``shape`` (the scores' ``(B, R, Nk)``), ``rows_per_program``, ``warps``, ``us`` (median
        microseconds per call), ``fastest`` (the best of its kernel), ``current`` (the pair
        :func:`~satconv.attention.fused.launch_shape` picks now), and the config, device, precision,
        torch version, date and ``satconv_source``.

    Raises:
        RuntimeError: not a CUDA device, Triton missing, or ``cfg``'s model calls neither kernel.
    """
    device = resolve_device(device)
    if device.type != "cuda" or not fused.available():
        raise RuntimeError(f"the fused kernels run on CUDA with Triton; device {device} cannot time them")
    precision = _resolve_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model, run, opt = _train_setup(cfg, device, precision, False, False)
    model.train()
    x, y = _inputs(cfg, batch, device, False)
    plain = cfgmod.override(cfg, ["train.step_graph=false"], source=cfg.name).train  # eager: the calls are seen
    calls = {}

    def recording(kernel, original):
        def call(*args):
            calls.setdefault(kernel, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
            return original(*args)
        return call

    originals = fused.softmax_dropout_forward, fused.softmax_dropout_backward
    fused.softmax_dropout_forward = recording("forward", originals[0])
    fused.softmax_dropout_backward = recording("backward", originals[1])
    try:
        with fused.use_fused_forward(), fused.use_fused_backward():
            _make_train_step(run, opt, x, y, device, precision, plain)()
    finally:
        fused.softmax_dropout_forward, fused.softmax_dropout_backward = originals
    if not calls:
        raise RuntimeError(f"{cfg.name}: the model calls neither fused kernel (no folded content attention)")
    common = {"config": cfg.name, "device": device_name(device), "precision": precision, "batch": batch,
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "satconv_source": source_digest()}
    rows = []
    table = dict(fused.LAUNCH)
    try:
        for kernel, args in sorted(calls.items()):
            scores = args[0] if kernel == "forward" else args[1]
            block = fused.row_block(scores.shape[-1])
            fn = dict(forward=originals[0], backward=originals[1])[kernel]
            current = fused.launch_shape(kernel, block)
            found = []
            for per in rows_per_program:
                for w in warps:
                    fused.LAUNCH[(kernel, block)] = (per, w)
                    us = statistics.median(time_repeats(lambda: fn(*args), device, warmup, repeats)) * 1e6
                    found.append({"kernel": kernel, "block": block, "shape": list(scores.shape),
                                  "rows_per_program": per, "warps": w, "us": us, "current": (per, w) == current})
            best = min(r["us"] for r in found)
            rows += [{**r, "fastest": r["us"] == best, **common} for r in found]
    finally:
        fused.LAUNCH.clear()
        fused.LAUNCH.update(table)
    return rows


def inductor_settings(mode: str | bool | None = None) -> dict:
    """The values of :data:`INDUCTOR_SETTINGS` in this process (missing ones are left out), and those
    satconv's compile sets over them (:func:`satconv.steps.compile_options` of compile ``mode``)."""
    missing = object()
    found = {key: inductor_setting(key, missing) for key in (*INDUCTOR_SETTINGS, *INDUCTOR_OPTIONS)}
    return {**{k: v for k, v in found.items() if v is not missing}, **compile_options(mode)}


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name."""
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(cfg: ExperimentConfig, device=None, precision: str | None = None, start: int = 100,
                  limit_gib: float | None = None, max_batch: int = 1 << 16, channels_last: bool = False) -> int:
    """Largest training batch that fits: double from ``start`` until a step fails, then bisect.

    A batch fits when two eager training steps run without CUDA OOM and, if ``limit_gib`` is given,
    their peak allocated memory stays below it.  The search runs eager (``torch.compile`` usually
    needs less memory, so the answer is conservative for compiled runs).

    Args:
        cfg: the experiment config.
        device: CUDA device; on CPU ``start`` is returned unchanged.
        precision: as in :func:`bench_model`.
        start: first batch tried.
        limit_gib: optional memory cap in GiB.
        max_batch: stop doubling here.

    Returns:
        The largest fitting batch (exact, not rounded).

    Raises:
        RuntimeError: not even batch 1 fits.
    """
    device = resolve_device(device)
    if device.type != "cuda":
        return start
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    precision = _resolve_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model, run, opt = _train_setup(cfg, device, precision, channels_last, compile=False)
    model.train()

    def fits(b: int) -> bool:
        ok = True
        try:
            x, y = _inputs(cfg, b, device, channels_last)
            step = _make_train_step(run, opt, x, y, device, precision, cfg.train)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            step()
            torch.cuda.synchronize(device)
            if limit_gib is not None and torch.cuda.max_memory_allocated(device) > limit_gib * GIB:
                ok = False
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            ok = False
        x = y = step = None
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    prev_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        lo, hi, b = 0, None, min(start, max_batch)
        while True:
            if fits(b):
                lo = b
                if b >= max_batch:
                    break
                b = min(2 * b, max_batch)
            else:
                hi = b
                break
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
    finally:
        torch.backends.cudnn.benchmark = prev_benchmark
        del model, run, opt
        gc.collect()
        torch.cuda.empty_cache()
    if lo < 1:
        raise RuntimeError(f"{cfg.name}: not even batch 1 fits on {device_name(device)}")
    return lo


def bench_batch(cfg: ExperimentConfig, batch: int | str, backoff: float = 0.9, tries: int = 4,
                **bench_kwargs) -> dict:
    """:func:`bench_model` at ``batch``, or at the largest batch that fits for ``batch="max"``.

    The largest batch is searched with two bare training steps; the benchmark itself also holds an
    evaluation pass, timing buffers and a fragmented cache, so at that batch it can still run out of
    memory.  It then retries at ``backoff`` times the batch, up to ``tries`` times in all, and records
    the searched batch as ``batch_searched``.

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
            if not _is_oom(exc):
                raise
            failure = _first_line(exc)
        # outside the except block: the failed attempt's frames (and tensors) are released first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if b <= 1:
            break
        b = max(1, int(b * backoff))
    raise RuntimeError(f"out of memory at every batch tried {tried} (largest_batch found {searched}): {failure}")


def with_image_side(cfg: ExperimentConfig, side: int) -> ExperimentConfig:
    """``cfg`` at input side ``side``; learned relative embeddings are widened to cover the token grid."""
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
        batch: images per step, or ``"max"`` for :func:`largest_batch` at each side.
        bench_kwargs: passed to :func:`bench_model` (device, precision, compile, warmup, ...).

    Returns:
        One row per side (``side`` added); a side that runs out of CUDA memory gives a row with
        ``error: "out of memory"`` instead of stopping the sweep.
    """
    rows = []
    for side in sides:
        c = with_image_side(cfg, side)
        try:
            row = bench_batch(c, batch, **bench_kwargs)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            row = _oom_row(c, batch, bench_kwargs.get("device"))
            gc.collect()
            torch.cuda.empty_cache()
        row["side"] = side
        rows.append(row)
    return rows


def _oom_row(cfg: ExperimentConfig, batch, device, detail: str | None = None) -> dict:
    """The row recorded for a (config, batch) that ran out of memory; ``detail``: what was tried."""
    device = resolve_device(device)
    row = {"config": cfg.name, "arch": cfg.model.arch, "image_size": cfg.model.image_size, "batch": batch,
           "device": device_name(device), "torch": torch.__version__, "error": "out of memory"}
    if detail:
        row["error_detail"] = detail
    return row


def epoch_time_projection(img_s: float, epochs: int, train_images: int = 45000) -> float:
    """Hours for ``epochs`` passes over ``train_images`` images at ``img_s`` training images/s.

    45,000 = CIFAR-10's 50,000 training images minus the 5,000 held out for validation.
    """
    if img_s <= 0:
        raise ValueError(f"img_s must be > 0, got {img_s}")
    return epochs * train_images / img_s / 3600


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _batch_arg(text: str):
    if text == "max":
        return "max"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'max', got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def append_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Append rows to a JSON-lines file by atomically rewriting it (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    text = old + "".join(json.dumps(r) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _image_side_rule(cfg: ExperimentConfig) -> tuple[int, int, str]:
    """``(step, minimum, why)``: the image sides ``cfg``'s network takes are the multiples of ``step``
    that are at least ``minimum``; ``why`` names the setting behind the rule ("" when any side goes)."""
    m = cfg.model
    if m.arch == "encoder":
        return m.downsample, m.downsample, f"model.downsample is {m.downsample}"
    if m.arch == "vit":
        return m.vit.patch_size, m.vit.patch_size, f"model.vit.patch_size is {m.vit.patch_size}"
    if m.arch == "sasa":  # a 2x2 average pool before every stage but the first (three stages by default)
        stages = len(m.stage_depths or m.stage_widths or (2, 2, 2))
        return 1, 2 ** (stages - 1), f"{stages} stages, each after the first pooled 2x2"
    return 1, 1, ""


def _check_sides(parser: argparse.ArgumentParser, path: str, cfg: ExperimentConfig, sides) -> None:
    """Refuse (exit 2) an image side ``cfg``'s network cannot take, before anything is benchmarked."""
    step, minimum, why = _image_side_rule(cfg)
    for side in sides:
        if side % step or side < minimum:
            allowed = f"multiples of {step}" if step > 1 else f"sides >= {minimum}"
            parser.error(f"--sides {side}: {path} cannot take images of side {side} ({why}); allowed: {allowed}")
        try:
            with_image_side(cfg, side)
        except cfgmod.ConfigError as exc:
            parser.error(f"--sides {side}: {path} cannot take images of side {side}: {exc.key}: got {exc.value!r}; "
                         f"{exc.allowed}")


def _out_problem(out: str) -> str | None:
    """Why rows cannot be appended to ``out`` (``None``: they can); tried before any benchmark runs.

    :func:`append_jsonl` creates the missing folders and replaces the file through a temporary file
    beside it, so the nearest existing folder must take a new file.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        return f"{path} is a directory; --out takes a .jsonl file"
    if path.exists() and not os.access(path, os.R_OK):
        return f"{path} cannot be read (rows are appended to what it holds)"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".satconv-bench-", suffix=".probe")
    except OSError as exc:
        return f"cannot create a file in {folder} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def _image_folder_problem(data: str) -> str | None:
    """Why ``data`` is not an image-folder root (``None``: it has ``train/`` and ``test/`` folders)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        return "no such directory" if not root.exists() else "not a directory"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            return f"no {split}/ folder in it"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` command's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m satconv bench",
        description="Time training, evaluation and batch-1 latency of one or more configs on random "
                    "CIFAR-shaped input; one JSON line per (config, batch[, side]) on stdout.")
    p.add_argument("--config", nargs="+", required=True, help="YAML config files")
    p.add_argument("--batch", nargs="+", type=_batch_arg, default=[100],
                   help="batch sizes; 'max' = the largest training batch that fits (CUDA)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU (CPU always runs fp32)")
    p.add_argument("--compile", nargs="?", const="default", default=False,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the model, optionally naming the mode (CUDA graphs: reduce-overhead, "
                        "max-autotune)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--warmup", type=_positive_int, default=5, help="untimed steps per phase (>= 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per phase (>= 3)")
    p.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default=None, help="config profile overlay")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--sides", nargs="+", type=_positive_int, default=None,
                   help="scaling mode: bench at these image sides (e.g. 16 32 64)")
    p.add_argument("--out", default=None, help="also append the rows to this .jsonl file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--no-gemm-peak", action="store_true", help="skip the 8192^3 GEMM used for mfu_measured")
    p.add_argument("--train-only", action="store_true",
                   help="time the training step only (no evaluation pass or batch-1 latency, each of which "
                        "compiles the model again)")
    p.add_argument("--epoch", action="store_true",
                   help="time whole training epochs (data, augmentation, step, validation) against the model alone, "
                        "at the config's batch size")
    p.add_argument("--data", default=None, help="with --epoch: an image-folder root (default: generated images)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="with --epoch: epochs to train (>= 2)")
    p.add_argument("--no-fused-forward", action="store_true",
                   help="run the folded attention's forward softmax and dropout as inductor's kernels, not the "
                        "fused Triton kernel (satconv.attention.fused; rows record fused_forward)")
    p.add_argument("--no-fused-backward", action="store_true",
                   help="the same for the backward pass (rows record fused_backward)")
    p.add_argument("--fused-launch", action="store_true",
                   help="instead of timing models: time the fused softmax-dropout kernels at every launch shape "
                        "(rows per program x warps) on the configs' attention sizes (CUDA; --batch takes sizes)")
    p.add_argument("--kernels", action="store_true",
                   help="instead of timing: profile 3 training steps and split their kernel time by category "
                        "(satconv.kernels; --batch takes sizes, not 'max')")
    return p


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
    """
    from .train import train
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
        torch._dynamo.reset()  # a fresh compile cache for the training run (see _train_setup)
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
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "satconv_source": source_digest()}


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
    info = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
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


def bench_main(argv: list[str] | None = None) -> int:
    """``python -m satconv bench ...``: parse ``argv``, bench every (config, batch[, side]).

    Prints one JSON line per row to stdout (and appends them to ``--out``).  Bad arguments print
    the usage and exit with status 2 (``SystemExit``).  Returns 0, or 1 if some row ran out of memory.
    ``--no-fused-forward`` and ``--no-fused-backward`` hold for the whole command.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fused_launch and (args.no_fused_forward or args.no_fused_backward):
        parser.error("--fused-launch times the fused kernels: it takes no --no-fused-forward or --no-fused-backward")
    with fused.use_fused_forward(not args.no_fused_forward), fused.use_fused_backward(not args.no_fused_backward):
        return _bench(parser, args)


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3, got {args.repeats}")
    if args.epoch and args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: --epoch trains at least 2 epochs (the first absorbs warm-up and "
                     f"compilation; the last is timed)")
    if args.data is not None:
        if not args.epoch:
            parser.error("--data applies only with --epoch (whole-epoch timing on an image folder)")
        problem = _image_folder_problem(args.data)
        if problem:
            parser.error(f"--data {args.data}: {problem}; expected an image-folder root laid out as "
                         f"DIR/train/<class>/*.jpg|png and DIR/test/<class>/*.jpg|png")
    if args.out is not None:
        problem = _out_problem(args.out)
        if problem:
            parser.error(f"--out {args.out}: cannot write the rows there: {problem}")
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    configs = []
    for path in args.config:
        try:
            configs.append(cfgmod.load(path, args.set, args.profile))
        except (FileNotFoundError, cfgmod.ConfigError) as exc:
            parser.error(str(exc))
        conflict = step_graph_conflict(configs[-1], args.compile)
        if conflict:
            parser.error(f"{path}: {conflict}")
        if args.sides:
            _check_sides(parser, path, configs[-1], args.sides)
    kw = dict(device=device, precision=args.precision, compile=args.compile, warmup=args.warmup,
              repeats=args.repeats, channels_last=args.channels_last, measure_peak=not args.no_gemm_peak,
              train_only=args.train_only)
    status = 0
    if args.fused_launch:
        if "max" in args.batch or args.sides or args.epoch or args.kernels:
            parser.error("--fused-launch takes fixed batch sizes and no --sides, --epoch or --kernels")
        if device.type != "cuda":
            parser.error("--fused-launch times Triton kernels on a CUDA device")
        for cfg in configs:
            for batch in args.batch:
                rows = fused_launch_sweep(cfg, batch=batch, device=device, precision=args.precision,
                                          warmup=args.warmup, repeats=args.repeats)
                for row in rows:
                    print(json.dumps(row), flush=True)
                if args.out:
                    append_jsonl(args.out, rows)
        return status
    if args.kernels:  # where a training step's time goes, by kernel category
        if "max" in args.batch or args.sides or args.epoch:
            parser.error("--kernels takes fixed batch sizes and no --sides or --epoch")
        from .kernels import kernel_breakdown
        for cfg in configs:
            for batch in args.batch:
                row = kernel_breakdown(cfg, batch=batch, device=device, precision=args.precision,
                                       compile=args.compile, channels_last=args.channels_last, warmup=args.warmup)
                print(json.dumps(row), flush=True)
                if args.out:
                    append_jsonl(args.out, [row])
        return status
    if args.epoch:  # whole epochs against the model alone, at each config's own batch size
        for cfg in configs:
            row = epoch_timing(cfg, data=args.data, epochs=args.epochs, **kw)
            print(json.dumps(row), flush=True)
            if args.out:
                append_jsonl(args.out, [row])
        return status
    for cfg in configs:
        for batch in args.batch:
            if args.sides:
                rows = scaling(cfg, args.sides, batch=batch, **kw)
            else:
                try:
                    rows = [bench_batch(cfg, batch, **kw)]
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                    rows = [_oom_row(cfg, batch, device, detail=_first_line(exc, 400))]
            for row in rows:
                if batch == "max":
                    row["batch_mode"] = "max"
                status |= int("error" in row)
                print(json.dumps(row), flush=True)
            if args.out:
                append_jsonl(args.out, rows)
    return status


__all__ = ["fused_launch_sweep", "flops_per_image", "paper_convention_flops", "saved_activation_bytes", "run_options", "step_graph_conflict",
           "bench_model", "largest_batch", "scaling", "epochs_from_run", "bench_batch",
           "with_image_side", "measure_matmul_peak", "device_peak_tflops", "device_name", "resolve_device",
           "time_repeats", "epoch_time_projection", "epoch_timing", "append_jsonl", "build_parser", "bench_main", "DEVICE_PEAKS"]


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
