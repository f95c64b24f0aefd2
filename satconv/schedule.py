"""The learning-rate schedule and the run's random streams (arXiv 1911.03584 App. B; bugs B6, B7).

:func:`lr_at` is the rate of every optimisation step (warm-up, then cosine or multistep, per step or per
epoch as the original's once-per-epoch ``scheduler.step``).  :func:`seed_all`, :func:`derived_seed`,
:func:`rng_state` and :func:`set_rng_state` make a run's data order and augmentation a function of its
seed and epoch, and let a checkpoint carry every random state so that a resumed run continues exactly.
"""
from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import torch

from .config import TrainConfig


def lr_step_words(lr_step: str) -> str:
    """``train.lr_step`` in words: ``"step"`` -> ``"per batch"``, ``"epoch"`` -> ``"per epoch"``.

    Raises:
        ValueError: any other value.
    """
    words = {"step": "per batch", "epoch": "per epoch"}
    if lr_step not in words:
        raise ValueError(f"train.lr_step must be 'step' or 'epoch', got {lr_step!r}")
    return words[lr_step]


def lr_at(step: int, steps_per_epoch: int, t: TrainConfig) -> float:
    """Learning rate of optimisation step ``step`` (0-based).

    ``cosine`` (epfml/attention-cnn ``get_cosine_schedule_with_warmup``): ``lr * step / warmup`` during
    warm-up (``warmup = int(warmup_ratio * total)``), then ``lr * (1 + cos(pi * progress)) / 2`` with
    ``progress = (step - warmup) / (total - warmup)``, per step.  ``multistep``: the same warm-up,
    then ``lr * gamma ** (milestones passed)`` where a milestone ``m`` is passed from epoch ``m`` on
    (0-based epochs, as ``MultiStepLR`` stepped after each epoch).  With ``t.lr_step == "epoch"`` every
    step of an epoch gets the rate of that epoch's first step, as the original's once-per-epoch
    ``scheduler.step(global_step)``: piecewise constant, and 0 for the whole first epoch under warm-up.
    """
    if t.lr_step == "epoch":
        step -= step % steps_per_epoch
    total = t.epochs * steps_per_epoch
    warmup = int(t.warmup_ratio * total)
    if step < warmup:
        return t.lr * step / max(1, warmup)
    if t.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step // steps_per_epoch
    return t.lr * t.gamma ** sum(epoch >= m for m in t.milestones)


def default_device() -> torch.device:
    """``cuda`` when a GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def derived_seed(*parts) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (e.g. ``(seed, epoch, "order")``): SHA-256 of
    their ``repr``, so equal on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def rng_state() -> dict:
    """Every global random state (torch CPU, each CUDA device, NumPy, Python) as tensors and lists that
    ``torch.save`` stores and ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(s: dict) -> None:
    """Restore the states :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
