"""Where a training step spends its time: the device kernels of a few profiled steps, by category.

``python -m satconv bench --kernels`` (or :func:`kernel_breakdown`) runs the training step of
:func:`satconv.bench.throughput.bench_model` (same model, optimizer, precision, compile mode and random input),
profiles a few steps with ``torch.profiler`` after the warm-up, and reports per step:

- the wall time of a step (CUDA events, or ``time.perf_counter`` on the CPU) and the summed time of
  the kernels (on the CPU: of the aten operators, self time), whose difference is launch overhead and
  idle time;
- that time by category (:func:`categorise`: matrix products, convolutions, softmax, normalisation,
  layout copies, optimizer, other element-wise work);
- the most expensive kernels with their calls per step, and for the kernels an aten operator launched
  (a cuBLAS GEMM, a copy ATen makes inside ``addmm``) which operators and how often
  (:func:`kernel_launchers`; not under CUDA graphs, whose replays have no operators).

Under CUDA graphs (``reduce-overhead``) the profiler still sees the replayed kernels; with
``--compile default`` the kernel names show inductor's fusions.  Kernel times do not depend on the
compile mode, launch gaps do.
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys

import torch

from ..config import ExperimentConfig
from ..provenance import device_name, resolve_device, source_digest, utc_now
from .harness import (inductor_settings, make_train_step, random_batch, resolve_precision, run_options, synchronize,
                      time_repeats, train_setup)

#: (category, pattern) in priority order: the first pattern found in a kernel's lower-cased name wins.
#: Inductor names fused kernels after every op they hold, so softmax and normalisation come first.
CATEGORIES: list[tuple[str, str]] = [
    ("softmax", r"softmax"),
    ("normalisation", r"layer_norm|batch_norm|group_norm|native_norm"),
    ("convolution", r"conv|implicit_gemm|fprop|dgrad|wgrad|winograd"),
    ("matrix product", r"gemm|nvjet|cutlass|cublas|splitk|\bmm\b|aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b|triton_mm"),
    ("layout copy", r"_copy|\bcopy_|clone|permute|transpose|contiguous|\bcat\b|_cat_|constant_pad"),
    ("optimizer", r"multi_tensor|fused_sgd|_foreach_|\bsgd\b"),
]
#: the category of a kernel that no pattern of :data:`CATEGORIES` matches
OTHER = "other element-wise"
#: profiler rows that are host-side operators or runtime calls, not device kernels
HOST_PREFIXES = ("aten::", "autograd::", "Optimizer", "cuda", "Torch-Compiled", "CompiledFunction", "TorchDynamo",
                 "ProfilerStep", "##", "Lazy", "torch::", "c10d::", "inductor::")


#: the operators of an inductor-fused kernel's name that only move or re-type data: a fused kernel made
#: of these alone is a layout copy; one that also computes (``add``, ``mul``, ``sum``, ``rshift``...) is not
LAYOUT_OPS = frozenset("view unsafe clone permute transpose copy to cat constant pad nd squeeze unsqueeze expand "
                       "select slice reshape t bmm mm addmm as strided contiguous alias split unbind stack "
                       "detach".split())
#: recorded in every row: rows without it filed a fused kernel as a layout copy whenever its name held a
#: cast (``_to_copy``), a transpose or a clone, even when the kernel also computed.  The text is the rule's
#: name as rows recorded it before this module moved from ``satconv.kernels`` (the rule is :data:`LAYOUT_OPS`
#: here), kept so that old and new rows name the same rule alike
CATEGORY_RULE = "fused kernels by their operators (satconv.kernels.LAYOUT_OPS)"
_FUSED = re.compile(r"^triton_(?:poi|red|per)_fused_(.*?)(?:_\d+)?$")


def categorise(name: str) -> str:
    """The category of a kernel or operator name (:data:`CATEGORIES`, else ``"other element-wise"``).

    Inductor names a fused kernel after every operator it holds (``triton_poi_fused_add_clone_permute_7``),
    including the dtype casts (``_to_copy``) and the views and products its buffers come from.  Such a
    kernel is a layout copy only when all of those operators are in :data:`LAYOUT_OPS`; one that also
    computes is element-wise work (softmax and normalisation are recognised first).

    Returns:
        One of the categories of :data:`CATEGORIES`, or :data:`OTHER`.
    """
    low = name.lower()
    fused = _FUSED.match(low)
    for category, pattern in CATEGORIES:
        if category == "layout copy" and fused:  # by its operators, not by a pattern in the name
            return category if set(fused.group(1).split("_")) - {""} <= LAYOUT_OPS else OTHER
        if re.search(pattern, low):
            return category
    return OTHER


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool):
    """Send file descriptor 2 to /dev/null inside the block (the CPU profiler's C++ start/stop log
    lines, which notebooks would show); Python exceptions still propagate and are printed later."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _self_time_us(event, device_type: str) -> float:
    if device_type == "cuda":
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def kernel_launchers(events) -> dict[str, dict[str, int]]:
    """Which aten operators launched each device kernel, and how often.

    The launcher of a kernel is the outermost ``aten::`` operator above the host event that launched it:
    ``aten::addmm`` for the bias copy ATen makes inside an ``addmm`` whose output is not contiguous,
    ``aten::baddbmm`` (not the ``aten::copy_`` within it) for a batched one.  Inductor's Triton kernels
    and CUDA-graph replays have no aten operator above them and are left out.

    Args:
        events: ``torch.profiler`` function events (``prof.events()``): host events with ``name``,
            ``cpu_parent`` and ``kernels`` (the device kernels they launched, each with a ``name``).

    Returns:
        ``{kernel name: {operator name: launches}}``.
    """
    out: dict[str, dict[str, int]] = {}
    for event in events:
        kernels = getattr(event, "kernels", None)
        if not kernels:
            continue
        operator, node = None, event
        while node is not None:
            if node.name.startswith("aten::"):
                operator = node.name
            node = node.cpu_parent
        if operator is None:
            continue
        for kernel in kernels:
            slot = out.setdefault(kernel.name, {})
            slot[operator] = slot.get(operator, 0) + 1
    return out


