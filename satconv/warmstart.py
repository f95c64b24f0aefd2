"""Starting a run from another run's final weights, and pruning its degenerate heads (``train.init_from``,
``train.prune_degenerate_heads``).

The paper's pruned anisotropic run (epfml/attention-cnn ``quadratic-generalized-pruned``) loads the final
weights of the anisotropic quadratic run, removes the Gaussian heads whose :math:`\\Sigma^{-1}` is
degenerate (:mod:`satconv.prune`) and trains on.  :func:`read_init_weights` reads and checks those weights;
:func:`initialise` loads them into a fresh model, scores them and prunes.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .augmentation import DeviceLoader
from .config import ConfigError, ExperimentConfig, key_diff, resolve_path, to_dict
from .prune import fit_heads_to_state, head_conditioning, head_counts, prune_degenerate_heads, quadratic_layers
from .checkpoints import Checkpoints
from .rundir import CorruptFile
from .steps import evaluate_model

log = logging.getLogger(__name__)

#: model keys (below ``model.``) in which a ``train.init_from`` run may differ from the run it initialises:
#: dropout rates and initialisation spreads do not change the weights' meaning
INIT_FREE_MODEL_KEYS = {"dropout", "attention.dropout", "attention.quadratic.init_center_std",
                        "attention.quadratic.init_spread_std"}


def read_init_weights(cfg: ExperimentConfig) -> tuple[dict, dict]:
    """The final weights of the run directory ``train.init_from`` names (epfml/attention-cnn ``restore_checkpoint``).

    The path resolves like other config paths (:func:`~satconv.config.resolve_path`: the current directory,
    else the repository root).  Its ``last.pt`` is read by :class:`~satconv.checkpoints.Checkpoints` (an unreadable
    one falls back to ``last.prev.pt`` with a warning); the run must have finished all its epochs, and its
    model section must equal ``cfg.model`` except for :data:`INIT_FREE_MODEL_KEYS`.

    Returns:
        ``(state, record)``: the model state dict, and ``{"from": absolute path, "weights": file name,
        "epoch": epochs trained}`` for ``run.json``.

    Raises:
        ConfigError: no such directory, no checkpoint in it, an unfinished run, or another model.
        CorruptFile: its checkpoints exist but none is readable.
    """
    raw = cfg.train.init_from
    where = resolve_path(raw).resolve()

    def refuse(why: str):
        return ConfigError(cfg.name, "train.init_from", raw, why)

    if not where.is_dir():
        raise refuse(f"no run directory at {where}; train that run first, or point train.init_from at where its "
                     f"run directory is (--set train.init_from=DIR)")
    found = Checkpoints(where).load(keys=("config", "model", "epoch"))
    if found is None:
        raise refuse(f"{where} holds no last.pt (not a run directory, or a run that never saved a checkpoint)")
    ck, path = found
    try:
        total = int(ck["config"]["train"]["epochs"])
        old_model = dict(ck["config"]["model"])
    except (KeyError, TypeError, ValueError):
        raise CorruptFile(path, "its config has no train.epochs or model section") from None
    if ck["epoch"] < total:
        raise refuse(f"{path} holds epoch {ck['epoch']} of {total}: that run has not finished; finish it (run its "
                     f"config again to resume) before starting from its final weights")
    diff = key_diff(old_model, to_dict(cfg.model), INIT_FREE_MODEL_KEYS, prefix="model.")
    if diff:
        raise refuse(f"the model of {path} differs from this config's ({'; '.join(diff)}); its weights do not fit")
    return ck["model"], {"from": str(where), "weights": path.name, "epoch": int(ck["epoch"])}


def initialise(model: nn.Module, cfg: ExperimentConfig, data, device: torch.device, state: dict | None,
               record: dict) -> dict:
    """A fresh start's model: ``train.init_from``'s weights (``state``), then its degenerate heads pruned
    when ``train.prune_degenerate_heads`` asks (:func:`satconv.prune.prune_degenerate_heads`).

    Returns:
        The record kept in ``run.json`` and the checkpoints under ``init``: ``record`` (where the weights
        came from), ``heads`` (per quadratic layer, before pruning), ``loaded`` (val/test loss and accuracy
        of the loaded weights); with pruning ``pruned_heads`` (per layer, old numbering), ``degenerate``
        (condition number and largest eigenvalue of each pruned head's ``Sigma^-1``), ``heads_after``
        and ``after_pruning`` (the numbers right after pruning, before any training).

    Raises:
        ConfigError: the weights do not fit the model.
        ValueError: every head of a layer is degenerate.
    """
    t = cfg.train
    if state is not None:
        try:
            fit_heads_to_state(model, state)  # an init run that pruned heads itself
            model.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(cfg.name, "train.init_from", t.init_from,
                              f"the weights of {record['from']} do not fit this model "
                              f"({' '.join(str(exc).split())[:400]})") from None
    record = {**record, "heads": head_counts(model)}
    bf16 = t.precision == "bf16" and device.type == "cuda"
    loaders = {split: DeviceLoader(getattr(data, split), t.eval_batch_size, device, cfg.data.mean,
                                   cfg.data.std) for split in ("val", "test") if len(getattr(data, split))}

    def scores() -> dict:
        out = {}
        for split, loader in loaders.items():
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate_model(model, loader, bf16)
        return out

    if state is not None:
        record["loaded"] = scores()
    if t.prune_degenerate_heads:
        stats = {name: head_conditioning(m) for name, m in quadratic_layers(model).items()}
        pruned = prune_degenerate_heads(model)
        finite = lambda v: float(v) if math.isfinite(float(v)) else "inf"  # noqa: E731 -- JSON has no inf
        record["pruned_heads"] = pruned
        record["degenerate"] = {name: {str(h): {"cond": finite(stats[name][0][h]),
                                                "largest_eig": float(stats[name][1][h])} for h in heads}
                                for name, heads in pruned.items() if heads}
        record["heads_after"] = head_counts(model)
        if state is not None:
            record["after_pruning"] = scores() if any(pruned.values()) else dict(record["loaded"])
        log.info("pruned degenerate heads: %s", {k: v for k, v in pruned.items() if v} or "none")
    return record
