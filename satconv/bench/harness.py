"""What every benchmark of :mod:`satconv.bench` shares: the training step it times, timing primitives,
device peaks and the options a row records.

- the step: :func:`train_setup` (model, optimizer, compiled callable), :func:`random_batch` and
  :func:`make_train_step`, the training's own step body (:func:`satconv.steps.training_step`), so every
  benchmark times the step that training runs;
- timing (paper doc §4.2 B9): :func:`time_repeats` (warm-up excluded, CUDA events and one synchronise, or
  ``time.perf_counter`` on the CPU), :func:`percentile`, :func:`check_counts`, :func:`synchronize`;
- peaks for MFU: :data:`DEVICE_PEAKS` / :func:`device_peak_tflops` (datasheets) and
  :func:`measure_matmul_peak` (a measured GEMM);
- what a row records: :func:`resolve_precision`, :func:`run_options`, :func:`inductor_settings`,
  :func:`step_graph_conflict`; and how an out-of-memory failure is recognised (:func:`is_oom`,
  :func:`first_line`).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch

from .. import config as cfgmod
from ..attention import fused
from ..config import ExperimentConfig, TrainConfig
from ..provenance import device_name, resolve_device
from ..steps import (INDUCTOR_OPTIONS, CapturedStep, compile_model, compile_options, inductor_setting, make_optimizer,
                     training_step)

#: bytes in a GiB (peak memory is reported in GiB)
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

#: ``torch._inductor.config`` switches that change the kernels a compiled row ran (set, e.g., through
#: ``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1``)
INDUCTOR_SETTINGS = ("coordinate_descent_tuning", "max_autotune", "max_autotune_gemm", "epilogue_fusion",
                     "fallback_random")

_MATMUL_PEAK_CACHE: dict[tuple, float] = {}


# ---------------------------------------------------------------------------------------------
# Timing primitives and peaks
# ---------------------------------------------------------------------------------------------
def device_peak_tflops(name: str, precision: str) -> tuple[float | None, str]:
    """Datasheet dense peak for a device name and ``"bf16"``/``"fp32"``.

    Returns:
        ``(TFLOP/s, source)`` from the first :data:`DEVICE_PEAKS` entry whose name is in ``name``
        (case-insensitive), or ``(None, reason)`` if none is.
    """
    for key, bf16, fp32, source in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return (bf16 if precision == "bf16" else fp32), f"{source} ({precision})"
    return None, f"no datasheet entry for {name!r}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (``torch.cuda.synchronize`` on CUDA; nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_counts(warmup: int, repeats: int) -> None:
    """Refuse too few warm-up or timed calls (B9).

    Raises:
        ValueError: ``warmup < 1`` (the first steps include autotuning and compilation) or ``repeats < 3``
            (a median needs several samples).
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first steps include autotuning and compilation, B9), "
                         f"got {warmup}")
    if repeats < 3:
        raise ValueError(f"repeats must be >= 3 (a median needs several samples, B9), got {repeats}")


