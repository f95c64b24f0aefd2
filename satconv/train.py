"""Training, evaluation and the run directory (arXiv 1911.03584 App. B; epfml/attention-cnn ``train.py``).

The default recipe is the paper's: SGD (lr 0.1, momentum 0.9, weight decay 1e-4, none on the
Gaussian centres and spreads, bug B3), linear warm-up over 5% of the steps then a per-step
half-cosine to 0 (B6), 300 epochs of batch 100.  ResNet18 configs use the original's MultiStepLR.
Evaluation runs in eval mode under ``no_grad`` (B5); the model is selected on a validation split
held out of the training set, never on the test set.

A run directory (``runs/<name>/`` by default) holds::

    config.yaml        the resolved config
    run.json           provenance (versions, device, git commit, data) and the final results
    metrics.jsonl      one line per epoch (see METRIC_KEYS; test_* every train.test_every epochs)
    last.pt            the full training state, written atomically (every checkpoint_every epochs,
                       at the end, and on Ctrl-C or SIGTERM)
    last.prev.pt       the checkpoint before it (resumed from when last.pt is unreadable)
    .lock              the lock of the process writing the directory (satconv.rundir.RunLock)
    best.pt            the weights with the best validation accuracy
    snapshots/epoch_XXXX.pt   per-epoch attention parameters and centre-query attention
    atlas.pt           attention probabilities of every layer for fixed test images (float16)

``train.init_from`` starts a run from another run's final weights (its ``last.pt``; the optimizer and the
schedule start afresh) and ``train.prune_degenerate_heads`` then removes the degenerate Gaussian heads
(:mod:`satconv.prune`, the paper's pruned anisotropic run); ``run.json`` and the checkpoints record both under
``init``, and a run resumes with the head counts its own checkpoint holds.

Starting a run in a directory holding ``last.pt`` resumes it exactly: model, optimizer, step,
every random state and the metrics so far are restored (bug B7).  One process at a time writes a run
directory; files are replaced whole; ``run.json``'s status ends ``completed``, ``interrupted`` or ``failed``
(:mod:`satconv.rundir`).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import __version__
from .config import (REPO_ROOT, ConfigError, ExperimentConfig, TrainConfig, apply_profile, from_dict, load, override,
                     resolve_path, to_dict)
from .atlas import ATLAS_MAX_BYTES, attention_snapshot, build_atlas, load_atlas
from .attention.base import attention_routes
from .data import DataError, DeviceLoader, load_data, normalize
from .rundir import (BadRunDir, Checkpoints, CorruptFile, DiskFull, Interrupted, RunDirBusy, RunDirError, RunLock,
                     StopSignals, append_text, load_checkpoint, prepare_run_dir, read_json, remove_temp_files,
                     run_status, save_torch, signal_name, write_text)

log = logging.getLogger(__name__)

METRIC_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s",
               "epoch_time_s")
#: config keys that may change between a run and its resumption (they do not affect the numbers)
RESUME_FREE_KEYS = {"name", "description", "train.out_dir", "train.checkpoint_every", "train.test_every",
                    "train.compile", "train.compile_mode", "train.channels_last", "train.step_graph", "train.snapshot_attention", "train.atlas_images", "train.atlas_queries",
                    "train.eval_batch_size", "data.root", "data.cache_dir", "data.device_resident"}
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
#: keys a resumable checkpoint (last.pt) must have
RESUME_KEYS = ("format", "config", "model", "optimizer", "epoch", "step", "rng")
#: model keys (below ``model.``) in which a ``train.init_from`` run may differ from the run it initialises:
#: dropout rates and initialisation spreads do not change the weights' meaning
INIT_FREE_MODEL_KEYS = {"dropout", "attention.dropout", "attention.quadratic.init_center_std",
                        "attention.quadratic.init_spread_std"}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size to lower."""


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


# ---------------------------------------------------------------------------------------------
# Configuration, paths, small helpers
# ---------------------------------------------------------------------------------------------
def resolve_config(cfg: ExperimentConfig | str | Path, overrides=(), profile: str | None = None) -> ExperimentConfig:
    """A validated config from a path or a config: the profile first, then the ``--set`` overrides
    (so they win over the profile), then ``$SATCONV_DATA_ROOT`` (which replaces ``data.root``)."""
    if isinstance(cfg, (str, Path)):
        cfg = load(cfg)
    if profile is not None:
        cfg = apply_profile(cfg, profile)
    if overrides:
        cfg = override(cfg, overrides)
    env = os.environ.get("SATCONV_DATA_ROOT")
    if env:
        cfg = replace(cfg, data=replace(cfg.data, root=env))
    return cfg