def kernel_breakdown(cfg: ExperimentConfig, batch: int = 100, device=None, precision: str | None = None,
                     compile=False, channels_last: bool = False, warmup: int = 5, steps: int = 3,
                     top: int | None = None) -> dict:
    """Profile ``steps`` training steps of ``cfg`` and split their time by kernel category.

    Args:
        cfg: the experiment config.
        batch: images per step.
        device, precision, compile, channels_last: as in :func:`satconv.bench.throughput.bench_model`.
        warmup: untimed steps first (compilation and CUDA-graph capture fall here), >= 1.
        steps: profiled steps, >= 1; times are reported per step.
        top: kernels listed individually, the most expensive first (``None``: every kernel, so that a
            row can be re-categorised later).

    Returns:
        One JSON-ready dict: ``step_ms`` (median wall time per step, timed separately from the
        profiled steps), ``kernel_ms`` (summed self time of the device kernels, CPU operators on a
        CPU), ``categories`` (``{category: ms per step}``, summing to ``kernel_ms``), ``kernels``
        (the ``top`` most expensive, or all: ``name``, ``category``, ``ms``, ``calls`` per step, and on
        a GPU ``launched_by``, ``{aten operator: launches per step}`` from :func:`kernel_launchers`,
        for the kernels an aten operator launched),
        ``category_rule`` (:data:`CATEGORY_RULE`), and the
        device, precision, compile mode and its ``inductor`` settings (``None`` uncompiled), batch, torch
        version, date and ``satconv_source``
        (:func:`satconv.provenance.source_digest`).

    Raises:
        ValueError: ``warmup < 1``, ``steps < 1`` or ``batch < 1``.
    """
    if warmup < 1 or steps < 1 or batch < 1:
        raise ValueError(f"warmup, steps and batch must be >= 1, got {warmup}, {steps}, {batch}")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model, run, opt = train_setup(cfg, device, precision, channels_last, compile)
    model.train()
    x, y = random_batch(cfg, batch, device, channels_last)
    step = make_train_step(run, opt, x, y, device, precision, cfg.train)
    step_s = time_repeats(step, device, warmup, max(3, steps))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _quiet_native_stderr(device.type != "cuda"), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    per_name: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        host_side = ev.key.startswith(HOST_PREFIXES)
        if (device.type == "cuda" and host_side) or (device.type != "cuda" and not ev.key.startswith("aten::")):
            continue
        us = _self_time_us(ev, device.type)
        if us <= 0:
            continue
        slot = per_name.setdefault(ev.key, [0.0, 0])
        slot[0] += us
        slot[1] += ev.count
    launchers = kernel_launchers(prof.events()) if device.type == "cuda" else {}
    categories: dict[str, float] = {}
    kernels = []
    for name, (us, calls) in per_name.items():
        cat = categorise(name)
        ms = us / 1e3 / steps
        categories[cat] = categories.get(cat, 0.0) + ms
        kernel = {"name": name, "category": cat, "ms": ms, "calls": calls / steps}
        if name in launchers:
            kernel["launched_by"] = {op: n / steps for op, n in sorted(launchers[name].items(), key=lambda kv: -kv[1])}
        kernels.append(kernel)
    kernels.sort(key=lambda k: -k["ms"])
    del model, run, opt, step, prof
    return {
        "config": cfg.name,
        "device": device_name(device),
        "device_type": device.type,
        "precision": precision,
        "compile": compile,
        "inductor": inductor_settings(compile) if compile else None,
        "channels_last": channels_last,
        **run_options(cfg, device),
        "batch": batch,
        "steps": steps,
        "torch": torch.__version__,
        "step_ms": statistics.median(step_s) * 1e3,
        "kernel_ms": sum(categories.values()),
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "kernels": kernels[:top],
        "category_rule": CATEGORY_RULE,
        "date": utc_now(),
        "satconv_source": source_digest(),
    }


__all__ = ["CATEGORIES", "OTHER", "HOST_PREFIXES", "CATEGORY_RULE", "LAYOUT_OPS", "categorise", "kernel_launchers",
           "kernel_breakdown"]
