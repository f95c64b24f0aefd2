"""Reading runs back: finding them, their config, metrics and weights, and scoring them (``python -m satconv eval``).

Run directories (:mod:`satconv.train` lists their files; :mod:`satconv.rundir` writes them) are read here, for
training, the chapters, :mod:`satconv.viz` and :mod:`satconv.bench` alike: :func:`find_runs` lists the run
directories under a folder, :func:`read_run_config` reads a run's ``config.yaml``, :func:`read_run_info` its
``run.json``, :func:`read_metrics` its ``metrics.jsonl``, :func:`load_model` the network with its ``best`` or
``last`` weights, and :func:`evaluate` scores those weights on the validation or test split in eval mode under
``inference_mode`` (B5).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from .attention.routes import Routes, set_routes
from .augmentation import DeviceLoader
from .checkpoints import load_checkpoint
from .config import ConfigError, ExperimentConfig, TrainConfig, from_dict
from .data import load_data
from .experiment import resolve_config
from .prune import fit_heads_to_state
from .rundir import CorruptFile, read_json, run_status
from .schedule import default_device
from .steps import evaluate_model

log = logging.getLogger(__name__)


#: the files that make a folder a run directory
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl")


def read_run_info(run_dir: str | Path) -> dict:
    """A run's ``run.json`` (provenance, status, results), ``{}`` when it has none.

    Raises:
        CorruptFile: run.json is not a valid JSON object.
    """
    return read_json(Path(run_dir) / "run.json") or {}


def training_set_note(sizes: dict) -> str:
    """What a run's title and data set add for a run without a validation split (``data.val_size=0``, the
    paper's protocol): ``", all 50,000 training images"`` from ``run.json``'s ``data.sizes``
    (``{"train": 50000, "val": 0, "test": 10000}``); ``""`` for a run with one, or with no sizes recorded."""
    return f", all {sizes['train']:,} training images" if sizes.get("val") == 0 and "train" in sizes else ""


def recorded_lr_step(train: dict) -> str:
    """When a run set its learning rate, from the ``train`` section of its ``config.yaml``: its ``lr_step``, or
    :class:`satconv.config.TrainConfig`'s default (``"step"``, per batch) for runs written before the key existed."""
    return train.get("lr_step", TrainConfig.lr_step)


def find_runs(root: str | Path, name: str | None = None) -> list[Path]:
    """The run directories directly under ``root`` (folders holding :data:`RUN_FILES`), of config ``name``
    when given (its ``config.yaml`` says ``name: <name>``, whatever the folder is called).

    Returns:
        Completed runs first, then by epochs run (most first), then by seed (lowest first), then by path: the
        full-schedule seed-42 run of a campaign comes first.  A folder whose ``config.yaml`` or ``run.json`` is
        unreadable is left out (with a warning).
    """
    found = []
    for run_dir in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        if not all((run_dir / f).is_file() for f in RUN_FILES):
            continue
        try:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            info = read_run_info(run_dir)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, CorruptFile) as exc:
            log.warning("%s: not read as a run (%s)", run_dir, exc)
            continue
        if name is not None and raw.get("name") != name:
            continue
        metrics = read_metrics(run_dir)
        epochs = metrics[-1].get("epoch", 0) if metrics else 0
        seed = info.get("seed", (raw.get("train") or {}).get("seed")) or 0
        found.append((info.get("status") != "completed", -epochs, seed, str(run_dir), run_dir))
    return [entry[-1] for entry in sorted(found, key=lambda t: t[:4])]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The epochs of ``metrics.jsonl`` as dicts (keys :data:`METRIC_KEYS`, plus test_loss/test_acc)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory's ``config.yaml`` holds.

    Raises:
        FileNotFoundError: no config.yaml (not a run directory).
        CorruptFile: config.yaml is not valid YAML or not a valid config.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CorruptFile(path, f"not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CorruptFile(path, "empty" if data is None else f"a YAML {type(data).__name__}, not a config mapping")
    try:
        return from_dict(data, str(path))
    except ConfigError as exc:
        raise CorruptFile(path, f"not a valid config ({exc})") from None


def load_model(run_dir: str | Path, weights: str = "best", device: str | torch.device = "cpu",
               model_factory: Callable | None = None) -> tuple[nn.Module, dict]:
    """The network of a run with its ``best`` (validation) or ``last`` weights, in eval mode.

    Returns:
        ``(model, info)``; ``info`` has ``weights`` (which file was used) and ``epoch``.  ``best``
        falls back to ``last`` when the run has no validation split.

    Raises:
        FileNotFoundError: no config.yaml or no such checkpoint.
        CorruptFile: config.yaml or the checkpoint is unreadable (the message names the file).
    """
    run_dir = Path(run_dir)
    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    cfg = read_run_config(run_dir)
    path = run_dir / f"{weights}.pt"
    if weights == "best" and not path.is_file():
        path, weights = run_dir / "last.pt", "last"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({path.name})")
    ck = load_checkpoint(path, keys=("model", "epoch"))
    if model_factory is None:
        from .models import build_model as model_factory
    model = set_routes(model_factory(cfg.model), Routes.from_train(cfg.train))
    fit_heads_to_state(model, ck["model"])  # a run that pruned heads (train.prune_degenerate_heads)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), {"weights": weights, "epoch": ck["epoch"]}


def evaluate(run_dir: str | Path, split: str = "test", weights: str = "best", device=None,
             model_factory: Callable | None = None) -> dict:
    """Loss and accuracy of a run's weights on ``split`` (``"val"`` or ``"test"``).

    Returns:
        ``{"split", "weights", "epoch", "images", "loss", "acc", "run_status"}``; ``run_status`` as
        :func:`satconv.rundir.run_status` (``died``: run.json says running but no process holds the run;
        ``unreadable``: run.json is damaged, with a warning).

    Raises:
        FileNotFoundError, CorruptFile (as :func:`load_model`), DataError.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    run_dir = Path(run_dir)
    cfg = resolve_config(read_run_config(run_dir))
    try:
        status = run_status(run_dir)
    except CorruptFile as exc:  # provenance only: the weights and the config are what evaluation needs
        log.warning("%s", exc)
        status = "unreadable"
    if status == "died":
        log.warning("%s: the run died while training (run.json says running, but no process holds the run); "
                    "evaluating the weights it saved", run_dir)
    elif status == "running":
        log.warning("%s: the run is still training; evaluating the weights it has saved so far", run_dir)
    device = torch.device(device) if device is not None else default_device()
    model, info = load_model(run_dir, weights, device, model_factory)
    data = load_data(cfg)
    part = getattr(data, split)
    loader = DeviceLoader(part.to(device), cfg.train.eval_batch_size, device, cfg.data.mean, cfg.data.std)
    loss, acc = evaluate_model(model, loader, cfg.train.precision == "bf16" and device.type == "cuda")
    return {"split": split, **info, "images": len(part), "loss": loss, "acc": acc, "run_status": status}