def run_dir_for(cfg: ExperimentConfig, out_dir: str | Path | None = None) -> Path:
    """``out_dir`` (relative to the current directory), else ``train.out_dir``, else ``runs/<name>``;
    the latter two relative to the repository root in a source checkout."""
    if out_dir is not None:
        return Path(out_dir).expanduser().resolve()
    p = Path(cfg.train.out_dir).expanduser() if cfg.train.out_dir else Path("runs") / cfg.name
    base = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return (p if p.is_absolute() else base / p).resolve()


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
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(old: dict, cfg: ExperimentConfig, free=RESUME_FREE_KEYS) -> list[str]:
    """``"key: old -> new"`` for every dotted key outside ``free`` in which the plain config ``old``
    (as :func:`~satconv.config.to_dict` writes it) and ``cfg`` differ."""
    old, new = _flat(old), _flat(to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in free and old.get(k) != new.get(k)]


def read_init_weights(cfg: ExperimentConfig) -> tuple[dict, dict]:
    """The final weights of the run directory ``train.init_from`` names (epfml/attention-cnn ``restore_checkpoint``).

    The path resolves like other config paths (:func:`~satconv.config.resolve_path`: the current directory,
    else the repository root).  Its ``last.pt`` is read by :class:`~satconv.rundir.Checkpoints` (an unreadable
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
    old, new = _flat(old_model), _flat(to_dict(cfg.model))
    diff = [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in INIT_FREE_MODEL_KEYS and old.get(k) != new.get(k)]
    if diff:
        raise refuse(f"the model of {path} differs from this config's ({'; '.join(diff)}); its weights do not fit")
    return ck["model"], {"from": str(where), "weights": path.name, "epoch": int(ck["epoch"])}


def source_digest(package_dir: str | Path | None = None) -> str:
    """A digest of the package's Python sources: which code a result ran on.

    The first 16 hex digits of a SHA-256 over every ``*.py`` file below ``package_dir`` (default: this
    package), in sorted relative-path order, each contributing its path and its bytes.  Unlike the
    git commit it is read from the files themselves, so it is right on a machine whose copy of the
    checkout has no, or a stale, git history, and equal wherever the same code runs.

    Args:
        package_dir: a directory of Python sources (``None``: ``satconv/``).

    Returns:
        16 lower-case hex digits.
    """
    root = Path(__file__).resolve().parent if package_dir is None else Path(package_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _progress_enabled(progress: bool) -> bool:
    """Bars only for a terminal or a notebook kernel."""
    if not progress:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    in_kernel = shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    return in_kernel or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The epochs of ``metrics.jsonl`` as dicts (keys :data:`METRIC_KEYS`, plus test_loss/test_acc)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_group_lr(opt: torch.optim.Optimizer, lr) -> None:
    """Give every parameter group of ``opt`` the learning rate ``lr``: a float, or the one-element
    device tensor that a captured training step (:class:`CapturedStep`) reads at each replay."""
    for group in opt.param_groups:
        group["lr"] = lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD groups: ``weight_decay`` everywhere except the Gaussian centres and spreads (bug B3)."""
    from .attention import no_decay_param_groups
    return no_decay_param_groups(model, weight_decay)


# ---------------------------------------------------------------------------------------------
# Evaluation, snapshots, the atlas
# ---------------------------------------------------------------------------------------------
#: inductor settings satconv compiles with, over those of the compile mode, and the environment variable
#: that overrides each.  ``triton.mix_order_reduction`` off: inductor then does not fuse LayerNorm's
#: row reduction (input gradient) with its column reduction (weight gradient) into one kernel; on the
#: H200 those fused kernels ran several times slower than their bytes need (``python -m satconv bench
#: --kernels``; the timing chapter's kernel breakdown shows a step with and without them).
#: ``comprehensive_padding`` off: inductor otherwise pads the row stride of the buffers it lays out (rows
#: longer than 1024 entries, to 128 bytes: a ``(B*N, 3600)`` folded-query buffer gets stride 3648).  A
#: padded output is not contiguous, so ``addmm`` cannot use cuBLASLt's bias epilogue and first copies the
#: broadcast bias into the whole output (about 0.15 ms per layer of the content models on the H200); the
#: step of the learned + content model ran faster overall without the padding (``h200_padding.jsonl``).
INDUCTOR_OPTIONS = {"triton.mix_order_reduction": (False, "TORCHINDUCTOR_MIX_ORDER_REDUCTION"),
                    "comprehensive_padding": (False, "TORCHINDUCTOR_COMPREHENSIVE_PADDING")}


def inductor_setting(key: str, default=None):
    """The value of ``torch._inductor.config`` setting ``key`` (dotted for sections: ``"triton.cudagraphs"``),
    or ``default`` when this torch has no such setting (like ``getattr``)."""
    import torch._inductor.config as ic
    owner, _, name = key.rpartition(".")
    section = getattr(ic, owner, None) if owner else ic
    return getattr(section, name, default)


def compile_options(mode: str | bool | None = None) -> dict:
    """The ``torch.compile(options=...)`` of compile ``mode`` (``None``, ``True`` or ``"default"``, or a
    CUDA-graph mode): the mode's own inductor options (``torch._inductor.list_mode_options``) plus :data:`INDUCTOR_OPTIONS`,
    except those this torch lacks or whose environment variable is set (the user's choice wins)."""
    import torch._inductor as inductor
    options = dict(inductor.list_mode_options("default" if mode in (None, True) else mode))
    missing = object()
    for key, (value, env) in INDUCTOR_OPTIONS.items():
        if env not in os.environ and inductor_setting(key, missing) is not missing:
            options[key] = value
    return options


