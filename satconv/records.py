"""The run directory's records: every file a training run writes besides its checkpoints.

One job: write the files that describe a run (:mod:`satconv.checkpoints` writes the training state, ``last.pt``;
:mod:`satconv.rundir` the primitives: whole-file writes, the lock; :mod:`satconv.train` decides when)::

    config.yaml               the resolved config
    run.json                  provenance at the first start (versions, device, git commit, source digest, seed,
                              data), one entry per resumption, the status (``running``, ``stopped``,
                              ``completed``, ``interrupted``, ``failed`` with its ``error`` or ``signal``), the
                              network's trainable parameter count (after any pruning), ``init`` and the results
    metrics.jsonl             one line per epoch
    best.pt                   the weights with the best validation accuracy
    snapshots/epoch_XXXX.pt   per-epoch attention parameters and centre-query attention
    atlas.pt                  attention probabilities of every layer for fixed test images (float16)
"""
from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from . import __version__
from .atlas import ATLAS_MAX_BYTES, attention_snapshot, build_atlas
from .augmentation import normalize
from .config import ExperimentConfig, to_dict
from .data import DataBundle
from .models.common import count_parameters
from .provenance import device_name, git_commit, source_digest, utc_now
from .rundir import CorruptFile, RunDirError, append_text, read_json, save_torch, write_text

log = logging.getLogger(__name__)

#: files a fresh start removes (what an attempt that never checkpointed left behind), with ``snapshots/epoch_*.pt``
STALE_FILES = ("metrics.jsonl", "best.pt", "atlas.pt", "run.json")


def snapshot_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether the snapshot after ``epoch`` (0: the initial model) is written under ``train.snapshot_every``:
    each of the first ``every`` epochs, every ``every``-th after them, and the last (``epochs``).

    >>> [e for e in range(13) if snapshot_due(e, 5, 12)]
    [0, 1, 2, 3, 4, 5, 10, 12]
    """
    return epoch <= every or epoch % every == 0 or epoch == epochs


@dataclass
class RunResult:
    """What :func:`train` returns.

    Args:
        run_dir: the run directory.
        config: the resolved config.
        metrics: one dict per finished epoch (as in ``metrics.jsonl``).
        results: ``{"final": {...}, "best": {...}}`` test/val numbers of the last and the best
            (validation) weights; empty when the run stopped early.
        completed: all epochs ran.
    """

    run_dir: Path
    config: ExperimentConfig
    metrics: list = field(default_factory=list)
    results: dict = field(default_factory=dict)
    completed: bool = False


class RunRecords:
    """The record files of one run directory.

    Args:
        run_dir: the run directory (written while holding its :class:`~satconv.rundir.RunLock`).
        cfg: the run's resolved config.
        device: the device the run trains on (recorded by name).
        data: the run's data (``info()`` goes into a new ``run.json``; the first test image, normalised to
            ``(1, 3, H, W)`` on ``device``, is the snapshots' image).
    """

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, device: torch.device, data: DataBundle):
        self.dir, self.cfg, self.device, self.data = run_dir, cfg, device, data
        self.run_json = run_dir / "run.json"
        self.snapshot_image = None
        if len(data.test):
            self.snapshot_image = normalize(data.test.images[:1].to(device), cfg.data.mean, cfg.data.std)

    def previous_status(self) -> str | None:
        """The status ``run.json`` holds: ``None`` without one, ``"unreadable"`` for a corrupt one
        (:meth:`write_run_json` warns and writes it anew), ``"died"`` for ``"running"`` (the caller holds the
        lock, so the attempt that wrote it was killed)."""
        try:
            previous = (read_json(self.run_json) or {}).get("status")
        except CorruptFile:
            return "unreadable"
        if previous == "running":
            log.info("%s: the previous attempt died while running", self.dir)
            return "died"
        return previous

    def clear(self) -> None:
        """A fresh start: remove :data:`STALE_FILES` and ``snapshots/epoch_*.pt``."""
        for stale in STALE_FILES:
            (self.dir / stale).unlink(missing_ok=True)
        for stale in (self.dir / "snapshots").glob("epoch_*.pt"):
            stale.unlink()

    def write_config(self) -> None:
        """``config.yaml``: the resolved config."""
        write_text(self.dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite ``metrics.jsonl`` with ``rows`` (one JSON object per epoch)."""
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in rows))

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's ``row`` to ``metrics.jsonl``."""
        append_text(self.dir / "metrics.jsonl", json.dumps(row) + "\n")

    def save_best(self, state: dict, best: dict) -> None:
        """``best.pt``: the weights ``state`` (name -> tensor), ``best``'s ``epoch``/``val_acc``/``val_loss``, the
        config."""
        save_torch({"model": state, **best, "config": to_dict(self.cfg)}, self.dir / "best.pt")

    def save_snapshot(self, model: nn.Module, epoch: int) -> None:
        """``snapshots/epoch_XXXX.pt``: :func:`~satconv.atlas.attention_snapshot` of ``model`` after ``epoch``
        epochs (centre-query attention ``(heads, N)`` per layer); nothing for a model without attention."""
        snap = attention_snapshot(model, self.snapshot_image)
        if snap["params"] or snap["centre_probs"]:
            (self.dir / "snapshots").mkdir(exist_ok=True)
            save_torch({"epoch": epoch, **snap}, self.dir / "snapshots" / f"epoch_{epoch:04d}.pt")

    def write_atlas(self, model: nn.Module) -> None:
        """``atlas.pt`` (:func:`~satconv.atlas.build_atlas`: per layer ``(images, heads, queries, N)`` float16)
        unless it exists or ``train.atlas_images``/``atlas_queries`` is 0; warns above
        :data:`~satconv.atlas.ATLAS_MAX_BYTES`."""
        t, path = self.cfg.train, self.dir / "atlas.pt"
        if t.atlas_images <= 0 or t.atlas_queries <= 0 or path.is_file():
            return
        atlas = build_atlas(model, self.data, self.cfg.data.mean, self.cfg.data.std, t.atlas_images,
                            t.atlas_queries, self.device)
        if atlas is not None:
            save_torch(atlas, path)
            size = path.stat().st_size
            if size > ATLAS_MAX_BYTES:
                log.warning("atlas.pt is %.1f MB (> %.0f MB): lower train.atlas_images or train.atlas_queries",
                            size / 2 ** 20, ATLAS_MAX_BYTES / 2 ** 20)

    def write_run_json(self, status: str, model: nn.Module, epoch: int, step: int, init_record: dict | None, *,
                       resumed: bool = True, results: dict | None = None, previous: str | None = None,
                       **extra) -> None:
        """``run.json`` with ``status`` and where the run stands.

        Args:
            status: ``running``, ``stopped``, ``completed``, ``interrupted`` or ``failed``.
            model: the network trained (its trainable parameter count is recorded).
            epoch, step: finished epochs and optimisation steps (recorded for a resumption).
            init_record: ``train.init_from``/pruning record (``None``: none).
            resumed: the run resumed from a checkpoint (``running`` then adds an entry to ``resumes``).
            results: the final results (also records whether ``atlas.pt`` exists).
            previous: the status an attempt being resumed ended with (``died`` for a killed one).
            extra: ``error`` or ``signal`` of the end.
        """
        try:
            info = read_json(self.run_json) or {}
        except CorruptFile as exc:
            log.warning("%s; it is written anew", exc)
            info = {}
        if not info:
            info = {"satconv": __version__, "torch": torch.__version__, "python": platform.python_version(),
                    "device": device_name(self.device), "git_commit": git_commit(),
                    "satconv_source": source_digest(), "seed": self.cfg.train.seed,
                    "data": self.data.info(), "start_time": utc_now(), "resumes": []}
        elif resumed and status == "running":
            info.setdefault("resumes", []).append({"time": utc_now(), "epoch": epoch, "step": step,
                                                   "previous_status": previous, "device": device_name(self.device),
                                                   "torch": torch.__version__, "satconv_source": source_digest()})
        info["status"] = status
        info["parameters"] = count_parameters(model)  # after any pruning: the network this run trains
        if init_record is not None:
            info["init"] = init_record
        for key in ("end_time", "error", "signal"):  # of an earlier attempt's end
            info.pop(key, None)
        info.update(extra)
        if status != "running":
            info["end_time"] = utc_now()
        if results is not None:
            info["results"] = results
            info["atlas"] = (self.dir / "atlas.pt").is_file()
        write_text(self.run_json, json.dumps(info, indent=2) + "\n")

    def record_end(self, status: str, model: nn.Module, epoch: int, step: int, init_record: dict | None,
                   **extra) -> None:
        """:meth:`write_run_json` with the final ``status``; a failure to write it (a full disk) is logged, not
        raised."""
        try:
            self.write_run_json(status, model, epoch, step, init_record, **extra)
        except (RunDirError, OSError) as exc:
            log.warning("could not record status %r in %s: %s", status, self.run_json, exc)


