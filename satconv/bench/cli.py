"""The ``bench`` command: ``python -m satconv bench ...`` or ``python -m satconv.bench ...``.

:func:`build_parser` holds its options, :func:`bench_main` runs it: one JSON line per (config, batch[,
side]) on stdout, also appended to ``--out`` (:func:`append_jsonl`).  Every argument is checked before
anything is benchmarked (bad ones exit 2 with the usage).  Modes: plain rows
(:func:`satconv.bench.throughput.bench_batch`), ``--sides`` (:func:`satconv.bench.throughput.scaling`),
``--epoch`` (:func:`satconv.bench.throughput.epoch_timing`), ``--ddp`` (:func:`satconv.bench.ddp.ddp_scaling`),
``--kernels`` (:func:`satconv.bench.kernels.kernel_breakdown`) and ``--fused-launch``
(:func:`satconv.bench.fused_launch.fused_launch_sweep`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .. import config as cfgmod
from ..config import ExperimentConfig
from ..provenance import resolve_device
from ..distributed import DistributedError
from .ddp import ddp_scaling
from .fused_launch import fused_launch_sweep
from .harness import first_line, is_oom, step_graph_conflict
from .kernels import kernel_breakdown
from .throughput import bench_batch, epoch_timing, image_side_rule, oom_row, scaling, with_image_side


# ---------------------------------------------------------------------------------------------
# Argument types and checks
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_arg(text: str):
    if text == "max":
        return "max"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'max', got {text!r}") from None


def append_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Append rows (JSON-ready dicts, one line each) to a JSON-lines file by atomically rewriting it
    (temp file + ``os.replace``); missing folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    text = old + "".join(json.dumps(r) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def out_problem(out: str) -> str | None:
    """Why rows cannot be appended to ``out``, tried before any benchmark runs.

    :func:`append_jsonl` creates the missing folders and replaces the file through a temporary file
    beside it, so the nearest existing folder must take a new file (a probe file is made and removed).

    Returns:
        ``None`` when they can, else a one-line reason.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        return f"{path} is a directory; --out takes a .jsonl file"
    if path.exists() and not os.access(path, os.R_OK):
        return f"{path} cannot be read (rows are appended to what it holds)"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".satconv-bench-", suffix=".probe")
    except OSError as exc:
        return f"cannot create a file in {folder} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def _image_folder_problem(data: str) -> str | None:
    """Why ``data`` is not an image-folder root (``None``: it has ``train/`` and ``test/`` folders)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        return "no such directory" if not root.exists() else "not a directory"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            return f"no {split}/ folder in it"
    return None


def _check_sides(parser: argparse.ArgumentParser, path: str, cfg: ExperimentConfig, sides) -> None:
    """Refuse (exit 2) an image side ``cfg``'s network cannot take, before anything is benchmarked."""
    step, minimum, why = image_side_rule(cfg)
    for side in sides:
        if side % step or side < minimum:
            allowed = f"multiples of {step}" if step > 1 else f"sides >= {minimum}"
            parser.error(f"--sides {side}: {path} cannot take images of side {side} ({why}); allowed: {allowed}")
        try:
            with_image_side(cfg, side)
        except cfgmod.ConfigError as exc:
            parser.error(f"--sides {side}: {path} cannot take images of side {side}: {exc.key}: got {exc.value!r}; "
                         f"{exc.allowed}")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` command's argument parser (``prog`` is ``python -m satconv bench``)."""
    p = argparse.ArgumentParser(
        prog="python -m satconv bench",
        description="Time training, evaluation and batch-1 latency of one or more configs on random "
                    "CIFAR-shaped input; one JSON line per (config, batch[, side]) on stdout.")
    p.add_argument("--config", nargs="+", required=True, help="YAML config files")
    p.add_argument("--batch", nargs="+", type=_batch_arg, default=[100],
                   help="batch sizes; 'max' = the largest training batch that fits (CUDA)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU (CPU always runs fp32)")
    p.add_argument("--compile", nargs="?", const="default", default=False,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the model, optionally naming the mode (CUDA graphs: reduce-overhead, "
                        "max-autotune)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--warmup", type=_positive_int, default=5, help="untimed steps per phase (>= 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per phase (>= 3)")
    p.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default=None, help="config profile overlay")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--sides", nargs="+", type=_positive_int, default=None,
                   help="scaling mode: bench at these image sides (e.g. 16 32 64)")
    p.add_argument("--out", default=None, help="also append the rows to this .jsonl file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--no-gemm-peak", action="store_true", help="skip the 8192^3 GEMM used for mfu_measured")
    p.add_argument("--train-only", action="store_true",
                   help="time the training step only (no evaluation pass or batch-1 latency, each of which "
                        "compiles the model again)")
    p.add_argument("--epoch", action="store_true",
                   help="time whole training epochs (data, augmentation, step, validation) against the model alone, "
                        "at the config's batch size")
    p.add_argument("--data", default=None, help="with --epoch: an image-folder root (default: generated images)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="with --epoch: epochs to train (>= 2)")
    p.add_argument("--no-fused-forward", action="store_true",
                   help="run the folded attention's forward softmax and dropout as inductor's kernels, not the "
                        "fused Triton kernel (as --set train.fused_forward=false; rows record fused_forward)")
    p.add_argument("--no-fused-backward", action="store_true",
                   help="the same for the backward pass (train.fused_backward=false; rows record fused_backward)")
    p.add_argument("--fused-launch", action="store_true",
                   help="instead of timing models: time the fused softmax-dropout kernels at every launch shape "
                        "(rows per program x warps) on the configs' attention sizes (CUDA; --batch takes sizes)")
    p.add_argument("--ddp", nargs="+", type=_positive_int, default=None, metavar="N",
                   help="instead of the usual rows: the training step on N processes through torchrun (DDP), "
                        "the global --batch split over them, for each N; images/s and the efficiency against N=1 "
                        "(satconv.bench.ddp; one config, one batch size)")
    p.add_argument("--kernels", action="store_true",
                   help="instead of timing: profile 3 training steps and split their kernel time by category "
                        "(satconv.bench.kernels; --batch takes sizes, not 'max')")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """``python -m satconv bench ...``: parse ``argv``, bench every (config, batch[, side]).

    Prints one JSON line per row to stdout (and appends them to ``--out``).  Bad arguments print
    the usage and exit with status 2 (``SystemExit``).  ``--no-fused-forward`` and ``--no-fused-backward``
    hold for the whole command.

    Returns:
        0, or 1 if some row ran out of memory.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fused_launch and (args.no_fused_forward or args.no_fused_backward):
        parser.error("--fused-launch times the fused kernels: it takes no --no-fused-forward or --no-fused-backward")
    # the fused kernels are config keys (train.fused_forward/backward), set on every config's model when built
    args.set = [*args.set, *(["train.fused_forward=false"] if args.no_fused_forward else []),
                *(["train.fused_backward=false"] if args.no_fused_backward else [])]
    return _bench(parser, args)


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3, got {args.repeats}")
    if args.epoch and args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: --epoch trains at least 2 epochs (the first absorbs warm-up and "
                     f"compilation; the last is timed)")
    if args.data is not None:
        if not args.epoch:
            parser.error("--data applies only with --epoch (whole-epoch timing on an image folder)")
        problem = _image_folder_problem(args.data)
        if problem:
            parser.error(f"--data {args.data}: {problem}; expected an image-folder root laid out as "
                         f"DIR/train/<class>/*.jpg|png and DIR/test/<class>/*.jpg|png")
    if args.out is not None:
        problem = out_problem(args.out)
        if problem:
            parser.error(f"--out {args.out}: cannot write the rows there: {problem}")
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    configs = []
    for path in args.config:
        try:
            configs.append(cfgmod.load(path, args.set, args.profile))
        except (FileNotFoundError, cfgmod.ConfigError) as exc:
            parser.error(str(exc))
        conflict = step_graph_conflict(configs[-1], args.compile)
        if conflict:
            parser.error(f"{path}: {conflict}")
        if args.sides:
            _check_sides(parser, path, configs[-1], args.sides)
    kw = dict(device=device, precision=args.precision, compile=args.compile, warmup=args.warmup,
              repeats=args.repeats, channels_last=args.channels_last, measure_peak=not args.no_gemm_peak,
              train_only=args.train_only)
    status = 0
    if args.ddp:
        if len(args.config) != 1 or len(args.batch) != 1 or "max" in args.batch or args.sides or args.epoch \
                or args.kernels or args.fused_launch or args.compile:
            parser.error("--ddp takes one config, one batch size, and no --sides, --epoch, --kernels, "
                         "--fused-launch or --compile")
        try:
            rows = ddp_scaling(args.config[0], args.ddp, args.batch[0], args.warmup, args.repeats, args.precision,
                               device.type, args.set, args.profile)
        except DistributedError as exc:
            parser.error(str(exc))
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.out is not None:
            append_jsonl(args.out, rows)
        return 0
    if args.fused_launch:
        if "max" in args.batch or args.sides or args.epoch or args.kernels:
            parser.error("--fused-launch takes fixed batch sizes and no --sides, --epoch or --kernels")
        if device.type != "cuda":
            parser.error("--fused-launch times Triton kernels on a CUDA device")
        for cfg in configs:
            for batch in args.batch:
                rows = fused_launch_sweep(cfg, batch=batch, device=device, precision=args.precision,
                                          warmup=args.warmup, repeats=args.repeats)
                for row in rows:
                    print(json.dumps(row), flush=True)
                if args.out:
                    append_jsonl(args.out, rows)
        return status
    if args.kernels:  # where a training step's time goes, by kernel category
        if "max" in args.batch or args.sides or args.epoch:
            parser.error("--kernels takes fixed batch sizes and no --sides or --epoch")
        for cfg in configs:
            for batch in args.batch:
                row = kernel_breakdown(cfg, batch=batch, device=device, precision=args.precision,
                                       compile=args.compile, channels_last=args.channels_last, warmup=args.warmup)
                print(json.dumps(row), flush=True)
                if args.out:
                    append_jsonl(args.out, [row])
        return status
    if args.epoch:  # whole epochs against the model alone, at each config's own batch size
        for cfg in configs:
            row = epoch_timing(cfg, data=args.data, epochs=args.epochs, **kw)
            print(json.dumps(row), flush=True)
            if args.out:
                append_jsonl(args.out, [row])
        return status
    for cfg in configs:
        for batch in args.batch:
            if args.sides:
                rows = scaling(cfg, args.sides, batch=batch, **kw)
            else:
                try:
                    rows = [bench_batch(cfg, batch, **kw)]
                except RuntimeError as exc:
                    if not is_oom(exc):
                        raise
                    rows = [oom_row(cfg, batch, device, detail=first_line(exc, 400))]
            for row in rows:
                if batch == "max":
                    row["batch_mode"] = "max"
                status |= int("error" in row)
                print(json.dumps(row), flush=True)
            if args.out:
                append_jsonl(args.out, rows)
    return status


__all__ = ["append_jsonl", "out_problem", "build_parser", "bench_main"]


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
