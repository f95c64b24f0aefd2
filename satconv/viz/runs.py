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
from ..evaluation import find_runs, read_metrics, read_run_info, recorded_lr_step, training_set_note
from ..schedule import lr_step_words
from .common import to_numpy


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


def gpu_runs(name: str, runs_dir=None) -> list[Path]:
    """Committed GPU run directories of config ``name`` under ``runs_dir`` (``book/runs``), best first.

    A run directory belongs to ``name`` when its ``config.yaml`` says ``name: <name>``, whatever the
    folder is called (``book/runs/paper_quadratic/``, ``book/runs/paper_quadratic_e300_s42/``, ...).

    Returns:
        The directories ordered completed first, then by epochs run (most first), then by seed
        (lowest first): the full-schedule seed-42 run of a campaign is the one figures show
        (:func:`satconv.evaluation.find_runs`).
    """
    return find_runs(runs_dir or GPU_RUNS_DIR, name)


def find_run(name: str, runs_dir=None, quick_dir=None, train_quick: bool = True):
    """The run directory to visualise for config ``name``: committed GPU results first.

    Looks among :func:`gpu_runs` (``book/runs/*/`` of that config, completed and longest first,
    then lowest seed) for one holding an ``atlas.pt`` or ``snapshots/`` (written by
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
    for gpu in gpu_runs(name, runs_dir):
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


def run_info(run_dir, kind: str) -> dict:
    """What a figure label needs to know about a run, read from its files (nothing typed in).

    Args:
        run_dir: a run directory (``config.yaml``, ``metrics.jsonl``, ``run.json``).
        kind: ``"gpu"`` or ``"quick"`` (from :func:`find_run`).

    Returns:
        ``kind``; ``name`` (the config); ``data`` (``run.json``'s data description); ``epochs_run``
        (the last epoch in ``metrics.jsonl``); ``epochs_planned`` (the run's ``train.epochs``);
        ``epochs_full`` (``train.epochs`` of ``configs/<name>.yaml``, ``None`` without it); ``lr_step``
        (``"step"`` or ``"epoch"``: when the run set its learning rate; ``"step"`` for runs from before the
        key existed, as the config's default) and ``lr_step_full`` (the config file's, ``None`` without it);
        ``seed``; ``device``; ``status``; ``test_acc`` (final weights, ``None`` when absent); ``sizes``
        (images per split, ``{"train": 45000, "val": 5000, "test": 10000}``; ``{}`` when not recorded).
        Values a run does not record are ``None``.
    """
    run_dir = Path(run_dir)
    info, metrics = read_run_info(run_dir), read_metrics(run_dir)
    cfg_file = run_dir / "config.yaml"
    raw = (yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None) or {}
    train = raw.get("train", {})
    name = raw.get("name", run_dir.name)
    full = REPO_ROOT / "configs" / f"{name}.yaml"
    full_train = load(full).train if full.is_file() else None
    return {"kind": kind, "name": name, "data": info.get("data", {}).get("description"),
            "epochs_run": metrics[-1].get("epoch") if metrics else None, "epochs_planned": train.get("epochs"),
            "epochs_full": full_train.epochs if full_train else None,
            "lr_step": recorded_lr_step(train),
            "lr_step_full": full_train.lr_step if full_train else None,
            "seed": info.get("seed", train.get("seed")), "device": info.get("device"), "status": info.get("status"),
            "test_acc": info.get("results", {}).get("final", {}).get("test_acc"),
            "sizes": info.get("data", {}).get("sizes", {})}


def _schedule_text(info: dict) -> str:
    """``"30 epochs (config: 300)"``: epochs run, of how many planned, and the config file's schedule; for a
    GPU run whose learning rate was set otherwise than its config file says, also that:
    ``"100 epochs (config: 300), rate set per batch (config: per epoch)"``."""
    run, planned, full = info["epochs_run"], info["epochs_planned"], info["epochs_full"]
    text = f"{'?' if run is None else run} epochs"
    if planned is not None and run != planned:
        text += f" of {planned}"
    if info["kind"] == "gpu" and full is not None and full != (planned if planned is not None else run):
        text += f" (config: {full})"
    if info["kind"] == "gpu" and info["lr_step_full"] is not None and info["lr_step"] != info["lr_step_full"]:
        text += f", rate set {lr_step_words(info['lr_step'])} (config: {lr_step_words(info['lr_step_full'])})"
    return text


def run_label(run_dir, kind: str) -> str:
    """One line saying where a figure's panels come from, for titles and captions.

    A GPU run: ``"GPU run: <data set>, <N> epochs (config: <M>), seed <S>, <device>"``; a CPU
    stand-in says that it is one and that its maps are not results.  Read by :func:`run_info`.
    """
    info = run_info(run_dir, kind)
    if kind == "gpu":
        return (f"GPU run: {info['data'] or '?'}, {_schedule_text(info)}, seed {info['seed']}, "
                f"{info['device'] or '?'}")
    return f"CPU stand-in, not a result: 'quick' profile, {info['data'] or '?'}, {_schedule_text(info)}"


def run_title(run_dir) -> str:
    """The title of a run's page: ``"paper_quadratic, seed 42, 30 epochs (config: 300)"``, read by :func:`run_info`;
    a run without a validation split adds ``", all 50,000 training images"``."""
    info = run_info(run_dir, "gpu")
    return f"{info['name']}, seed {info['seed']}, {_schedule_text(info)}{training_set_note(info['sizes'])}"


def retitle_run_page(notebook, run_dir) -> str:
    """Give an executed run page (``book/runs/<stem>.ipynb``) the title of its run, in place.

    The training chapter's first Markdown cell starts with a generic ``# ...`` heading; papermill
    keeps it.  This replaces that first line with ``# Run: <run_title(run_dir)>`` and leaves every
    other cell, output and the notebook's metadata as they are (written atomically).

    Returns:
        The new heading.

    Raises:
        ValueError: the notebook has no Markdown cell starting with a ``# `` heading.
    """
    from ..rundir import write_text

    path = Path(notebook)
    nb = json.loads(path.read_text())
    heading = f"# Run: {run_title(run_dir)}"
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            lines = "".join(cell["source"]).split("\n")
            if not lines[0].startswith("# "):
                break
            cell["source"] = "\n".join([heading] + lines[1:]).splitlines(keepends=True)
            write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            return heading
    raise ValueError(f"{path}: its first Markdown cell does not start with a '# ' heading")


def runs_table(runs: dict) -> str:
    """A Markdown table saying where each model's maps come from (no paths).

    Args:
        runs: ``label -> (run_dir, kind)`` from :func:`find_run`.

    Returns:
        Markdown: model, run (GPU run and its device, or CPU stand-in), data, epochs, seed, and the
        test accuracy of GPU runs (a stand-in's accuracy is meaningless and machine-dependent).
    """
    lines = ["| model | run | data | epochs | seed | test accuracy (final weights) |", "|---|---|---|---|---|---|"]
    for label, (run_dir, kind) in runs.items():
        info = run_info(run_dir, kind)
        if kind == "gpu":
            acc = info["test_acc"]
            run, acc = f"GPU run ({info['device'] or '?'})", "?" if acc is None else f"{100 * acc:.2f}%"
        else:
            run, acc = "CPU stand-in (`quick` profile)", "not shown"
        lines.append(f"| {label} | {run} | {info['data'] or '?'} | {_schedule_text(info)} | {info['seed']} | {acc} |")
    return "\n".join(lines)


def load_atlas(run_dir) -> dict:
    """A run's ``atlas.pt`` (see :func:`satconv.atlas.build_atlas` for its keys)."""
    from ..atlas import load_atlas as _load

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
    return np.stack([to_numpy(pick[kind](p)) for p in atlas[kind]]).astype(np.float32)


def atlas_query(atlas: dict, query: int = 0) -> tuple[int, int]:
    """``(row, col)`` of the atlas's ``query``-th query pixel (layer 0's grid)."""
    height, width = atlas["grid"][0]
    return divmod(int(atlas["query_index"][0][query]), width)


def load_snapshots(run_dir) -> list[dict]:
    """The per-epoch attention snapshots of a run (``snapshots/epoch_XXXX.pt``), in epoch order.

    Layers may have different head counts (a run whose degenerate heads were pruned,
    ``train.prune_degenerate_heads``): the per-layer arrays are then padded to the most heads ``H`` with NaN
    (plots skip NaN points), and ``heads`` says how many each layer has.

    Returns:
        One dict per epoch: ``epoch``; ``centers (L, H, 2)`` and ``spreads (L, H)`` or ``(L, H, 2, 2)``
        of the quadratic layers (``None`` for other mechanisms); ``heads (L,)`` int, the heads of each
        quadratic layer (``None`` for other mechanisms); ``centre_probs (L, H, N)`` float32, each layer's
        attention of the centre query for one test image (``None`` when absent, or when the layers'
        grids differ); ``shift_profile``: per layer ``(H_l, 2R+1, 2R+1)`` float64 arrays, each layer's
        :func:`satconv.analysis.shift_profile` over all interior queries of that image (``None`` in snapshots
        written before they held it); ``params``: the raw parameter dict.
    """
    out = []
    for path in sorted((Path(run_dir) / "snapshots").glob("epoch_*.pt")):
        snap = torch.load(path, map_location="cpu", weights_only=True)
        params = snap.get("params", {})
        centers = [v for k, v in params.items() if k.endswith("attention_centers")]
        spreads = [v for k, v in params.items() if k.endswith("attention_spreads")]
        probs = snap.get("centre_probs") or []
        same_grid = len({tuple(p.shape[1:]) for p in probs}) == 1
        out.append({"epoch": int(snap["epoch"]), "centers": stack_heads(centers), "spreads": stack_heads(spreads),
                    "heads": np.array([len(c) for c in centers]) if centers else None,
                    "centre_probs": stack_heads(probs) if same_grid else None,
                    "shift_profile": [p.double().numpy() for p in snap.get("shift_profile") or []] or None,
                    "params": params})
    return out


def stack_heads(per_layer) -> np.ndarray | None:
    """Per-layer arrays ``(H_l, ...)`` stacked into ``(L, max H_l, ...)`` float, the missing heads NaN.

    Args:
        per_layer: tensors or arrays whose shapes agree except in the first (head) axis.

    Returns:
        The stack, or ``None`` for an empty list.

    Raises:
        ValueError: shapes that differ beyond the head axis.
    """
    if not per_layer:
        return None
    arrays = [to_numpy(t) for t in per_layer]
    if len({a.shape[1:] for a in arrays}) != 1:
        raise ValueError(f"per-layer shapes differ beyond the head axis: {[a.shape for a in arrays]}")
    out = np.full((len(arrays), max(len(a) for a in arrays), *arrays[0].shape[1:]), np.nan,
                  dtype=np.result_type(np.float32, *arrays))
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out
