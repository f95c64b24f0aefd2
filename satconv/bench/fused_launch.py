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
from torch.utils._python_dispatch import TorchDispatchMode  # the documented home of dispatch modes

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
    ops = {"forward": torch.ops.satconv.softmax_dropout_forward,
           "backward": torch.ops.satconv.softmax_dropout_backward}
    with FirstCalls(ops) as recorder:  # the kernels' arguments in one step, seen on their way in
        make_train_step(run, opt, x, y, device, precision, plain)()
    calls = recorder.calls
    if not calls:
        raise RuntimeError(f"{cfg.name}: the model calls neither fused kernel (no folded content attention)")
    common = {"config": cfg.name, "device": device_name(device), "precision": precision, "batch": batch,
              "torch": torch.__version__, "date": utc_now(), "satconv_source": source_digest()}
    rows = []
    for kernel, args in sorted(calls.items()):
        scores = args[0] if kernel == "forward" else args[1]  # the (B, R, Nk) logits or probabilities
        block = fused.row_block(scores.shape[-1])
        current = fused.launch_shape(kernel, block)
        fixed = args[:-1] if isinstance(args[-1], list) else args  # all but ``launch``, the last (absent: None)
        found = []
        for per in rows_per_program:
            for w in warps:  # each pair as the op's last argument, ``launch``: fused.LAUNCH is only read
                us = statistics.median(time_repeats(lambda: ops[kernel](*fixed, [per, w]), device, warmup,
                                                    repeats)) * 1e6
                found.append({"kernel": kernel, "block": block, "shape": list(scores.shape),
                              "rows_per_program": per, "warps": w, "us": us, "current": (per, w) == current})
        best = min(r["us"] for r in found)
        rows += [{**r, "fastest": r["us"] == best, **common} for r in found]
    return rows


class FirstCalls(TorchDispatchMode):
    """Within ``with FirstCalls(ops) as r:``, the positional arguments of the first call of each op of ``ops``
    (``{name: torch.ops packet}``, e.g. a :func:`torch.library.custom_op`) land in ``r.calls[name]``, tensors
    detached and cloned; every call, recorded or not, runs unchanged.

    A dispatch mode (below autograd): it sees the ops of this thread and those the autograd engine runs for it,
    the backward of a custom autograd function included (a torch *function* mode would not: ``backward()``
    itself goes through it, which turns the mode off for everything the engine runs).  Nothing is patched, so
    other code and threads are untouched.  The arguments are those the dispatcher gets: trailing ones equal
    to their defaults are left out.  Keyword arguments are not recorded: call the ops positionally.
    """

    def __init__(self, ops: dict):
        super().__init__()
        self.ops, self.calls = dict(ops), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket  # func: an overload such as torch.ops.ns.op.default
        for name, op in self.ops.items():
            if packet is op and name not in self.calls:
                self.calls[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **(kwargs or {}))


__all__ = ["fused_launch_sweep", "FirstCalls"]
