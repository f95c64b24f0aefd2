"""Training, evaluation and the run directory (arXiv 1911.03584 App. B; epfml/attention-cnn ``train.py``).

The default recipe is the paper's: SGD (lr 0.1, momentum 0.9, weight decay 1e-4, none on the
Gaussian centres and spreads, bug B3), linear warm-up over 5% of the steps then a per-step
half-cosine to 0 (B6), 300 epochs of batch 100.  ResNet18 configs use the original's MultiStepLR.
Evaluation runs in eval mode under ``no_grad`` (B5); the model is selected on a validation split
held out of the training set, never on the test set.

A run directory (``runs/<name>/`` by default) holds::

    last.pt            the full training state, written atomically (every checkpoint_every epochs,
                       at the end, and on Ctrl-C or SIGTERM)
    last.prev.pt       the checkpoint before it (resumed from when last.pt is unreadable)
    .lock              the lock of the process writing the directory (satconv.rundir.RunLock)

and the run's records, written by :class:`satconv.records.RunRecords`: ``config.yaml``, ``run.json``
(provenance, status, trainable parameter count, final results), ``metrics.jsonl`` (one line per epoch, see
METRIC_KEYS; test_* every train.test_every epochs), ``best.pt``, ``snapshots/epoch_XXXX.pt``, ``atlas.pt``.

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
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .config import ExperimentConfig, to_dict
from .attention.routes import Routes, set_routes
from .augmentation import DeviceLoader
from .checkpoints import RESUME_KEYS, Checkpoints, config_diff
from .data import load_data
from . import distributed
from .distributed import (SINGLE, World, any_rank, any_ranks, barrier, batch_rows, check_divisible,
                          check_last_batch, gather_objects, sum_over_ranks, wrap_model)
from .records import MutedRecords, RunRecords, RunResult, snapshot_due
from .rundir import (CorruptFile, DiskFull, Interrupted, RunLock, StopSignals, prepare_run_dir, remove_temp_files,
                     signal_name)  # CorruptFile: re-exported (train() raises it; tests catch it here)
from .schedule import default_device, derived_seed, lr_at, rng_state, seed_all, set_rng_state
from .warmstart import initialise, read_init_weights
from .evaluation import evaluate, load_model, read_metrics, read_run_config  # noqa: F401 (the book imports them here)
from .experiment import resolve_config, run_dir_for
from .provenance import device_name
from .steps import (OOM_ERRORS, CapturedStep, compiled, evaluate_model, make_optimizer, parameter_health,
                    set_group_lr, training_step)

log = logging.getLogger(__name__)

METRIC_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s",
               "epoch_time_s")
class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size to lower."""