def time_repeats(fn: Callable[[], object], device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` for each of ``repeats`` calls after ``warmup`` untimed calls.

    CUDA: a ``torch.cuda.Event`` pair around every call, one synchronise after the last (B9);
    CPU: ``time.perf_counter`` around every call.

    Returns:
        ``repeats`` durations in seconds, in call order.

    Raises:
        ValueError: as :func:`check_counts`.
    """
    device = resolve_device(device)
    check_counts(warmup, repeats)
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


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of the non-empty ``xs``, ``q`` in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_matmul_peak(device=None, dtype: torch.dtype = torch.bfloat16, n: int = 8192, warmup: int = 3,
                        repeats: int = 10) -> float:
    """Achieved TFLOP/s of an ``n x n @ n x n`` GEMM (``2 n^3`` FLOPs), median of ``repeats``.

    The practical ceiling MFU is also reported against (``mfu_measured``); cached per
    (device, dtype, n, TF32 flag).  On CPU it runs too (use a smaller ``n``).

    Returns:
        TFLOP/s (``1e12`` FLOP/s).
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


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------
def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision a benchmark runs in: ``"bf16"`` or ``"fp32"``.

    ``None`` means bf16 on CUDA, fp32 on the CPU; the CPU always runs fp32.

    Raises:
        ValueError: ``precision`` is neither ``None``, ``"fp32"`` nor ``"bf16"``.
    """
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision if device.type == "cuda" else "fp32"


def train_setup(cfg: ExperimentConfig, device, precision: str, channels_last: bool, compile):
    """The model of ``cfg`` on ``device``, the paper's SGD (no decay on Gaussian centres and spreads) and
    the callable a step runs.

    Args:
        cfg: the experiment config (``satconv.models.build_model``; ``cfg.train`` for the optimizer).
        device: a ``torch.device``.
        precision: ``"bf16"`` or ``"fp32"`` (the step applies it, see :func:`make_train_step`).
        channels_last: the model in ``torch.channels_last``.
        compile: ``False``, or a compile mode for :func:`satconv.steps.compile_model` (dynamo's cache is
            reset first).

    Returns:
        ``(model, run, opt)``: the ``nn.Module``, the callable ``(B, C, H, W) -> (B, classes)`` (``model``
        or its compiled form) and the ``torch.optim.SGD``.
    """
    from ..models import build_model
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.train, device)
    if compile:
        # each config builds new modules, and dynamo recompiles shared code (EncoderBlock.forward...) per
        # instance; past torch._dynamo.config.cache_size_limit it silently runs eager, so start afresh
        torch._dynamo.reset()
        run = compile_model(model, compile)
    else:
        run = model
    return model, run, opt


def random_batch(cfg: ExperimentConfig, batch: int, device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``cfg``'s input shape.

    Returns:
        ``(x, y)``: ``x`` ``(batch, in_channels, image_size, image_size)`` standard-normal float32 (in
        ``channels_last`` if asked), ``y`` ``(batch,)`` int64 class indices in ``[0, num_classes)``.
    """
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, m.num_classes, (batch,), device=device)
    return x, y


def make_train_step(run, opt, x, y, device, precision, train: TrainConfig) -> Callable[[], None]:
    """A training step on the fixed batch ``(x, y)``: the training's own step body,
    :func:`satconv.steps.training_step` (forward, cross-entropy with ``train.label_smoothing`` on float32
    logits, backward, SGD step), so the benchmark times the step that training runs.

    ``train`` gives the label smoothing and ``step_graph``: on
    CUDA the whole step in one CUDA graph, :class:`satconv.steps.CapturedStep`, whose eager warm-up
    steps and capture run here, so every call of the returned step is a replay.

    Args:
        run: ``(B, C, H, W) -> (B, classes)``, from :func:`train_setup`.
        opt: its optimizer.
        x, y: the batch, from :func:`random_batch`.
        device: a ``torch.device``.
        precision: ``"bf16"`` (autocast on CUDA) or ``"fp32"``.
        train: the config's training section.

    Returns:
        A callable without arguments that runs one step (and returns nothing useful).
    """
    t = train
    bf16 = precision == "bf16" and device.type == "cuda"

    def body(xb, yb):  # the attention layers carry their routes (build_model set them from the config)
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
# What a row records
# ---------------------------------------------------------------------------------------------
def run_options(cfg: ExperimentConfig, device) -> dict:
    """The training options a bench, epoch or kernel row ran with.

    Returns:
        ``{"attention_route", "shared_route", "step_graph", "fused_backward", "fused_forward",
        "fused_launch"}``: the attention routes, ``step_graph`` where it applied (CUDA only: a CPU row ran
        plain steps), ``fused_backward``: whether a folded content attention's backward would run the fused
        Triton kernel (``train.fused_backward``, on CUDA with Triton; models without one ignore it),
        ``fused_forward`` the same for the fused forward kernel, and ``fused_launch`` the kernels' launch
        table where either runs (:func:`satconv.attention.fused.launch_table`, else ``None``).
    """
    t = cfg.train
    runs = fused.available() and torch.device(device).type == "cuda"
    backward, forward = runs and t.fused_backward, runs and t.fused_forward
    return {"attention_route": t.attention_route, "shared_route": t.shared_route,
            "step_graph": t.step_graph and torch.device(device).type == "cuda",
            "fused_backward": backward, "fused_forward": forward,
            "fused_launch": fused.launch_table() if backward or forward else None}


def step_graph_conflict(cfg: ExperimentConfig, compile) -> str | None:
    """Why ``cfg.train.step_graph`` cannot run under ``compile``, or ``None`` when it can.

    Returns:
        ``None``, or a one-line message naming the compile modes that can.
    """
    if cfg.train.step_graph and compile in cfgmod.CUDA_GRAPH_COMPILE_MODES:
        return (f"train.step_graph captures the whole step in a CUDA graph: compile mode {compile!r} adds CUDA "
                f"graphs of its own; use --compile (default) or --compile max-autotune-no-cudagraphs")
    return None


def inductor_settings(mode: str | bool | None = None) -> dict:
    """The inductor settings a compiled row ran with.

    Returns:
        ``{setting: value}``: the values of :data:`INDUCTOR_SETTINGS` (and of
        :data:`satconv.steps.INDUCTOR_OPTIONS`) in this process, missing ones left out, overlaid with those
        satconv's compile sets (:func:`satconv.steps.compile_options` of compile ``mode``).
    """
    missing = object()
    found = {key: inductor_setting(key, missing) for key in (*INDUCTOR_SETTINGS, *INDUCTOR_OPTIONS)}
    return {**{k: v for k, v in found.items() if v is not missing}, **compile_options(mode)}


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (``torch.OutOfMemoryError``, or a message saying
    "out of memory")."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name."""
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


__all__ = ["GIB", "DEVICE_PEAKS", "INDUCTOR_SETTINGS", "device_peak_tflops", "synchronize", "check_counts",
           "time_repeats", "percentile", "measure_matmul_peak", "resolve_precision", "train_setup", "random_batch",
           "make_train_step", "run_options", "step_graph_conflict", "inductor_settings", "is_oom", "first_line"]
