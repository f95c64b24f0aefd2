"""Launch shapes of the fused softmax-dropout kernels (:mod:`satconv.attention.fused`), timed.

``python -m satconv bench --fused-launch`` (or :func:`fused_launch_sweep`) records the arguments each
kernel gets in one training step of a config and times the kernel on them at every (rows per program,
warps) pair; the fastest pair per row block is what :data:`satconv.attention.fused.LAUNCH` should hold
(``book/bench/h200_fused_launch.jsonl``).
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Sequence

import torch

from .. import config as cfgmod
from ..attention import fused
from ..attention.routes import Routes, routes_of, set_routes
from ..config import ExperimentConfig
from ..provenance import device_name, resolve_device, source_digest, utc_now
from .harness import make_train_step, random_batch, resolve_precision, time_repeats, train_setup


def fused_launch_sweep(cfg: ExperimentConfig, batch: int = 100, device=None, precision: str | None = None,
                       rows_per_program: Sequence[int] = (1, 2, 4, 8, 16), warps: Sequence[int] = (1, 2, 4, 8),
                       warmup: int = 5, repeats: int = 20) -> list[dict]:
    """Time the fused softmax-dropout kernels (:mod:`satconv.attention.fused`) at every launch shape.

    One eager training step of ``cfg`` records the arguments of the first call of each kernel; each kernel
    is then timed on those arguments at every ``(rows per program, warps)`` pair
    (each pair passed as the kernels' ``launch`` argument; :data:`satconv.attention.fused.LAUNCH` is not changed).  The fastest pair per kernel
    is what ``LAUNCH`` should hold for that row block.

    Args:
        cfg: an experiment config whose model has a folded content attention (learned + content, ViT).
        batch: images in the recorded step (the scores are ``(batch, N * heads, N_key)``).
        device, precision: as in :func:`satconv.bench.throughput.bench_model` (a CUDA device).
        rows_per_program, warps: the launch pairs to time.
        warmup, repeats: untimed and timed calls per pair (:func:`satconv.bench.harness.time_repeats`; the
            median is reported).

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
    precision = resolve_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model, run, opt = train_setup(cfg, device, precision, False, False)
    model.train()
    x, y = random_batch(cfg, batch, device, False)
    plain = cfgmod.override(cfg, ["train.step_graph=false"], source=cfg.name).train  # eager: the calls are seen
    set_routes(model, replace(routes_of(model) or Routes(), fused_forward=True, fused_backward=True))
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
        make_train_step(run, opt, x, y, device, precision, plain)()
    finally:
        fused.softmax_dropout_forward, fused.softmax_dropout_backward = originals
    if not calls:
        raise RuntimeError(f"{cfg.name}: the model calls neither fused kernel (no folded content attention)")
    common = {"config": cfg.name, "device": device_name(device), "precision": precision, "batch": batch,
              "torch": torch.__version__, "date": utc_now(), "satconv_source": source_digest()}
    rows = []
    for kernel, args in sorted(calls.items()):
        scores = args[0] if kernel == "forward" else args[1]
        block = fused.row_block(scores.shape[-1])
        fn = dict(forward=originals[0], backward=originals[1])[kernel]
        current = fused.launch_shape(kernel, block)
        found = []
        for per in rows_per_program:
            for w in warps:  # each pair through the kernels' launch argument: fused.LAUNCH is only read
                us = statistics.median(time_repeats(lambda: fn(*args, launch=(per, w)), device, warmup,
                                                    repeats)) * 1e6
                found.append({"kernel": kernel, "block": block, "shape": list(scores.shape),
                              "rows_per_program": per, "warps": w, "us": us, "current": (per, w) == current})
        best = min(r["us"] for r in found)
        rows += [{**r, "fastest": r["us"] == best, **common} for r in found]
    return rows


__all__ = ["fused_launch_sweep"]
