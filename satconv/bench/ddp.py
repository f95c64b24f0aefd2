"""Data-parallel scaling: images/s of the training step on N processes against N, and the efficiency (issue 21).

``python -m satconv bench --ddp 1 2 4 --config C --batch B`` runs, for each N, ``torchrun --standalone
--nproc_per_node N -m satconv.bench.ddp ...`` (:func:`ddp_scaling`).  In that job every rank builds the model of
the config (same seed), takes its ``B / N`` rows of one random global batch of ``B`` images, and times the
training step with :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`satconv.distributed.wrap_model`):
forward, backward with the gradients' all-reduce, SGD step.  The global batch is held fixed, as in a
data-parallel training run, so N processes do the work of one step in less time when they scale.  The step time
of the job is its slowest rank's median; images/s is ``B`` over it, and the efficiency at N is
``img/s(N) / (N * img/s(1))``.  On a CUDA machine each rank takes its own GPU; on the CPU the ranks share the
cores, so CPU rows test the mechanics, not the speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from typing import Sequence

import torch

from .. import config as cfgmod
from .. import distributed
from ..config import REPO_ROOT
from ..provenance import device_name, source_digest, utc_now
from .harness import check_counts, make_train_step, random_batch, resolve_precision, time_repeats, train_setup


def worker(argv: Sequence[str] | None = None) -> dict | None:
    """One rank of the timing job (run under torchrun; ``python -m satconv.bench.ddp --config C --batch B ...``).

    Returns:
        On rank 0, the row (also printed as one JSON line): ``config``, ``processes``, ``batch`` (global),
        ``per_rank_batch``, ``step_s`` (the slowest rank's median seconds per step), ``img_s``, ``devices``,
        ``precision``, ``warmup``, ``repeats``, ``torch``, ``date``, ``satconv_source``; ``None`` elsewhere.
    """
    p = argparse.ArgumentParser(prog="python -m satconv.bench.ddp")
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--profile", default=None)
    a = p.parse_args(argv)
    check_counts(a.warmup, a.repeats)
    world = distributed.world_from_env()
    cuda = a.device == "cuda" or (a.device is None and torch.cuda.is_available())
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    started = distributed.start(world, device)
    try:
        cfg = cfgmod.load(a.config, a.set, a.profile)
        distributed.check_divisible(a.batch, world, key="--batch")
        precision = resolve_precision(a.precision, device)
        torch.manual_seed(cfg.train.seed)  # the same model and global batch on every rank
        model, _, opt = train_setup(cfg, device, precision, False, False)
        model, trainer = distributed.wrap_model(model, world, device)
        x, y = random_batch(cfg, a.batch, device, False)
        rows = distributed.batch_rows(a.batch, world)
        step = make_train_step(trainer, opt, x[rows], y[rows], device, precision, replace(cfg.train, step_graph=False))
        distributed.barrier(world)
        median = statistics.median(time_repeats(step, device, a.warmup, a.repeats))
        medians = distributed.gather_objects(median, world)
        devices = distributed.gather_objects(device_name(device), world)
        if not world.main:
            return None
        row = {"config": cfg.name, "processes": world.size, "batch": a.batch, "per_rank_batch": a.batch // world.size,
               "step_s": max(medians), "img_s": a.batch / max(medians), "devices": devices, "precision": precision,
               "warmup": a.warmup, "repeats": a.repeats, "torch": torch.__version__, "date": utc_now(),
               "satconv_source": source_digest()}
        print(json.dumps(row), flush=True)
        return row
    finally:
        if started:
            distributed.stop()


def ddp_scaling(config: str, processes: Sequence[int], batch: int, warmup: int = 5, repeats: int = 20,
                precision: str | None = None, device: str | None = None, overrides: Sequence[str] = (),
                profile: str | None = None, timeout: float = 1800) -> list[dict]:
    """Time the training step of ``config`` on each number of ``processes`` (one torchrun job each).

    Returns:
        The jobs' rows (:func:`worker`), each with ``efficiency``: ``img_s / (N * img_s at N = 1)`` when 1 is among
        ``processes`` (else ``None``).

    Raises:
        DistributedError: ``batch`` does not split over one of ``processes``.
        RuntimeError: a job failed (the end of its output is in the message).
    """
    for n in processes:
        distributed.check_divisible(batch, distributed.World(0, n), key="--batch")
    rows = []
    for n in processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "satconv.bench.ddp", "--config", str(config), "--batch", str(batch), "--warmup", str(warmup),
               "--repeats", str(repeats)]
        cmd += (["--precision", precision] if precision else []) + (["--device", device] if device else [])
        cmd += (["--profile", profile] if profile else []) + [a for kv in overrides for a in ("--set", kv)]
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        found = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not found:
            raise RuntimeError(f"the {n}-process timing job failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        rows.append(json.loads(found[-1]))
    base = next((r["img_s"] for r in rows if r["processes"] == 1), None)
    for r in rows:
        r["efficiency"] = None if base is None else r["img_s"] / (r["processes"] * base)
    return rows


__all__ = ["worker", "ddp_scaling"]

if __name__ == "__main__":
    worker()
