"""Memory of a training step: the activations autograd keeps, and the largest batch that fits.

- :func:`saved_activation_bytes`: bytes saved for the backward pass, per image and fixed, counted on the
  CPU (eager, or inductor's partition of a compiled model);
- :func:`largest_batch`: the largest training batch that fits on a CUDA device (doubling, then bisection).

Peak memory while timing (``peak_mem_gib``) is recorded by :func:`satconv.bench.throughput.bench_model`.
"""
from __future__ import annotations

import contextlib
import gc

import torch

from ..config import ExperimentConfig
from ..provenance import device_name, resolve_device
from ..steps import compile_model
from .harness import GIB, is_oom, make_train_step, random_batch, resolve_precision, train_setup


def saved_activation_bytes(model: torch.nn.Module, image_size: int = 32, batch: int = 2, explicit: bool = False,
                           bf16: bool = True, compile: bool = False) -> tuple[float, float]:
    """Bytes autograd keeps for the backward pass of a training forward pass: per image, and fixed.

    Counted on the CPU with ``torch.autograd.graph.saved_tensors_hooks``: each storage that a saved
    tensor views is counted once, whole (views of one tensor share it).  Two batches, ``batch`` and
    ``2 * batch``, separate what grows with the batch (the activations) from what does not (weights
    and products of weights, such as the folded query-key matrices).  Eager, this is what the code
    asks autograd to keep; with ``compile`` it is what inductor's partition of the forward and backward
    graphs keeps (it recomputes cheap element-wise work; one CPU compilation per batch size).

    Args:
        model: ``images (B, 3, image_size, image_size) -> logits``, on the CPU, in training mode (restored).
        image_size: input side.
        batch: the smaller of the two batches (>= 1).
        explicit: count the explicit route (:data:`satconv.attention.routes.EXPLICIT`) instead of the fast paths.
        bf16: under bf16 CPU autocast (the dtypes of a bf16 GPU run).
        compile: count the ``torch.compile(model, dynamic=False)`` graphs (on the CPU).

    Returns:
        ``(bytes_per_image, fixed_bytes)``.

    Raises:
        ValueError: ``batch < 1``.
    """
    from ..attention.routes import EXPLICIT, using_routes
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    was_training = model.training
    model.train()
    run = model
    if compile:
        run = compile_model(model)

    def total(b: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return t
        x = torch.randn(b, 3, image_size, image_size)
        with using_routes(model, EXPLICIT) if explicit else contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(x)
        del out
        return sum(storages.values())

    try:
        small, large = total(batch), total(2 * batch)
    finally:
        model.train(was_training)
    per_image = (large - small) / batch
    return per_image, small - per_image * batch


def largest_batch(cfg: ExperimentConfig, device=None, precision: str | None = None, start: int = 100,
                  limit_gib: float | None = None, max_batch: int = 1 << 16, channels_last: bool = False) -> int:
    """Largest training batch that fits: double from ``start`` until a step fails, then bisect.

    A batch fits when two eager training steps run without CUDA OOM and, if ``limit_gib`` is given,
    their peak allocated memory stays below it.  The search runs eager (``torch.compile`` usually
    needs less memory, so the answer is conservative for compiled runs).

    Args:
        cfg: the experiment config.
        device: CUDA device; on CPU ``start`` is returned unchanged.
        precision: as in :func:`satconv.bench.throughput.bench_model`.
        start: first batch tried.
        limit_gib: optional memory cap in GiB.
        max_batch: stop doubling here.
        channels_last: model and input in ``torch.channels_last``.

    Returns:
        The largest fitting batch (exact, not rounded).

    Raises:
        ValueError: ``start < 1``.
        RuntimeError: not even batch 1 fits.
    """
    device = resolve_device(device)
    if device.type != "cuda":
        return start
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    precision = resolve_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model, run, opt = train_setup(cfg, device, precision, channels_last, compile=False)
    model.train()

    def fits(b: int) -> bool:
        ok = True
        try:
            x, y = random_batch(cfg, b, device, channels_last)
            step = make_train_step(run, opt, x, y, device, precision, cfg.train)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            step()
            torch.cuda.synchronize(device)
            if limit_gib is not None and torch.cuda.max_memory_allocated(device) > limit_gib * GIB:
                ok = False
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(exc):
                raise
            ok = False
        x = y = step = None
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    prev_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        lo, hi, b = 0, None, min(start, max_batch)
        while True:
            if fits(b):
                lo = b
                if b >= max_batch:
                    break
                b = min(2 * b, max_batch)
            else:
                hi = b
                break
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
    finally:
        torch.backends.cudnn.benchmark = prev_benchmark
        model = run = opt = None  # release the model before emptying the cache
        gc.collect()
        torch.cuda.empty_cache()
    if lo < 1:
        raise RuntimeError(f"{cfg.name}: not even batch 1 fits on {device_name(device)}")
    return lo


__all__ = ["saved_activation_bytes", "largest_batch"]