def compile_model(model: nn.Module, mode: str | bool | None = None):
    """``torch.compile(model, dynamic=False)`` in compile ``mode``, with :func:`compile_options`.

    Args:
        model: any module.
        mode: ``None``, ``True`` or ``"default"``, ``"reduce-overhead"`` or ``"max-autotune"`` (``train.compile_mode``).

    Returns:
        The compiled callable (CUDA-graph modes: see :func:`compiled` for the step marks).
    """
    return torch.compile(model, options=compile_options(mode), dynamic=False)


@torch.no_grad()
def compiled(model: nn.Module, mode: str = "default"):
    """``torch.compile(model, dynamic=False)`` in ``mode``; with CUDA graphs (reduce-overhead, max-autotune)
    every call starts a new graph step, so outputs stay valid until the next call.

    Static shapes: an epoch's smaller last batch, or the evaluation batch, gets a graph of its own.  With
    dynamo's default (``dynamic=None``) the second batch size recompiles the model with a symbolic batch,
    and the training steps of every later epoch run that slower, shape-generic graph (as the benchmark
    compiles with ``dynamic=False``, the whole-epoch comparison would then not compare like with like).

    Args:
        model: maps ``(B, C, H, W)`` images to logits.
        mode: a ``train.compile_mode`` value.

    Returns:
        A callable with the model's forward signature.
    """
    run = compile_model(model, mode)
    return _GraphSteps(model, run) if mode in ("reduce-overhead", "max-autotune") else run


class _GraphSteps(nn.Module):
    """A compiled model whose every call begins a new CUDA-graph step; ``train()``/``eval()`` reach the model."""

    def __init__(self, model: nn.Module, run):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_run", run)  # not a registered submodule: no second copy of the weights

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return self._run(*args, **kwargs)