__all__ = ["RunRecords", "MutedRecords", "RunResult", "STALE_FILES", "snapshot_due"]


class MutedRecords(RunRecords):
    """The records of a rank other than 0 in a data-parallel run (:mod:`satconv.distributed`): rank 0 writes
    every file, so each writer here does nothing and :meth:`previous_status` is ``None``."""

    def previous_status(self) -> str | None:
        """``None``: rank 0 reads ``run.json``."""
        return None

    def clear(self) -> None:
        """Nothing: rank 0 clears the directory."""

    def write_config(self) -> None:
        """Nothing: rank 0 writes ``config.yaml``."""

    def write_metrics(self, rows: list[dict]) -> None:
        """Nothing: rank 0 writes ``metrics.jsonl``."""

    def append_metrics(self, row: dict) -> None:
        """Nothing: rank 0 appends to ``metrics.jsonl``."""

    def save_best(self, state: dict, best: dict) -> None:
        """Nothing: rank 0 writes ``best.pt``."""

    def save_snapshot(self, model: nn.Module, epoch: int) -> None:
        """Nothing: rank 0 writes the snapshots."""

    def write_atlas(self, model: nn.Module) -> None:
        """Nothing: rank 0 writes ``atlas.pt``."""

    def write_run_json(self, status: str, model: nn.Module, epoch: int, step: int, init_record: dict | None, *,
                       resumed: bool = True, results: dict | None = None, previous: str | None = None,
                       **extra) -> None:
        """Nothing: rank 0 writes ``run.json``."""

    def record_end(self, status: str, model: nn.Module, epoch: int, step: int, init_record: dict | None,
                   **extra) -> None:
        """Nothing: rank 0 records the end."""
