"""The training step, shared by training and the benchmark: optimizer, compilation and the CUDA-graph step.

- :func:`make_optimizer`: the paper's SGD (momentum, weight decay except on the Gaussian centres and
  spreads, bug B3), one fused kernel on CUDA; :func:`set_group_lr` sets its learning rate.
- :func:`parameter_health`: which parameters a diverged run left non-finite, or its largest ones.
- :func:`training_step`: the one step body (forward under autocast, cross-entropy with label smoothing
  on float32 logits, backward, SGD step) that :mod:`satconv.train` trains with and :mod:`satconv.bench`
  times, so a benchmark's step is a training step.
- :func:`compile_model` / :func:`compiled`: ``torch.compile`` with satconv's inductor options
  (:data:`INDUCTOR_OPTIONS`), static shapes.
- :class:`CapturedStep`: the whole step in one CUDA graph (``train.step_graph``).
- :func:`evaluate_model`: mean loss and accuracy over a loader, in eval mode under ``inference_mode`` (B5).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .distributed import SINGLE, World, sum_over_ranks

if TYPE_CHECKING:
    from .augmentation import DeviceLoader

#: the exceptions a CUDA (or CPU) allocation failure raises
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def set_group_lr(opt: torch.optim.Optimizer, lr) -> None:
    """Give every parameter group of ``opt`` the learning rate ``lr``: a float, or the one-element
    device tensor that a captured training step (:class:`CapturedStep`) reads at each replay.""" 
    for group in opt.param_groups:
        group["lr"] = lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD groups: ``weight_decay`` everywhere except the Gaussian centres and spreads (bug B3).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``.
    """
    from .attention import no_decay_param_groups
    return no_decay_param_groups(model, weight_decay)



def make_optimizer(model: nn.Module, train: TrainConfig, device: torch.device | str) -> torch.optim.SGD:
    """The run's SGD over :func:`param_groups`: ``train.lr``, ``momentum``, ``nesterov``, ``weight_decay``;
    ``fused=True`` on CUDA (one kernel for all parameters, and a device-tensor learning rate for
    :class:`CapturedStep`)."""
    return torch.optim.SGD(param_groups(model, train.weight_decay), lr=train.lr, momentum=train.momentum,
                           nesterov=train.nesterov, fused=torch.device(device).type == "cuda")


def parameter_health(model: nn.Module, show: int = 3) -> str:
    """A one-line account of a model's parameters, for the error of a run whose loss became NaN or Inf.

    Args:
        model: the module being trained (a data-parallel wrapper's names start with ``module.``).
        show: how many parameter names to list.

    Returns:
        ``"non-finite parameters (k of n): a, b, c, ..."`` when some parameter holds a NaN or an Inf (the step
        that met the bad loss has usually spread it), else ``"every parameter is finite; largest |value|:
        a 12.3, b 4.56, c 1.2"``, names in :meth:`~torch.nn.Module.named_parameters` order among equals.
    """
    if show < 1:
        raise ValueError(f"show must be at least 1, got {show}")
    bad, sizes = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if not bool(torch.isfinite(p).all()):
                bad.append(name)
            else:
                sizes.append((float(p.abs().max()), name))
    if bad:
        more = ", ..." if len(bad) > show else ""
        return f"non-finite parameters ({len(bad)} of {len(bad) + len(sizes)}): {', '.join(bad[:show])}{more}"
    top = sorted(sizes, key=lambda t: -t[0])[:show]
    return "every parameter is finite; largest |value|: " + ", ".join(f"{name} {v:.3g}" for v, name in top)


def training_step(forward: Callable, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                  bf16: bool = False, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch whose gradients are already ``None`` (no host synchronisation).

    Forward under ``torch.autocast`` to bfloat16 when ``bf16``, cross-entropy with ``label_smoothing`` on
    the logits cast to float32, ``backward()`` and ``opt.step()``.  Training (:mod:`satconv.train`) and the
    benchmark (:mod:`satconv.bench`) both run this body, so they time and train the same step.

    Args:
        forward: ``(B, C, H, W) -> (B, classes)`` (the model, or its compiled callable).
        opt: the optimiser over the model's parameters.
        x: ``(B, C, H, W)`` normalised images.
        y: ``(B,)`` class indices.
        bf16: autocast the forward pass to bfloat16 (on ``x``'s device type).
        label_smoothing: ``train.label_smoothing``.

    Returns:
        ``(loss, correct)``: the batch's mean loss (float32 scalar, detached) and the number of correct
        predictions (int64 scalar), both on the device.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


# ---------------------------------------------------------------------------------------------
# Compilation
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


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_model(model: nn.Module, loader: DeviceLoader, bf16: bool = False,
                   world: World = SINGLE) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over a loader, in eval mode.

    Args:
        model: ``(B, 3, H, W) -> (B, classes)``; its train/eval mode is restored afterwards.
        loader: unaugmented batches.
        bf16: autocast to bfloat16 (CUDA).
        world: in a data-parallel run (:mod:`satconv.distributed`) rank ``r`` of ``N`` evaluates the batches
            ``r, r + N, ...`` and the sums are added over the ranks: every rank returns the whole split's numbers.
    """
    was_training = model.training
    model.eval()
    device = loader.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # no autograd graph: without this the running sums would keep every batch's graph alive (B5)
    with torch.inference_mode():
        for x, y in loader.batches(world.rank, world.size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = max(1, len(loader.split))
    total_loss, total_correct = sum_over_ranks([loss.item(), correct.item()], world, device)
    return total_loss / n, total_correct / n



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
