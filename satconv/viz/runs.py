"""Run artefacts to visualise: committed GPU runs or a quick CPU stand-in; atlas and snapshots.

:func:`satconv.train.train` writes ``atlas.pt`` (attention of fixed test images) and
``snapshots/epoch_XXXX.pt`` (per-epoch attention parameters and centre-query maps) into a run
directory; the book commits GPU runs under ``book/runs/<config>/``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import REPO_ROOT, from_dict, load, override
from .common import _numpy


#: overrides of the CPU stand-in run, applied after the ``quick`` profile: synthetic images (no
#: download, deterministic), 2 short epochs (3 snapshots), 100 test images for the Fig. 6 average
QUICK_OVERRIDES = ("data.source=synthetic", "data.train_subset=128", "data.val_size=64", "data.test_subset=100",
                   "train.epochs=2")

#: committed GPU runs, and where CPU stand-in runs are trained (git-ignored)
GPU_RUNS_DIR = REPO_ROOT / "book" / "runs"
QUICK_RUNS_DIR = REPO_ROOT / "_build" / "visualise_runs"


def quick_config(name: str):
    """The CPU stand-in for ``configs/<name>.yaml``: the ``quick`` profile plus :data:`QUICK_OVERRIDES`."""
    return override(load(REPO_ROOT / "configs" / f"{name}.yaml", profile="quick"), list(QUICK_OVERRIDES))


def find_run(name: str, runs_dir=None, quick_dir=None, train_quick: bool = True):
    """The run directory to visualise for config ``name``: committed GPU results first.

    Looks for ``book/runs/<name>/`` holding an ``atlas.pt`` or ``snapshots/`` (written by
    :func:`satconv.train.train` on the GPU machine).  Otherwise trains the CPU stand-in
    (:func:`quick_config`, 5-30 s on 2 cores) into ``_build/visualise_runs/<name>/``,
    or reuses it when a completed run of the same config is already there.

    Args:
        name: config stem, e.g. ``"paper_quadratic"``.
        runs_dir, quick_dir: override the two locations.
        train_quick: ``False``: return ``(None, None)`` instead of training.

    Returns:
        ``(run_dir, kind)`` with ``kind`` ``"gpu"`` or ``"quick"``.
    """
    gpu = Path(runs_dir or GPU_RUNS_DIR) / name
    if (gpu / "atlas.pt").is_file() or (gpu / "snapshots").is_dir():
        return gpu, "gpu"
    if not train_quick:
        return None, None
    cfg = quick_config(name)
    out = Path(quick_dir or QUICK_RUNS_DIR) / name
    try:
        done = json.loads((out / "run.json").read_text()).get("status") == "completed"
        same = from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    except (OSError, ValueError):
        done = same = False
    if not (done and same):
        from ..train import train

        shutil.rmtree(out, ignore_errors=True)
        train(cfg, out_dir=out, device="cpu", progress=False)
    return out, "quick"


def runs_table(runs: dict) -> str:
    """A Markdown table saying where each model's maps come from (no paths).

    Args:
        runs: ``label -> (run_dir, kind)`` from :func:`find_run`.

    Returns:
        Markdown: model, run (GPU run and its device, or CPU stand-in), data, epochs, and the
        test accuracy of GPU runs (a stand-in's accuracy is meaningless and machine-dependent).
    """
    lines = ["| model | run | data | epochs | test accuracy |", "|---|---|---|---|---|"]
    for label, (run_dir, kind) in runs.items():
        run_dir = Path(run_dir)
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        metrics = run_dir / "metrics.jsonl"
        epochs = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else "?"
        data = info.get("data", {}).get("description", "?")
        if kind == "gpu":
            acc = info.get("results", {}).get("final", {}).get("test_acc")
            run, acc = f"GPU run ({info.get('device', '?')})", "?" if acc is None else f"{100 * acc:.2f}%"
        else:
            run, acc = "CPU stand-in (`quick` profile)", "not shown"
        lines.append(f"| {label} | {run} | {data} | {epochs} | {acc} |")
    return "\n".join(lines)


def load_atlas(run_dir) -> dict:
    """A run's ``atlas.pt`` (see :func:`satconv.train.build_atlas` for its keys)."""
    from ..train import load_atlas as _load

    return _load(run_dir)


def atlas_maps(atlas: dict, kind: str = "probs", image: int = 0, query: int = 0) -> np.ndarray:
    """One ``(L, H, N)`` stack of maps from an atlas.

    Args:
        atlas: from :func:`load_atlas`.
        kind: ``"probs"``: image ``image``, the atlas's ``query``-th query pixel (0 = centre);
            ``"centre_mean"``: the centre query averaged over up to 100 test images (paper Fig. 6);
            ``"query_mean"``: image ``image`` averaged over all queries (the [Re]'s ``viz``).

    Returns:
        ``(L, H, N)`` float32.
    """
    pick = {"probs": lambda p: p[image, :, query], "centre_mean": lambda p: p, "query_mean": lambda p: p[image]}
    if kind not in pick:
        raise ValueError(f"kind must be one of {sorted(pick)}, got {kind!r}")
    return np.stack([_numpy(pick[kind](p)) for p in atlas[kind]]).astype(np.float32)


def atlas_query(atlas: dict, query: int = 0) -> tuple[int, int]:
    """``(row, col)`` of the atlas's ``query``-th query pixel (layer 0's grid)."""
    height, width = atlas["grid"][0]
    return divmod(int(atlas["query_index"][0][query]), width)


def load_snapshots(run_dir) -> list[dict]:
    """The per-epoch attention snapshots of a run (``snapshots/epoch_XXXX.pt``), in epoch order.

    Returns:
        One dict per epoch: ``epoch``; ``centers (L, H, 2)`` and ``spreads (L, H)`` or ``(L, H, 2, 2)``
        of the quadratic layers (``None`` for other mechanisms); ``centre_probs (L, H, N)`` float32,
        each layer's attention of the centre query for one test image (``None`` when absent);
        ``params``: the raw parameter dict.
    """
    out = []
    for path in sorted((Path(run_dir) / "snapshots").glob("epoch_*.pt")):
        snap = torch.load(path, map_location="cpu", weights_only=True)
        params = snap.get("params", {})
        centers = [v for k, v in params.items() if k.endswith("attention_centers")]
        spreads = [v for k, v in params.items() if k.endswith("attention_spreads")]
        probs = snap.get("centre_probs") or []
        stack = lambda ts: np.stack([_numpy(t) for t in ts]) if ts else None  # noqa: E731
        same = len({tuple(p.shape) for p in probs}) == 1
        out.append({"epoch": int(snap["epoch"]), "centers": stack(centers), "spreads": stack(spreads),
                    "centre_probs": stack(probs) if same else None, "params": params})
    return out