# ---------------------------------------------------------------------------------------------
# Configuration, paths, small helpers
# ---------------------------------------------------------------------------------------------
def _progress_enabled(progress: bool) -> bool:
    """Bars only for a terminal or a notebook kernel."""
    if not progress:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    in_kernel = shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    return in_kernel or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Run:
    """State of one training run; :meth:`fit` trains, resumes and writes the run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool,
                 model_factory: Callable | None, world: World = SINGLE):
        self.cfg, self.dir, self.device, self.progress, self.world = cfg, run_dir, device, progress, world
        t = cfg.train
        check_divisible(t.batch_size, world)
        seed_all(t.seed)
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
        check_last_batch(len(data.train), t.batch_size, world)
        if model_factory is None:
            from .models import build_model as model_factory
        self.model_factory = model_factory
        # the attention layers' routes (train.attention_route, shared_route, fused_*): attributes of the model
        self.model = set_routes(model_factory(cfg.model), Routes.from_train(t)).to(device)
        if self._found is not None and not config_diff(self._found[0]["config"], cfg):
            from .prune import fit_heads_to_state  # resuming: the heads the run's checkpoint holds
            fit_heads_to_state(self.model, self._found[0]["model"])
            self.init_record = self._found[0].get("init")
        elif self._found is None and (init_state is not None or t.prune_degenerate_heads):
            self.init_record = initialise(self.model, cfg, self.data, device, init_state, self.init_record or {})
        self.cuda = device.type == "cuda"
        self.bf16 = t.precision == "bf16" and self.cuda
        self.channels_last = t.channels_last and self.cuda
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # several processes (torchrun): SyncBatchNorm and DDP for the training step; evaluation takes the bare model
        self.model, trainer = wrap_model(self.model, world, device, t.step_graph)
        if world.parallel:  # dropout differs between ranks, reproducibly
            torch.manual_seed(derived_seed(t.seed, world.rank, "rank"))
        self.forward = compiled(trainer, t.compile_mode) if t.compile and self.cuda else trainer
        self.evaluated = self.model if world.parallel else self.forward
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.opt = make_optimizer(self.model, t, device)
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
        # run.json, metrics.jsonl, best.pt, atlas.pt: written by rank 0 alone
        self.records = (RunRecords if world.main else MutedRecords)(run_dir, cfg, device, self.data)
        self.processes = {} if not world.parallel else {  # for run.json
            "processes": {"world_size": world.size, "devices": gather_objects(device_name(device), world)}}

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        return {"format": "satconv-checkpoint-1", "config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "sums": dict(self.sums), "aug_state": self.aug_state,
                "rng": rng_state(), "metrics": self.metrics, "best": self.best,
                "best_model": self.best_state if self.best and self.best["epoch"] != self.epoch else None,
                "init": self.init_record}

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` whole, keeping the one before as ``last.prev.pt`` (rank 0, with every rank's random
        state, in a data-parallel run; the others wait for it)."""
        state = self._checkpoint()
        if self.world.parallel:
            state.update(world_size=self.world.size, rng_ranks=gather_objects(rng_state(), self.world))
        if self.world.main:
            self.checkpoints.save(state)
        barrier(self.world)
        self.saved = (self.epoch, self.step)

    def _kept(self) -> str:
        if self.saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.checkpoints.newest} (epoch {self.saved[0]}, step {self.saved[1]}) is kept"

    @property
    def interrupted(self) -> bool:
        """A SIGINT or SIGTERM asked the run to stop (this process; :meth:`halting` asks every rank)."""
        return self.stop.signum is not None

    def halting(self) -> bool:
        """A SIGINT or SIGTERM reached this process or, in a data-parallel run, any rank (a collective call)."""
        return any_rank(self.interrupted, self.world, self.device)

    def _interrupt(self, epoch: int) -> None:
        """Checkpoint where the run stands and raise :class:`Interrupted` naming the signal."""
        self.save_checkpoint()
        signum = self.stop.signum if self.stop.signum is not None else signal.SIGTERM  # another rank's signal
        raise Interrupted(signum, f"stopped by {signal_name(signum)}; checkpoint saved in "
                                            f"{self.checkpoints.newest} (epoch {epoch + 1}, step {self.step}); "
                                            f"run again to resume")

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
        if ck.get("world_size", 1) != self.world.size:
            raise ValueError(f"{path} was written by {ck.get('world_size', 1)} process(es), this run has "
                             f"{self.world.size}: resume with the same number (torchrun --nproc_per_node)")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.epoch, self.step, self.step_in_epoch = ck["epoch"], ck["step"], ck["step_in_epoch"]
        self.sums, self.aug_state, self.metrics, self.best = ck["sums"], ck["aug_state"], ck["metrics"], ck["best"]
        set_rng_state(ck["rng_ranks"][self.world.rank] if self.world.parallel else ck["rng"])
        if not self.world.main:  # the epoch's sums so far are the whole world's, held by rank 0
            self.sums.update(loss=0.0, correct=0, seen=0)
        self.saved = (self.epoch, self.step)
        if self.best is not None:
            self.best_state = ck["best_model"] if ck["best_model"] is not None else ck["model"]
            self.records.save_best(self.best_state, self.best)
        self.records.write_metrics(self.metrics)
        log.info("resumed %s from %s at epoch %d, step %d", self.dir, path.name, self.epoch, self.step)
        return True

    # -- training ------------------------------------------------------------------------------
    def _step_body(self, x: torch.Tensor, y: torch.Tensor):
        """:func:`satconv.steps.training_step` with this run's model, optimiser, precision and label smoothing."""
        return training_step(self.forward, self.opt, x, y, bf16=self.bf16, label_smoothing=self.cfg.train.label_smoothing)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.captured is not None:  # train.step_graph: one replay (the outputs live until the next step)
            self.captured.set_lr(lr)
            return self.captured(x, y)
        set_group_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        return self._step_body(x, y)

    def _check_finite(self, bad: bool, epoch: int) -> None:
        if bad:
            advice = ("a lower train.lr, a longer warm-up (train.warmup_ratio) or train.precision=fp32" if self.bf16
                      else "a lower train.lr or a longer warm-up (train.warmup_ratio)")
            raise NonFiniteLoss(f"the training loss became NaN or Inf in epoch {epoch + 1} (by step {self.step}, "
                                f"lr {self.sums['lr']:.4g}); {parameter_health(self.model)}; the run stopped and "
                                f"{self._kept()}. Try {advice}")

    def _epoch(self, epoch: int, bar, stop_after_steps, save_on_stop) -> bool:
        """Train one epoch from ``self.step_in_epoch``; returns False when stopped early."""
        t = self.cfg.train
        n = len(self.data.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(t.seed, epoch, "order")))
        perm = perm.to(self.data.train.images.device)  # one copy per epoch: batches then index without a host wait
        g = torch.Generator()
        if self.aug_state is not None:
            g.set_state(self.aug_state)
        else:
            g.manual_seed(derived_seed(t.seed, epoch, "augment"))
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
            # this rank's rows of the global batch, augmented as in one process (the whole batch's draws)
            x, y = self.train_loader.batch(idx, g, batch_rows(len(idx), self.world) if self.world.parallel else None)
            lr = lr_at(self.step, self.steps_per_epoch, t)
            loss, hits = self._train_step(x, y, lr)
            self.step += 1
            loss_sum += loss.double() * len(y)
            correct += hits
            seen += len(y)
            bad |= ~torch.isfinite(loss)
            self.sums["lr"] = lr
            last_step = b + 1 == self.steps_per_epoch
            stop = stop_after_steps is not None and self.step == stop_after_steps
            halt = False  # every rank decides at the same steps
            if self.step % sync_every == 0 or last_step or stop or (self.interrupted and not self.world.parallel):
                # one collective asks every rank both questions: a signal, a non-finite loss
                halt, nonfinite = any_ranks([self.interrupted, bool(bad)], self.world, dev)
                self._check_finite(nonfinite, epoch)
                if bar is not None:
                    elapsed = self.sums["time"] + time.perf_counter() - start
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if (stop or halt) and not last_step:
                self.step_in_epoch, self.aug_state = b + 1, g.get_state()
                self._add_sums(loss_sum, correct, seen, start)
                if halt:
                    self._interrupt(epoch)
                if save_on_stop:
                    self.save_checkpoint()
                return False
        if self.cuda:
            torch.cuda.synchronize()
        self._add_sums(loss_sum, correct, seen, start)
        return True

    def _add_sums(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, start: float) -> None:
        """The epoch's sums so far, added over the ranks of a data-parallel run (on every rank)."""
        loss, hits, images = sum_over_ranks([loss_sum.item(), correct.item(), seen], self.world, self.device)
        self.sums.update(loss=loss, correct=int(hits), seen=int(images),
                         time=self.sums["time"] + time.perf_counter() - start)

    def _end_epoch(self, epoch: int, epoch_start: float) -> dict:
        t, s = self.cfg.train, self.sums
        self.phase = "eval"
        row = {"epoch": epoch + 1, "step": self.step, "lr": s["lr"], "train_loss": s["loss"] / s["seen"],
               "train_acc": s["correct"] / s["seen"], "val_loss": None, "val_acc": None,
               "images_per_s": s["seen"] / max(s["time"], 1e-9), "epoch_time_s": 0.0}
        if len(self.data.val):
            row["val_loss"], row["val_acc"] = evaluate_model(self.evaluated, self.val_loader, self.bf16, self.world)
            # a NaN gradient in the epoch's last step leaves a finite loss but broken weights
            self._check_finite(torch.tensor(not math.isfinite(row["val_loss"])), epoch)
        # a whole epoch: data, augmentation, training steps and validation (not the occasional test pass)
        row["epoch_time_s"] = time.perf_counter() - epoch_start
        if (epoch + 1) % t.test_every == 0 or epoch + 1 == t.epochs:
            row["test_loss"], row["test_acc"] = evaluate_model(self.evaluated, self.test_loader, self.bf16,
                                                               self.world)
        if self.cuda:  # peak device memory so far (GiB), for the run report
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.world.parallel:
            row["world_size"] = self.world.size
        self.metrics.append(row)
        if row["val_acc"] is not None and (self.best is None or row["val_acc"] > self.best["val_acc"]):
            self.best = {"epoch": epoch + 1, "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.records.save_best(self.best_state, self.best)
        if t.snapshot_attention and snapshot_due(epoch + 1, t.snapshot_every, t.epochs):
            self.records.save_snapshot(self.model, epoch + 1)
        self.records.append_metrics(row)
        self.epoch, self.step_in_epoch, self.aug_state = epoch + 1, 0, None
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "lr": s["lr"]}
        if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
            self.save_checkpoint()
        self.phase = "train"
        log.info("epoch %d/%d  %s", epoch + 1, t.epochs,
                 "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        return row

    def fit(self, stop_after_steps: int | None = None, save_on_stop: bool = True) -> RunResult:
        """Train (resuming from the run directory's checkpoint) to the end or to ``stop_after_steps``.

        Call while holding the directory's :class:`~satconv.rundir.RunLock`.  SIGINT and SIGTERM stop at the
        next step boundary with a checkpoint (:class:`~satconv.rundir.Interrupted`); ``run.json`` ends
        ``completed``, ``stopped``, ``interrupted`` or ``failed`` (with the error).
        """
        t = self.cfg.train
        if self.world.main:  # only rank 0 writes here: another rank would delete its files half-written
            remove_temp_files(self.dir)
        previous = self.records.previous_status()  # "died": this process holds the lock, so that attempt was killed
        try:
            resumed = self.resume()
        except DiskFull as exc:  # rewriting best.pt or metrics.jsonl
            raise self._disk_full(exc) from exc
        if not resumed:  # a fresh start: drop what an attempt that never checkpointed left behind
            self.records.clear()
        bar = None
        try:
            with self.stop:
                self.records.write_config()
                self._write_run_json(resumed, status="running", previous=previous)
                if self.epoch < t.epochs and _progress_enabled(self.progress):
                    from tqdm.auto import tqdm
                    bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
                if not resumed and t.snapshot_attention:
                    self.phase = "eval"
                    self.records.save_snapshot(self.model, 0)
                    self.phase = "train"
                for epoch in range(self.epoch, t.epochs):
                    if self.halting():  # the signal came during the last epoch's evaluation or checkpoint
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
            error = OutOfMemory(f"{self.device.type.upper()} out of memory ({device_name(self.device)}) at "
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
        self.records.record_end(status, self.model, self.epoch, self.step, self.init_record, **extra)

    def _finish(self) -> dict:
        """Final and best-on-validation numbers, the atlas, run.json."""
        last = self.metrics[-1]
        self.phase = "eval"
        results = {"final": {"epoch": last["epoch"], "val_loss": last["val_loss"], "val_acc": last["val_acc"],
                             "test_loss": last.get("test_loss"), "test_acc": last.get("test_acc")}}
        if self.best is not None:
            if self.best["epoch"] == last["epoch"]:
                results["best"] = dict(results["final"])
            else:
                model = copy.deepcopy(self.model)
                model.load_state_dict(self.best_state)
                loss, acc = evaluate_model(model, self.test_loader, self.bf16, self.world)
                results["best"] = {**self.best, "test_loss": loss, "test_acc": acc}
        self.records.write_atlas(self.model)
        self.phase = "train"
        self._write_run_json(True, status="completed", results=results)
        return results

    def _write_run_json(self, resumed: bool, status: str, **kw) -> None:
        """:meth:`RunRecords.write_run_json` with where the run stands; ``kw``: results, previous, error, signal."""
        self.records.write_run_json(status, self.model, self.epoch, self.step, self.init_record, resumed=resumed,
                                    **self.processes, **kw)


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
        DistributedError (a ValueError): under torchrun, a batch that does not split over the processes, or a
            combination data parallelism cannot run (:func:`satconv.distributed.wrap_model`).

    Started by ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1), it trains one model on N processes, the same
    experiment as one process at the same global batch (:mod:`satconv.distributed`); rank 0 writes the run
    directory and holds its lock, and a resumption needs the same N.
    """
    cfg = resolve_config(cfg, overrides, profile)
    device = torch.device(device) if device is not None else default_device()
    world = distributed.world_from_env()  # several processes under torchrun
    if world.parallel and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    started = distributed.start(world, device)
    try:
        opened = distributed.main_rank_opens(world, lambda: prepare_run_dir(run_dir_for(cfg, out_dir)), RunLock)
        with opened as run_dir:
            run = _Run(cfg, run_dir, device, progress and world.main, model_factory, world)
            return run.fit(stop_after_steps, save_on_stop)
    finally:
        if started:
            distributed.stop()


__all__ = ["train", "evaluate", "read_metrics", "load_model", "read_run_config", "lr_at", "resolve_config",
           "run_dir_for", "RunResult", "NonFiniteLoss", "OutOfMemory", "METRIC_KEYS", "CorruptFile"]