def evaluate_model(model: nn.Module, loader: DeviceLoader, bf16: bool = False) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over a loader, in eval mode.

    Args:
        model: ``(B, 3, H, W) -> (B, classes)``; its train/eval mode is restored afterwards.
        loader: unaugmented batches.
        bf16: autocast to bfloat16 (CUDA).
    """
    was_training = model.training
    model.eval()
    device = loader.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # no autograd graph: without this the running sums would keep every batch's graph alive (B5)
    with torch.inference_mode():
        for x, y in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = max(1, len(loader.split))
    return loss.item() / n, correct.item() / n


# ---------------------------------------------------------------------------------------------
# The whole training step in one CUDA graph (train.step_graph)
# ---------------------------------------------------------------------------------------------
class CapturedStep:
    """A training step captured once in a CUDA graph and replayed (``train.step_graph``).

    ``torch.compile``'s CUDA-graph modes graph the forward and the backward pass separately and leave
    the loss, the optimiser step and their bookkeeping to the host at every step; a small network, whose
    kernels of a step finish quickly (ResNet18 at batch 100), then waits on the host.  Here one graph
    holds forward, loss, backward and the optimiser step (the PyTorch CUDA-graphs notes' whole-network
    capture), so a step costs one input copy and one replay.

    - The first ``warmup`` calls run ``body`` eagerly on a side stream (optimiser state, cuDNN and
      ``torch.compile`` autotuning happen there).
    - The next call copies its inputs into static buffers, sets the gradients to ``None`` (the captured
      backward writes them, it does not accumulate), captures ``body`` and replays it once: capture
      records the work without running it.
    - Later calls with the captured shapes copy and replay; other shapes (an epoch's smaller last
      batch) run eagerly.  A replay's outputs are static tensors that the next replay overwrites.
      The gradients live in the graph's memory: after an eager call ``param.grad`` holds that call's
      gradients, not a later replay's (nothing outside the step reads them).
    - The learning rate reaches replays through a one-element CUDA tensor that the captured optimiser
      step reads (:meth:`set_lr`); the optimiser's groups keep Python floats, so checkpoints are unchanged.

    Args:
        body: ``(x, y) -> tuple of tensors``: forward, loss, ``backward()`` and ``opt.step()``, no host
            synchronisation.
        opt: the optimiser ``body`` steps (SGD, ``fused=True``: a tensor learning rate is read on the device).
        warmup: eager calls before the capture (>= 1).

    ``__call__(x: (B, ...), y: (B,)) -> body's outputs``.  CUDA only.
    """

    def __init__(self, body: Callable, opt: torch.optim.Optimizer, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager call before the capture, got {warmup}")
        self.body, self.opt, self.warmup = body, opt, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lr: torch.Tensor | None = None
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out = None

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (eager calls and replays alike)."""
        set_group_lr(self.opt, lr)
        if self.lr is not None:
            self.lr.fill_(lr)

    def _eager(self, x: torch.Tensor, y: torch.Tensor):
        self.opt.zero_grad(set_to_none=True)
        return self.body(x, y)

    def _matches(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
                   for a, b in zip((x, y), self.static_in))

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.graph is not None:
            if not self._matches(x, y):
                return self._eager(x, y)
            for static, new in zip(self.static_in, (x, y)):
                static.copy_(new)
            self.graph.replay()
            return self.static_out
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            for t in out:  # made on the side stream, read on this one
                if t.is_cuda:
                    t.record_stream(torch.cuda.current_stream())
            return out
        return self._capture(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor):
        lrs = {float(group["lr"]) for group in self.opt.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"train.step_graph needs one learning rate for every parameter group, got {sorted(lrs)}")
        lr = lrs.pop()
        self.static_in = (x.clone(memory_format=torch.preserve_format), y.clone())
        self.lr = torch.tensor(lr, dtype=torch.float32, device=x.device)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        set_group_lr(self.opt, self.lr)  # read on the device by the captured (fused) optimiser step
        try:
            with torch.cuda.graph(graph):
                self.static_out = self.body(*self.static_in)
        except OOM_ERRORS:
            raise  # the run's out-of-memory advice applies as is
        except RuntimeError as exc:
            raise RuntimeError(f"train.step_graph: the training step cannot be captured in a CUDA graph "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                               f"set train.step_graph=false") from exc
        finally:
            set_group_lr(self.opt, lr)
        self.graph = graph
        self.graph.replay()  # the capture recorded this step without running it
        return self.static_out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Run:
    """State of one training run; :meth:`fit` trains, resumes and writes the run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool,
                 model_factory: Callable | None):
        self.cfg, self.dir, self.device, self.progress = cfg, run_dir, device, progress
        t = cfg.train
        _seed_all(t.seed)
        self.checkpoints = Checkpoints(run_dir)
        # train.init_from / prune_degenerate_heads: the model's shape may differ from the config's, so the run's
        # own checkpoint is read now (resume() uses it), and otherwise init_from's weights (errors before the data)
        self.init_record: dict | None = None
        self._found = init_state = None
        if t.init_from is not None or t.prune_degenerate_heads:
            self._found = self.checkpoints.load(keys=RESUME_KEYS)
            if self._found is None and t.init_from is not None:
                init_state, self.init_record = read_init_weights(cfg)
        data = load_data(cfg)
        if data.image_size != (cfg.model.image_size, cfg.model.image_size):
            raise ValueError(f"model.image_size={cfg.model.image_size} but the data's images are "
                             f"{data.image_size[0]}x{data.image_size[1]}")
        self.data = data.to(device if cfg.data.device_resident else "cpu")
        if model_factory is None:
            from .models import build_model as model_factory
        self.model_factory = model_factory
        self.model = model_factory(cfg.model).to(device)
        if self._found is not None and not config_diff(self._found[0]["config"], cfg):
            from .prune import fit_heads_to_state  # resuming: the heads the run's checkpoint holds
            fit_heads_to_state(self.model, self._found[0]["model"])
            self.init_record = self._found[0].get("init")
        elif self._found is None and (init_state is not None or t.prune_degenerate_heads):
            self.init_record = self._initialise(init_state, self.init_record or {})
        self.cuda = device.type == "cuda"
        self.bf16 = t.precision == "bf16" and self.cuda
        self.channels_last = t.channels_last and self.cuda
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = compiled(self.model, t.compile_mode) if t.compile and self.cuda else self.model
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.opt = torch.optim.SGD(param_groups(self.model, t.weight_decay), lr=t.lr, momentum=t.momentum,
                                   nesterov=t.nesterov, fused=self.cuda)  # one kernel for all parameters
        self.captured = CapturedStep(self._step_body, self.opt) if t.step_graph and self.cuda else None
        mean, std = cfg.data.mean, cfg.data.std
        self.train_loader = DeviceLoader(self.data.train, t.batch_size, device, mean, std, cfg.data.augment)
        self.val_loader = DeviceLoader(self.data.val, t.eval_batch_size, device, mean, std)
        self.test_loader = DeviceLoader(self.data.test, t.eval_batch_size, device, mean, std)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.epoch = self.step = self.step_in_epoch = 0
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "lr": 0.0}
        self.aug_state = None
        self.metrics: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.stop = StopSignals()
        self.saved: tuple[int, int] | None = None  # (epoch, step) of the newest good checkpoint on disk
        self.phase = "train"
        self.snapshot_image = None
        if len(self.data.test):
            self.snapshot_image = normalize(self.data.test.images[:1].to(device), mean, std)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        return {"format": "satconv-checkpoint-1", "config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "sums": dict(self.sums), "aug_state": self.aug_state,
                "rng": _rng_state(), "metrics": self.metrics, "best": self.best,
                "best_model": self.best_state if self.best and self.best["epoch"] != self.epoch else None,
                "init": self.init_record}

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` whole, keeping the one before as ``last.prev.pt``."""
        self.checkpoints.save(self._checkpoint())
        self.saved = (self.epoch, self.step)

    def _kept(self) -> str:
        if self.saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.checkpoints.newest} (epoch {self.saved[0]}, step {self.saved[1]}) is kept"

    @property
    def interrupted(self) -> bool:
        """A SIGINT or SIGTERM asked the run to stop."""
        return self.stop.signum is not None

    def _interrupt(self, epoch: int) -> None:
        """Checkpoint where the run stands and raise :class:`Interrupted` naming the signal."""
        self.save_checkpoint()
        raise Interrupted(self.stop.signum, f"stopped by {signal_name(self.stop.signum)}; checkpoint saved in "
                                            f"{self.checkpoints.newest} (epoch {epoch + 1}, step {self.step}); "
                                            f"run again to resume")

    def _initialise(self, state: dict | None, record: dict) -> dict:
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
        from .prune import fit_heads_to_state, head_conditioning, head_counts, prune_degenerate_heads, quadratic_layers
        t = self.cfg.train
        if state is not None:
            try:
                fit_heads_to_state(self.model, state)  # an init run that pruned heads itself
                self.model.load_state_dict(state)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(self.cfg.name, "train.init_from", t.init_from,
                                  f"the weights of {record['from']} do not fit this model "
                                  f"({' '.join(str(exc).split())[:400]})") from None
        record = {**record, "heads": head_counts(self.model)}
        bf16 = t.precision == "bf16" and self.device.type == "cuda"
        loaders = {split: DeviceLoader(getattr(self.data, split), t.eval_batch_size, self.device, self.cfg.data.mean,
                                       self.cfg.data.std) for split in ("val", "test") if len(getattr(self.data, split))}

        def scores() -> dict:
            out = {}
            for split, loader in loaders.items():
                out[f"{split}_loss"], out[f"{split}_acc"] = evaluate_model(self.model, loader, bf16)
            return out

        if state is not None:
            record["loaded"] = scores()
        if t.prune_degenerate_heads:
            stats = {name: head_conditioning(m) for name, m in quadratic_layers(self.model).items()}
            pruned = prune_degenerate_heads(self.model)
            finite = lambda v: float(v) if math.isfinite(float(v)) else "inf"  # noqa: E731 -- JSON has no inf
            record["pruned_heads"] = pruned
            record["degenerate"] = {name: {str(h): {"cond": finite(stats[name][0][h]),
                                                    "largest_eig": float(stats[name][1][h])} for h in heads}
                                    for name, heads in pruned.items() if heads}
            record["heads_after"] = head_counts(self.model)
            if state is not None:
                record["after_pruning"] = scores() if any(pruned.values()) else dict(record["loaded"])
            log.info("pruned degenerate heads: %s", {k: v for k, v in pruned.items() if v} or "none")
        return record

    def _save_best(self, state: dict) -> None:
        save_torch({"model": state, **self.best, "config": to_dict(self.cfg)}, self.dir / "best.pt")

    def resume(self) -> bool:
        """Restore ``last.pt`` (``last.prev.pt`` when it is unreadable) if present; rewrite metrics.jsonl and
        best.pt to match it."""
        found = self._found if self._found is not None else self.checkpoints.load(keys=RESUME_KEYS)
        self._found = None
        if found is None:
            return False
        ck, path = found
        diff = config_diff(ck["config"], self.cfg)
        if diff:
            raise ValueError(f"{self.dir} holds a checkpoint of a different config ({'; '.join(diff)}); "
                             f"resume with the same config, or choose another output directory (--out)")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.epoch, self.step, self.step_in_epoch = ck["epoch"], ck["step"], ck["step_in_epoch"]
        self.sums, self.aug_state, self.metrics, self.best = ck["sums"], ck["aug_state"], ck["metrics"], ck["best"]
        _set_rng_state(ck["rng"])
        self.saved = (self.epoch, self.step)
        if self.best is not None:
            self.best_state = ck["best_model"] if ck["best_model"] is not None else ck["model"]
            self._save_best(self.best_state)
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        log.info("resumed %s from %s at epoch %d, step %d", self.dir, path.name, self.epoch, self.step)
        return True

    # -- training ------------------------------------------------------------------------------
    def _step_body(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, loss, backward and SGD step (gradients already ``None``); ``(loss, correct)`` as tensors."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.train.label_smoothing)
        loss.backward()
        self.opt.step()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.captured is not None:  # train.step_graph: one replay (the outputs live until the next step)
            self.captured.set_lr(lr)
            return self.captured(x, y)
        set_group_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        return self._step_body(x, y)

    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        if bool(bad):
            advice = ("a lower train.lr, a longer warm-up (train.warmup_ratio) or train.precision=fp32" if self.bf16
                      else "a lower train.lr or a longer warm-up (train.warmup_ratio)")
            raise NonFiniteLoss(f"the training loss became NaN or Inf in epoch {epoch + 1} (by step {self.step}, "
                                f"lr {self.sums['lr']:.4g}); the run stopped and {self._kept()}. Try {advice}")

    def _epoch(self, epoch: int, bar, stop_after_steps, save_on_stop) -> bool:
        """Train one epoch from ``self.step_in_epoch``; returns False when stopped early."""
        t = self.cfg.train
        n = len(self.data.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_derived_seed(t.seed, epoch, "order")))
        perm = perm.to(self.data.train.images.device)  # one copy per epoch: batches then index without a host wait
        g = torch.Generator()
        if self.aug_state is not None:
            g.set_state(self.aug_state)
        else:
            g.manual_seed(_derived_seed(t.seed, epoch, "augment"))
        dev = self.device
        loss_sum = torch.tensor(self.sums["loss"], dtype=torch.float64, device=dev)
        correct = torch.tensor(self.sums["correct"], dtype=torch.int64, device=dev)
        seen = self.sums["seen"]
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        sync_every = 25 if self.cuda else 1
        start = time.perf_counter()
        self.model.train()
        for b in range(self.step_in_epoch, self.steps_per_epoch):
            idx = perm[b * t.batch_size:(b + 1) * t.batch_size]
            x, y = self.train_loader.batch(idx, g)
            lr = lr_at(self.step, self.steps_per_epoch, t)
            loss, hits = self._train_step(x, y, lr)
            self.step += 1
            loss_sum += loss.double() * len(idx)
            correct += hits
            seen += len(idx)
            bad |= ~torch.isfinite(loss)
            self.sums["lr"] = lr
            last_step = b + 1 == self.steps_per_epoch
            stop = stop_after_steps is not None and self.step == stop_after_steps
            if self.step % sync_every == 0 or last_step or stop or self.interrupted:
                self._check_finite(bad, epoch)
                if bar is not None:
                    elapsed = self.sums["time"] + time.perf_counter() - start
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if (stop or self.interrupted) and not last_step:
                self.step_in_epoch, self.aug_state = b + 1, g.get_state()
                self.sums.update(loss=loss_sum.item(), correct=int(correct.item()), seen=seen,
                                 time=self.sums["time"] + time.perf_counter() - start)
                if self.interrupted:
                    self._interrupt(epoch)
                if save_on_stop:
                    self.save_checkpoint()
                return False
        if self.cuda:
            torch.cuda.synchronize()
        self.sums.update(loss=loss_sum.item(), correct=int(correct.item()), seen=seen,
                         time=self.sums["time"] + time.perf_counter() - start)
        return True

    def _end_epoch(self, epoch: int, epoch_start: float) -> dict:
        t, s = self.cfg.train, self.sums
        self.phase = "eval"
        row = {"epoch": epoch + 1, "step": self.step, "lr": s["lr"], "train_loss": s["loss"] / s["seen"],
               "train_acc": s["correct"] / s["seen"], "val_loss": None, "val_acc": None,
               "images_per_s": s["seen"] / max(s["time"], 1e-9), "epoch_time_s": 0.0}
        if len(self.data.val):
            row["val_loss"], row["val_acc"] = evaluate_model(self.forward, self.val_loader, self.bf16)
            # a NaN gradient in the epoch's last step leaves a finite loss but broken weights
            self._check_finite(torch.tensor(not math.isfinite(row["val_loss"])), epoch)
        # a whole epoch: data, augmentation, training steps and validation (not the occasional test pass)
        row["epoch_time_s"] = time.perf_counter() - epoch_start
        if (epoch + 1) % t.test_every == 0 or epoch + 1 == t.epochs:
            row["test_loss"], row["test_acc"] = evaluate_model(self.forward, self.test_loader, self.bf16)
        if self.cuda:  # peak device memory so far (GiB), for the run report
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.metrics.append(row)
        if row["val_acc"] is not None and (self.best is None or row["val_acc"] > self.best["val_acc"]):
            self.best = {"epoch": epoch + 1, "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self._save_best(self.best_state)
        if t.snapshot_attention:
            self._snapshot(epoch + 1)
        append_text(self.dir / "metrics.jsonl", json.dumps(row) + "\n")
        self.epoch, self.step_in_epoch, self.aug_state = epoch + 1, 0, None
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "lr": s["lr"]}
        if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
            self.save_checkpoint()
        self.phase = "train"
        log.info("epoch %d/%d  %s", epoch + 1, t.epochs,
                 "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        return row

    def _snapshot(self, epoch: int) -> None:
        snap = attention_snapshot(self.model, self.snapshot_image)
        if snap["params"] or snap["centre_probs"]:
            (self.dir / "snapshots").mkdir(exist_ok=True)
            save_torch({"epoch": epoch, **snap}, self.dir / "snapshots" / f"epoch_{epoch:04d}.pt")

    def fit(self, stop_after_steps: int | None = None, save_on_stop: bool = True) -> RunResult:
        """Train (resuming from the run directory's checkpoint) to the end or to ``stop_after_steps``.

        Call while holding the directory's :class:`~satconv.rundir.RunLock`.  SIGINT and SIGTERM stop at the
        next step boundary with a checkpoint (:class:`~satconv.rundir.Interrupted`); ``run.json`` ends
        ``completed``, ``stopped``, ``interrupted`` or ``failed`` (with the error).
        """
        t = self.cfg.train
        remove_temp_files(self.dir)
        try:
            previous = (read_json(self.dir / "run.json") or {}).get("status")
        except CorruptFile:
            previous = "unreadable"  # _write_run_json warns and writes it anew
        if previous == "running":  # and this process holds the lock: the attempt that wrote it was killed
            previous = "died"
            log.info("%s: the previous attempt died while running", self.dir)
        try:
            resumed = self.resume()
        except DiskFull as exc:  # rewriting best.pt or metrics.jsonl
            raise self._disk_full(exc) from exc
        if not resumed:  # a fresh start: drop what an attempt that never checkpointed left behind
            for stale in ("metrics.jsonl", "best.pt", "atlas.pt", "run.json"):
                (self.dir / stale).unlink(missing_ok=True)
            for stale in (self.dir / "snapshots").glob("epoch_*.pt"):
                stale.unlink()
        bar = None
        try:
            with self.stop, attention_routes(t.attention_route, t.shared_route):
                write_text(self.dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
                self._write_run_json(resumed, status="running", previous=previous)
                if self.epoch < t.epochs and _progress_enabled(self.progress):
                    from tqdm.auto import tqdm
                    bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
                if not resumed and t.snapshot_attention:
                    self.phase = "eval"
                    self._snapshot(0)
                    self.phase = "train"
                for epoch in range(self.epoch, t.epochs):
                    if self.interrupted:  # the signal came during the last epoch's evaluation or checkpoint
                        self._interrupt(epoch)
                    if bar is not None:
                        bar.set_description(f"epoch {epoch + 1}/{t.epochs}")
                    epoch_start = time.perf_counter()
                    if not self._epoch(epoch, bar, stop_after_steps, save_on_stop):
                        self._write_run_json(True, status="stopped")
                        return RunResult(self.dir, self.cfg, list(self.metrics), {}, False)
                    self._end_epoch(epoch, epoch_start)
                    if stop_after_steps is not None and self.step == stop_after_steps and epoch + 1 < t.epochs:
                        if save_on_stop and (epoch + 1) % t.checkpoint_every:
                            self.save_checkpoint()
                        self._write_run_json(True, status="stopped")
                        return RunResult(self.dir, self.cfg, list(self.metrics), {}, False)
                results = self._finish()
                if self.interrupted:  # it came during the last evaluation: the run is complete, nothing to resume
                    log.warning("%s came after the last training step; the run completed",
                                signal_name(self.stop.signum))
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", None)
            self._record_end("interrupted", signal=signal_name(signum) if signum is not None else "SIGINT")
            raise
        except OOM_ERRORS as exc:
            size = ("train.batch_size", t.batch_size) if self.phase == "train" else \
                ("train.eval_batch_size", t.eval_batch_size)
            error = OutOfMemory(f"{self.device.type.upper()} out of memory ({_device_name(self.device)}) at "
                                f"{size[0]}={size[1]}; try a smaller one, e.g. --set {size[0]}={max(1, size[1] // 2)}"
                                f"{' (the learning rate is not rescaled)' if self.phase == 'train' else ''}")
            self._record_end("failed", error=str(error))
            raise error from exc
        except DiskFull as exc:
            error = self._disk_full(exc)
            self._record_end("failed", error=str(error))
            raise error from exc
        except Exception as exc:
            self._record_end("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if bar is not None:
                bar.close()
        return RunResult(self.dir, self.cfg, list(self.metrics), results, True)

    def _disk_full(self, exc: DiskFull) -> DiskFull:
        """``exc`` with what the run kept and how to go on."""
        return DiskFull(f"{exc}; the run stopped and {self._kept()}. Free some space and run again to resume", exc.path)

    def _record_end(self, status: str, **extra) -> None:
        """Write the final status into run.json; a failure to do so (a full disk) is logged, not raised."""
        try:
            self._write_run_json(True, status=status, **extra)
        except (RunDirError, OSError) as exc:
            log.warning("could not record status %r in %s: %s", status, self.dir / "run.json", exc)

    def _finish(self) -> dict:
        """Final and best-on-validation numbers, the atlas, run.json."""
        t, last = self.cfg.train, self.metrics[-1]
        self.phase = "eval"
        results = {"final": {"epoch": last["epoch"], "val_loss": last["val_loss"], "val_acc": last["val_acc"],
                             "test_loss": last.get("test_loss"), "test_acc": last.get("test_acc")}}
        if self.best is not None:
            if self.best["epoch"] == last["epoch"]:
                results["best"] = dict(results["final"])
            else:
                model = copy.deepcopy(self.model)
                model.load_state_dict(self.best_state)
                loss, acc = evaluate_model(model, self.test_loader, self.bf16)
                results["best"] = {**self.best, "test_loss": loss, "test_acc": acc}
        atlas_path = self.dir / "atlas.pt"
        if t.atlas_images > 0 and t.atlas_queries > 0 and not atlas_path.is_file():
            atlas = build_atlas(self.model, self.data, self.cfg.data.mean, self.cfg.data.std, t.atlas_images,
                                t.atlas_queries, self.device)
            if atlas is not None:
                save_torch(atlas, atlas_path)
                size = atlas_path.stat().st_size
                if size > ATLAS_MAX_BYTES:
                    log.warning("atlas.pt is %.1f MB (> %.0f MB): lower train.atlas_images or train.atlas_queries",
                                size / 2 ** 20, ATLAS_MAX_BYTES / 2 ** 20)
        self.phase = "train"
        self._write_run_json(True, status="completed", results=results)
        return results

    def _write_run_json(self, resumed: bool, status: str, results: dict | None = None, previous: str | None = None,
                        **extra) -> None:
        """run.json with ``status``; ``previous``: the status an attempt being resumed ended with (``died``
        for a killed one); ``extra``: ``error`` or ``signal`` of the end."""
        path = self.dir / "run.json"
        try:
            info = read_json(path) or {}
        except CorruptFile as exc:
            log.warning("%s; it is written anew", exc)
            info = {}
        if not info:
            info = {"satconv": __version__, "torch": torch.__version__, "python": platform.python_version(),
                    "device": _device_name(self.device), "git_commit": _git_commit(),
                    "satconv_source": source_digest(), "seed": self.cfg.train.seed,
                    "data": self.data.info(), "start_time": _now(), "resumes": []}
        elif resumed and status == "running":
            info.setdefault("resumes", []).append({"time": _now(), "epoch": self.epoch, "step": self.step,
                                                   "previous_status": previous, "device": _device_name(self.device),
                                                   "torch": torch.__version__, "satconv_source": source_digest()})
        info["status"] = status
        if self.init_record is not None:
            info["init"] = self.init_record
        for key in ("end_time", "error", "signal"):  # of an earlier attempt's end
            info.pop(key, None)
        info.update(extra)
        if status != "running":
            info["end_time"] = _now()
        if results is not None:
            info["results"] = results
            info["atlas"] = (self.dir / "atlas.pt").is_file()
        write_text(path, json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def train(cfg: ExperimentConfig | str | Path, out_dir: str | Path | None = None, overrides=(),
          profile: str | None = None, device: str | torch.device | None = None, progress: bool = True, *,
          model_factory: Callable | None = None, stop_after_steps: int | None = None,
          save_on_stop: bool = True) -> RunResult:
    """Train (or resume) a run; callable from a notebook and behind ``python -m satconv train``.

    Args:
        cfg: an :class:`ExperimentConfig` or the path of a YAML config.
        out_dir: run directory; ``None``: ``train.out_dir`` or ``runs/<name>``.  A directory holding
            ``last.pt`` is resumed (from ``last.prev.pt``, with a warning, when ``last.pt`` is unreadable).
        overrides: ``"a.b=value"`` strings.
        profile: a named overlay such as ``"quick"``.
        device: ``"cpu"``, ``"cuda"``, ...; ``None``: CUDA when available.
        progress: tqdm bars (only shown in a terminal or a notebook).
        model_factory: ``ModelConfig -> nn.Module``; ``None``: :func:`satconv.models.build_model`.
        stop_after_steps: stop once this many optimisation steps are done in all (tests of resume).
        save_on_stop: checkpoint when stopping that way (``False`` simulates a kill).

    Returns:
        :class:`RunResult`.

    Raises:
        BadRunDir (a ValueError): the run directory is a file or cannot be created (before any data is
            loaded).
        RunDirBusy: another live process is writing the run directory (nothing was touched).
        CorruptFile: the directory's checkpoints exist but none is readable.
        DiskFull: a write found no space; the last good checkpoint is kept.
        NonFiniteLoss, OutOfMemory, DataError, ConfigError, ValueError.
        Interrupted (a KeyboardInterrupt) after checkpointing on SIGINT or SIGTERM; its ``signum`` says which.
    """
    cfg = resolve_config(cfg, overrides, profile)
    device = torch.device(device) if device is not None else default_device()
    run_dir = prepare_run_dir(run_dir_for(cfg, out_dir))
    with RunLock(run_dir):
        run = _Run(cfg, run_dir, device, progress, model_factory)
        return run.fit(stop_after_steps, save_on_stop)


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
    model = model_factory(cfg.model)
    from .prune import fit_heads_to_state
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


__all__ = ["train", "evaluate", "evaluate_model", "read_metrics", "load_model", "load_atlas", "build_atlas",
           "attention_snapshot", "lr_at", "resolve_config", "run_dir_for", "param_groups", "RunResult",
           "NonFiniteLoss", "OutOfMemory", "DataError", "METRIC_KEYS", "INDUCTOR_OPTIONS", "compile_options",
           "compile_model", "compiled", "inductor_setting", "read_run_config", "BadRunDir", "RunDirBusy",
           "RunDirError", "CorruptFile", "DiskFull", "Interrupted"]
