"""Readable checkpoints: whole-archive checks on load, and the newest/previous pair of a run directory.

- :func:`load_checkpoint`: ``torch.load(weights_only=True)`` after checking the file's zip archive is whole
  (its CRCs, which ``torch.load`` does not check); a damaged file raises
  :class:`~satconv.rundir.CorruptFile` saying what is wrong with it.
- :func:`config_diff`: whether a checkpoint's config lets a run resume from it (:data:`RESUME_FREE_KEYS` may
  change, nothing else).
- :class:`Checkpoints`: ``last.pt`` and the checkpoint before it, ``last.prev.pt``.  A new checkpoint is
  written whole (:func:`satconv.rundir.atomic_write`) before the rotation; :meth:`Checkpoints.load` falls
  back to the previous checkpoint, with a warning, when the newest one is truncated or garbage.
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import torch

from .config import ExperimentConfig, flatten, key_diff, to_dict
from .rundir import CorruptFile, atomic_write, torch_bytes

log = logging.getLogger(__name__)

#: config keys that may change between a run and its resumption (they do not affect the numbers)
RESUME_FREE_KEYS = {"name", "description", "train.out_dir", "train.checkpoint_every", "train.test_every",
                    "train.compile", "train.compile_mode", "train.channels_last", "train.step_graph",
                    "train.fused_forward", "train.fused_backward", "train.snapshot_attention", "train.snapshot_every",
                    "train.atlas_images", "train.atlas_queries", "train.eval_batch_size", "data.root", "data.cache_dir",
                    "data.device_resident"}
#: keys a resumable checkpoint (last.pt) must have
RESUME_KEYS = ("format", "config", "model", "optimizer", "epoch", "step", "rng")


def config_diff(old: dict, cfg: ExperimentConfig, free=RESUME_FREE_KEYS) -> list[str]:
    """``"key: old -> new"`` for every dotted key outside ``free`` in which the plain config ``old``
    (as :func:`~satconv.config.to_dict` writes it) and ``cfg`` differ.  A key that ``old`` lacks (a config
    written before the key existed) counts as having its default value."""
    old, new = flatten(old), flatten(to_dict(cfg))
    defaults = flatten(to_dict(ExperimentConfig()))
    old.update({k: defaults[k] for k in new if k not in old and k in defaults})
    return key_diff(old, new, free)


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without its advice to load with weights_only=False."""
    text = str(exc)
    if "weights_only" in text or "Weights only" in text:
        return "it holds objects other than tensors and plain data (not a satconv checkpoint)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"torch.load failed ({type(exc).__name__}{': ' + first[:200] if first else ''})"


def load_checkpoint(path: str | Path, keys=()) -> dict:
    """``torch.load(path, weights_only=True)`` onto the CPU, after checking the file is whole.

    Args:
        path: a ``.pt`` file written by :func:`satconv.rundir.save_torch`.
        keys: keys the loaded dict must have.

    Raises:
        CorruptFile: empty, truncated, a CRC mismatch inside, garbage, or not a dict with ``keys``.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CorruptFile(path, "it is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # any way the archive fails to read means the file is not whole
        reason = ("truncated or not a PyTorch checkpoint (no complete zip archive)"
                  if isinstance(exc, zipfile.BadZipFile) else f"its zip archive is damaged ({type(exc).__name__})")
        raise CorruptFile(path, f"{reason}, {size} bytes") from None
    if bad is not None:
        raise CorruptFile(path, f"damaged: {bad} inside it fails its CRC check")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFile(path, _load_failure(exc)) from None
    if not isinstance(obj, dict):
        raise CorruptFile(path, f"it holds a {type(obj).__name__}, not a satconv checkpoint")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CorruptFile(path, f"not a satconv checkpoint of this kind (no {', '.join(missing)})")
    return obj


class Checkpoints:
    """The newest full training state ``<stem>.pt`` and the one before it, ``<stem>.prev.pt``.

    :meth:`save` writes the new checkpoint whole (temporary file, fsync) and only then renames the newest
    to the previous and the new one to the newest; the newest is rotated only when it is known good
    (written or loaded here), so an unreadable one never displaces a good previous one.

    Args:
        run_dir: the run directory.
        stem: file name stem (``"last"``).
    """

    def __init__(self, run_dir: str | Path, stem: str = "last"):
        self.dir = Path(run_dir)
        self.newest = self.dir / f"{stem}.pt"
        self.previous = self.dir / f"{stem}.prev.pt"
        self._newest_good = False

    def save(self, obj) -> None:
        """Write ``obj`` as the newest checkpoint, keeping the current newest as the previous one.

        Raises:
            DiskFull: the new checkpoint did not fit; both existing files are unchanged.
        """
        def rotate():
            if self._newest_good and self.newest.is_file():
                os.replace(self.newest, self.previous)

        atomic_write(self.newest, torch_bytes(obj), before_replace=rotate)
        self._newest_good = True

    def load(self, keys=()) -> tuple[dict, Path] | None:
        """The newest readable checkpoint and its path; ``None`` when there is none at all.

        An unreadable newest checkpoint is reported with a warning naming it, and the previous one is
        loaded (the newest is then left to be overwritten by the next :meth:`save`).

        Raises:
            CorruptFile: checkpoints exist but none is readable (the message names each and why).
        """
        problems = []
        for path in (self.newest, self.previous):
            if not path.is_file():
                continue
            try:
                ck = load_checkpoint(path, keys)
            except CorruptFile as exc:
                problems.append(exc)
                continue
            if path == self.previous:
                why = str(problems[0]) if problems else f"{self.newest} is missing (a rotation was cut short)"
                log.warning("%s; resuming from the previous checkpoint %s", why, path.name)
            self._newest_good = path == self.newest
            return ck, path
        if not problems:
            return None
        more = "".join(f"; so is {p.path.name}: {p.reason}" for p in problems[1:])
        raise CorruptFile(problems[0].path, problems[0].reason + more,
                          f"no readable checkpoint is left in {self.dir}; move the unreadable file(s) away to "
                          f"start afresh, or choose another output directory (--out)")


__all__ = ["load_checkpoint", "Checkpoints", "config_diff", "RESUME_FREE_KEYS", "RESUME_KEYS"]
