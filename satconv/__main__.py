"""Command line: ``python -m satconv {train,eval,bench}``.

    python -m satconv train --config configs/paper_quadratic.yaml [--out DIR] [--profile quick]
                            [--set train.epochs=2 --set data.source=imagefolder ...]
    python -m satconv eval --run runs/paper_quadratic [--split test|val] [--weights best|last]
    python -m satconv bench ...        (satconv.bench, also python -m satconv.bench ...)

Exit codes: 0 success, 1 the run failed (NaN loss, out of memory, unreadable data or checkpoint, disk full),
2 bad arguments or config (with a usage message) or a run directory another process is writing, 130 (SIGINT)
or 143 (SIGTERM) interrupted (a checkpoint was written; run again to resume).
``SATCONV_DATA_ROOT`` replaces the config file's ``data.root``; ``--set data.root=DIR`` wins over both.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

EPILOG = ("--set takes any dotted config key, e.g. --set train.epochs=2 --set data.source=imagefolder "
          "--set data.root=DIR (command line over environment over file: --set data.root beats SATCONV_DATA_ROOT, which beats the file). A directory holding last.pt is resumed.")


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from .config import PROFILES

    p = argparse.ArgumentParser(prog="python -m satconv", description="satconv: train, evaluate and time the "
                                "models of 'On the Relationship between Self-Attention and Convolutional Layers'.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,bench}")
    t = sub.add_parser("train", help="train (or resume) a run from a YAML config", epilog=EPILOG,
                       description="Train a model from a YAML config; resumes when the run directory holds last.pt.")
    t.add_argument("--config", required=True, metavar="YAML", help="config file (relative to here or the repo root)")
    t.add_argument("--out", metavar="DIR", help="run directory (default: train.out_dir or runs/<name>)")
    t.add_argument("--profile", choices=sorted(PROFILES),
                   help="overlay that shrinks the config (quick: < 1 min on CPU)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (repeatable)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("-v", "--verbose", action="store_true", help="log every epoch; tracebacks on errors")
    e = sub.add_parser("eval", help="evaluate a run's weights", description="Evaluate a run's best or last weights.")
    e.add_argument("--run", required=True, metavar="DIR", help="run directory (holds config.yaml and *.pt)")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--weights", choices=["best", "last"], default="best",
                   help="best: best validation accuracy (default); last: the final weights")
    e.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    sub.add_parser("bench", help="timing benchmarks (satconv.bench; see python -m satconv bench --help)",
                   add_help=False)
    return p, {"train": t, "eval": e}


def _device(parser: argparse.ArgumentParser, name: str | None):
    import torch
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")
    return device


def _bench(argv: list[str]) -> int:
    try:
        from .bench.cli import bench_main
    except ImportError as exc:
        missing = exc.name in ("satconv.bench", "satconv.bench.cli")
        why = "is not part of this installation" if missing else f"cannot be imported ({exc})"
        print(f"python -m satconv bench: error: satconv.bench {why}; the bench command needs it", file=sys.stderr)
        return 2
    return int(bench_main(argv) or 0)


def _train(args, parser) -> int:
    from .config import ConfigError
    from .data import DataError
    from .rundir import RunDirBusy, RunDirError
    from .experiment import resolve_config
    from .train import NonFiniteLoss, OutOfMemory, train

    try:
        cfg = resolve_config(args.config, args.overrides, args.profile)
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    device = _device(parser, args.device)
    try:
        result = train(cfg, out_dir=args.out, device=device, progress=not args.no_progress)
    except KeyboardInterrupt as exc:  # train's own names its checkpoint; a bare one came before training began
        print(f"satconv: {str(exc) or _interrupted_at_start_up(cfg, args.out)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except RunDirBusy as exc:
        print(f"satconv: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, OutOfMemory, DataError, RunDirError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"satconv: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a config the data or the model cannot satisfy, or a resume mismatch
        if args.verbose:
            traceback.print_exc()
        parser.error(str(exc))
    print(f"run: {result.run_dir}")
    for which, r in result.results.items():
        nums = "  ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float))
        print(f"{which} (epoch {r['epoch']}): {nums}")
    return 0


def _interrupted_at_start_up(cfg=None, out: str | None = None) -> str:
    """What a Ctrl-C before training began (loading the config or data, building the model) left behind.

    Args:
        cfg: the resolved config, or ``None`` when the interrupt came before it was read.
        out: the ``--out`` argument.
    """
    if cfg is None:
        return "interrupted during start-up; nothing was written"
    try:
        from .experiment import run_dir_for
        last = run_dir_for(cfg, out) / "last.pt"
        resumable = last.is_file()
    except Exception:  # noqa: BLE001 -- only the wording depends on it
        resumable = False
    if resumable:
        return f"interrupted during start-up; {last} is as the previous attempt left it: run again to resume"
    return "interrupted during start-up; nothing to resume"


def _eval(args, parser) -> int:
    from .data import DataError
    from .rundir import RunDirError
    from .evaluation import evaluate

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        parser.error(f"--run {run}: not a run directory (no config.yaml)")
    device = _device(parser, args.device)
    try:
        result = evaluate(run, args.split, args.weights, device)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    except (DataError, RunDirError) as exc:
        print(f"satconv: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argument errors exit 2 via argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        parser, subs = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("a command is required: train, eval or bench")
        logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                            format="%(message)s")
        return (_train if args.command == "train" else _eval)(args, subs[args.command])
    except KeyboardInterrupt as exc:  # Ctrl-C outside a training run: importing torch, reading the config, bench
        command = argv[0] if argv else None
        what = {"train": _interrupted_at_start_up(),
                "bench": "interrupted; the rows printed so far are complete"}
        print(f"satconv: {str(exc) or what.get(command, 'interrupted')}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)


if __name__ == "__main__":
    sys.exit(main())
