"""Start a training run on several processes from Python: the notebook route to ``torchrun`` (issue 21).

``papermill chapters/train.ipynb out.ipynb -p processes 4 ...`` trains through :func:`train_processes`, which runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m satconv train ...`` (:mod:`satconv.distributed`
says what the N processes do), streams its output, forwards SIGINT and SIGTERM to it (the ranks checkpoint and
stop; the same call resumes) and returns the run as :func:`satconv.train.train` would.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .config import REPO_ROOT, resolve_path
from .distributed import World, check_divisible
from .evaluation import read_metrics, read_run_info
from .experiment import resolve_config, run_dir_for
from .records import RunResult
from .rundir import Interrupted, StopSignals


class LaunchFailed(RuntimeError):
    """The torchrun job ended with an error; the message holds the end of its output."""


def torchrun_command(config, overrides=(), profile: str | None = None, out_dir=None, processes: int = 2,
                     device: str | None = None) -> list[str]:
    """The command line that trains ``config`` on ``processes`` local processes (one per GPU on a CUDA machine).

    Args:
        config: a config file (as :func:`satconv.config.resolve_path` finds it).
        overrides: ``"a.b=value"`` strings.
        profile: a named overlay such as ``"quick"``.
        out_dir: the run directory (``None``: ``train.out_dir`` or ``runs/<name>``).
        processes: how many processes, >= 2.
        device: ``"cpu"`` or ``"cuda"`` (``None``: CUDA when available; each rank takes its own GPU).

    Raises:
        ValueError: fewer than 2 processes; ConfigError for a bad config or override;
            :class:`~satconv.distributed.DistributedError` for a batch that does not split over them.
    """
    if processes < 2:
        raise ValueError(f"processes={processes}: a torchrun job needs at least 2 (one process: satconv.train.train)")
    cfg = resolve_config(resolve_path(config), list(overrides), profile)
    check_divisible(cfg.train.batch_size, World(0, processes))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "satconv", "train", "--config", str(resolve_path(config)), "--out", str(run_dir_for(cfg, out_dir)),
           "--no-progress"]
    cmd += ["--profile", profile] if profile else []
    cmd += ["--device", device] if device else []
    return cmd + [a for kv in overrides for a in ("--set", kv)]


def train_processes(config, overrides=(), profile: str | None = None, out_dir=None, processes: int = 2,
                    device: str | None = None, poll: float = 0.2) -> RunResult:
    """Train (or resume) a run on ``processes`` processes through torchrun (:func:`torchrun_command`), printing
    its output as it comes.

    Returns:
        :class:`~satconv.records.RunResult` read from the run directory (``results`` from ``run.json``).

    Raises:
        LaunchFailed: the job exited with an error (the end of its output is in the message).
        Interrupted: SIGINT or SIGTERM reached this process; it was passed on to the job, which checkpointed.
    """
    cmd = torchrun_command(config, overrides, profile, out_dir, processes, device)
    run_dir = Path(cmd[cmd.index("--out") + 1])
    tail: deque[str] = deque(maxlen=40)

    def relay(stream) -> None:  # the job's output, line by line, while the main thread watches for signals
        for line in stream:
            print(line, end="", flush=True)
            tail.append(line)

    with StopSignals() as stop:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        reader = threading.Thread(target=relay, args=(proc.stdout,), daemon=True)
        reader.start()
        forwarded = False
        while proc.poll() is None:
            if stop.signum is not None and not forwarded:
                proc.send_signal(stop.signum)  # torchrun passes it to every rank, which checkpoints and stops
                forwarded = True
            time.sleep(poll)
        code = proc.wait()
        reader.join(timeout=10)
    if stop.signum is not None:
        raise Interrupted(stop.signum, f"the torchrun job was stopped (exit {code}); run again to resume")
    if code != 0:
        raise LaunchFailed(f"the torchrun job exited with {code}:\n{''.join(tail)}")
    info = read_run_info(run_dir)
    cfg = resolve_config(run_dir / "config.yaml")
    return RunResult(run_dir, cfg, read_metrics(run_dir), info.get("results") or {}, info.get("status") == "completed")


__all__ = ["torchrun_command", "train_processes", "LaunchFailed"]
