"""The reproduction campaign: configs trained one after another on a GPU machine, detached and resumable.

    python -m satconv.campaign run --data DIR --out runs/gpu [--overrides "..."] [--dry-run] SPEC [SPEC ...]
    python -m satconv.campaign status --out runs/gpu
    python -m satconv.campaign pack --out runs/gpu [--max-mib 60] [--part-mib 15] ARCHIVE.tar.gz
    python -m satconv.campaign install [--out book/runs] [--replace] ARCHIVE.tar.gz   (on the laptop)

``pack`` cuts an archive over ``--part-mib`` into ``ARCHIVE.tar.gz.partNN`` plus the manifest
``ARCHIVE.tar.gz.parts`` (a GPU call returns files of at most 16 MiB); ``install`` takes ``ARCHIVE.tar.gz``
either way, with its parts and manifest beside it (both in :mod:`satconv.transfer`).

A SPEC is ``config:seed:epochs[:key=value,key=value]`` (``configs/<config>.yaml``), the run
``<config>_e<epochs>_s<seed>``, with the spec's own overrides appended (:func:`override_slug`): papermill
executes ``chapters/train.ipynb`` into ``<out>/<name>.ipynb``, the run directory ``<out>/<name>/``, logging to
``<out>/<name>.log``.  Every spec (config, seed, epochs, overrides) and ``--data`` is checked before anything
starts; one run at a time, one runner per ``--out``; ``--processes N`` trains each run on N GPUs (torchrun).
A completed run is skipped; a directory holding a checkpoint resumes.  A finished run loses its
checkpoints (``atlas.pt`` and ``snapshots/`` stay) and its notebook's jupytext metadata, and its page
gets the run's title.  SIGINT/SIGTERM go to the training kernel first (it checkpoints at its next step),
then stop papermill; the same ``run`` command resumes.  ``--profile quick --data synthetic`` is for CPU
smoke runs (the tests) only.  On the GPU machine, start it detached and follow it with ``status``:
``setsid nohup python -m satconv.campaign run ... > runs/gpu/campaign.out 2>&1 &``.

Exit codes: 0 done; 1 a run failed (the later specs still ran); 2 bad arguments or a refusal;
130/143 stopped by SIGINT/SIGTERM (``kill <runner pid>``; rerun to resume).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT
from .transfer import KEPT_PT, TransferError, install, pack

DEFAULT_OVERRIDES = "train.precision=bf16 train.compile=true train.eval_batch_size=100"
KILL_AFTER = 10.0  # seconds between SIGTERM and SIGKILL when a stopped run outlives its grace
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class CampaignError(ValueError):
    """A bad spec or argument, or a refusal; the command line prints it and exits 2."""


@dataclass(frozen=True)
class Spec:
    """One run: ``configs/<config>.yaml`` with this seed, number of epochs and extra overrides."""

    config: str
    seed: int
    epochs: int
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``<config>_e<epochs>_s<seed>[_<overrides>]``: the run's notebook, log and directory name.

        A spec's own overrides are part of the name (``data.val_size=0`` gives ``..._val_size-0``), so that a
        variant never lands in the folder of the plain run; overrides too long for a name give ``_x<hash>``.
        """
        return f"{self.config}_e{self.epochs}_s{self.seed}" + (f"_{override_slug(self.extra)}" if self.extra else "")

    @property
    def text(self) -> str:
        """The spec as written on the command line, ``config:seed:epochs[:key=value,...]`` (:func:`parse_spec`'s
        input)."""
        return f"{self.config}:{self.seed}:{self.epochs}" + (":" + ",".join(self.extra) if self.extra else "")

    def overrides(self, common: str = "") -> list[str]:
        """The run's dotted overrides: ``common``, then seed and epochs, then the spec's own."""
        return [*common.split(), f"train.seed={self.seed}", f"train.epochs={self.epochs}", *self.extra]


def override_slug(overrides: tuple[str, ...] | list[str], max_len: int = 40) -> str:
    """A file-name part for dotted ``key=value`` overrides: each as ``<last key part>-<value>``, joined by ``_``,
    characters other than letters, digits, ``_``, ``.`` and ``-`` replaced by ``-``; longer than ``max_len``:
    ``x`` and 10 hex digits of their SHA-1 (stable across machines)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{key.rpartition('.')[2]}-{value}"))
    slug = "_".join(parts)
    if len(slug) > max_len:
        slug = "x" + hashlib.sha1(",".join(overrides).encode()).hexdigest()[:10]
    return slug


def parse_spec(text: str) -> Spec:
    """Parse ``config:seed:epochs[:key=value,...]``; raises :class:`CampaignError` saying what is wrong."""
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise CampaignError(f"bad spec {text!r}: expected config:seed:epochs[:key=value,key=value]")
    config, seed, epochs = parts[:3]
    if not re.fullmatch(r"[\w.-]+", config) or not (REPO_ROOT / "configs" / f"{config}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
        raise CampaignError(f"bad spec {text!r}: no config configs/{config}.yaml (known: {known})")
    if not re.fullmatch(r"[0-9]+", seed):
        raise CampaignError(f"bad spec {text!r}: the seed {seed!r} is not a non-negative integer")
    if not re.fullmatch(r"[0-9]+", epochs) or int(epochs) < 1:
        raise CampaignError(f"bad spec {text!r}: the epochs {epochs!r} are not a positive integer")
    extra = tuple(e.strip() for e in parts[3].split(",") if e.strip()) if len(parts) == 4 else ()
    for e in extra:
        key, eq, _ = e.partition("=")
        if not eq or not _KEY.fullmatch(key) or key in ("train.seed", "train.epochs"):
            raise CampaignError(f"bad spec {text!r}: {e!r} is not a dotted key=value override "
                                f"(other than train.seed and train.epochs, the spec's own fields)")
    return Spec(config, int(seed), int(epochs), extra)


def validate(texts: list[str], data: str, common: str = "", profile: str = "", processes: int = 1) -> list[Spec]:
    """Parse the specs and load each config with all its overrides and ``data`` as the notebook will (its batch
    split over ``processes``); raises :class:`CampaignError` at the first problem, so that nothing starts unless
    everything can."""
    from .config import ConfigError, load
    from .distributed import World, check_divisible

    import importlib.util

    if importlib.util.find_spec("papermill") is None or not (REPO_ROOT / "chapters" / "train.ipynb").is_file():
        raise CampaignError(f"{sys.executable} cannot import papermill, or chapters/train.ipynb is missing")
    if data not in ("", "synthetic") and not Path(data).is_dir():
        raise CampaignError(f"--data {data}: no such directory (an image-folder root, or 'synthetic')")
    sets = (["data.source=synthetic"] if data == "synthetic" else
            ["data.source=imagefolder", f"data.root={data}"] if data else [])
    specs, seen = [parse_spec(t) for t in texts], {}
    for text, spec in zip(texts, specs):
        if spec.name in seen:
            raise CampaignError(f"the specs {seen[spec.name]!r} and {text!r} are both the run {spec.name}")
        seen[spec.name] = text
        if processes < 1:
            raise CampaignError(f"--processes {processes}: need at least 1")
        try:
            cfg = load(REPO_ROOT / "configs" / f"{spec.config}.yaml", spec.overrides(common) + sets, profile or None)
            check_divisible(cfg.train.batch_size, World(0, processes))
        except (ConfigError, ValueError) as exc:
            raise CampaignError(f"spec {text!r}: {exc}") from None
    return specs


def papermill_command(spec: Spec, out: Path, data: str, common: str = "", profile: str = "",
                      processes: int = 1) -> list[str]:
    """The papermill command of one run (to run in the repository root); ``processes`` > 1: the notebook trains
    through torchrun on that many processes (one per GPU)."""
    return [sys.executable, "-m", "papermill", "--log-output", "chapters/train.ipynb", str(out / f"{spec.name}.ipynb"),
            "-k", "python3", "-p", "config", f"configs/{spec.config}.yaml", "-r", "profile", profile, "-r", "data",
            data, "-r", "output_dir", str(out / spec.name), "-r", "overrides", " ".join(spec.overrides(common))] + (
        ["-p", "processes", str(processes)] if processes > 1 else [])


def run_state(out: Path, spec: Spec) -> str:
    """``busy`` (a live process holds the run directory), ``done`` (completed, and papermill recorded no
    exception in the notebook), ``resume`` (a checkpoint), ``stale`` (completed but the notebook is missing
    or failed and the checkpoints are gone: a rerun would start over) or ``new``."""
    from .rundir import CorruptFile, lock_holder, run_status

    run_dir, nb = out / spec.name, out / f"{spec.name}.ipynb"
    if lock_holder(run_dir) is not None:
        return "busy"
    try:
        status = run_status(run_dir)
    except CorruptFile:
        status = None
    try:
        nb_ok = not json.loads(nb.read_text()).get("metadata", {}).get("papermill", {}).get("exception")
    except (OSError, ValueError):
        nb_ok = False
    if status == "completed" and nb_ok:
        return "done"
    if (run_dir / "last.pt").is_file() or (run_dir / "last.prev.pt").is_file():
        return "resume"
    return "stale" if status == "completed" else "new"


def finish_run(notebook: Path, run_dir: Path, keep_checkpoints: bool = False) -> str:
    """Remove a finished run's checkpoints (every top-level ``*.pt`` but ``atlas.pt``; kept with
    ``keep_checkpoints``, e.g. for a later run's ``train.init_from``; :func:`pack` leaves them out anyway),
    drop its notebook's jupytext metadata and retitle the page (:func:`satconv.viz.retitle_run_page`);
    returns the heading.  A notebook that needs neither is left untouched."""
    from .rundir import write_text
    from .viz import retitle_run_page, run_title

    for path in Path(run_dir).glob("*.pt"):
        if path.name != KEPT_PT and not keep_checkpoints:
            path.unlink()
    nb = json.loads(Path(notebook).read_text())
    if nb.get("metadata", {}).pop("jupytext", None) is not None:
        write_text(notebook, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    heading = f"# Run: {run_title(run_dir)}"
    first = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), {"source": ""})
    return heading if "".join(first["source"]).split("\n")[0] == heading else retitle_run_page(notebook, run_dir)


def _children() -> dict[int, list[int]]:
    """Every process's children, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            children.setdefault(int(stat.read_text().rpartition(")")[2].split()[1]), []).append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    with suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


def stop_child(proc: subprocess.Popen, signum: int, grace: float = 60.0) -> int:
    """Stop papermill (started in a session of its own) and its kernel; returns papermill's exit status.

    The kernel (another session) gets ``signum`` first: training checkpoints at its next step and the cell
    fails, after which papermill saves the notebook and exits.  What still runs after ``grace`` seconds,
    or at a second signal, gets SIGTERM, and SIGKILL :data:`KILL_AFTER` seconds later."""
    hurry = []
    old = {s: signal.signal(s, lambda n, f: hurry.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        tree = _children()
        kids, todo = [], list(tree.get(proc.pid, []))
        for pid in tree.get(proc.pid, []):
            with suppress(OSError):
                os.kill(pid, signum)
        while todo:
            kids.append(todo.pop())
            todo += tree.get(kids[-1], [])
        for sig, limit in ((None, grace), (signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, KILL_AFTER)):
            for pid in [-proc.pid] + kids if sig else []:
                with suppress(OSError):
                    os.kill(pid, sig)
            end = time.monotonic() + limit
            while proc.poll() is None or any(map(_alive, kids)):
                if time.monotonic() > end or (sig is None and hurry):
                    break
                time.sleep(0.2)
            else:
                break
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)


def run_campaign(specs: list[Spec], out: Path, data: str, common: str = "", profile: str = "",
                 grace: float = 60.0, dry_run: bool = False, keep_checkpoints: bool = False, processes: int = 1) -> int:
    """Run the specs in order (module docstring); returns the exit code.  A SIGINT or SIGTERM raised as
    :class:`~satconv.rundir.Interrupted` (:func:`main`'s handlers) stops the current run and returns 128+signum."""
    from .rundir import CorruptFile, Interrupted, RunDirBusy, RunLock, run_status

    lock = None
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(out).acquire()  # <out>/.lock: one runner per --out
        except RunDirBusy as exc:
            raise CampaignError(str(exc)) from None
    failed, proc = [], None
    try:
        for i, spec in enumerate(specs, 1):
            tag, run_dir, nb, log = f"[{i}/{len(specs)}] {spec.name}", out / spec.name, out / f"{spec.name}.ipynb", \
                out / f"{spec.name}.log"
            state, nxt = run_state(out, spec), "; going on with the next spec" if i < len(specs) else ""
            if state in ("busy", "stale"):
                failed.append(spec.name)
                _say(f"{tag}: NOT RUN: " + ("another process is writing it" if state == "busy" else
                     f"completed, but its notebook is missing or failed and its checkpoints are gone (a rerun "
                     f"would start over; delete {run_dir} to redo it)") + nxt)
                continue
            if dry_run:
                _say(f"{tag}: {'completed, would skip' if state == 'done' else state}: "
                     f"{shlex.join(papermill_command(spec, out, data, common, profile, processes))}")
                continue
            if state != "done":
                cmd = papermill_command(spec, out, data, common, profile, processes)
                _say(f"{tag}: {'resuming' if state == 'resume' else 'starting'}, log {log}")
                start = time.monotonic()
                with open(log, "ab") as fh:
                    fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
                    fh.flush()
                    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
                rc, wall = proc.wait(), (time.monotonic() - start) / 60
                proc = None
                try:
                    status = run_status(run_dir)
                except CorruptFile:
                    status = "unreadable"
                if rc != 0 or status != "completed":
                    failed.append(spec.name)
                    _say(f"{tag}: FAILED after {wall:.1f} min, exit {rc}, run.json status {status}; see {log}{nxt}")
                    continue
            try:  # also for a run completed earlier, in case its runner was stopped before this
                title = finish_run(nb, run_dir, keep_checkpoints)
            except Exception as exc:  # noqa: BLE001 (the next spec still runs)
                failed.append(spec.name)
                _say(f"{tag}: completed, but tidying it up failed ({type(exc).__name__}: {exc}){nxt}")
                continue
            _say(f"{tag}: completed earlier, skipped" if state == "done" else
                 f"{tag}: done after {wall:.1f} min, exit 0; {title}")
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        if proc is not None and proc.poll() is None:
            _say(f"{name}: stopping the current run (it checkpoints at its next step) ...")
            _say(f"stopped, papermill exit {stop_child(proc, stop.signum, grace)}; the same command resumes")
        else:
            _say(f"{name}: stopped between runs")
        return 128 + stop.signum
    finally:
        if lock is not None:
            lock.release()
    _say(f"campaign over: {len(specs) - len(failed)} of {len(specs)} runs fine"
         + (f"; FAILED or not run: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def status_lines(out: Path) -> list[str]:
    """A line naming the live runner, then one per run directory under ``out``: status (``running`` while
    its lock is held), epochs done/planned, last val_acc and test_acc, mean epoch time of the last 5
    epochs and the minutes left at that pace."""
    import yaml

    from .rundir import CorruptFile, lock_holder, run_status

    runner = lock_holder(out)
    lines = ["runner: none" if runner is None else f"runner: pid {runner.get('pid')}, started {runner.get('started')}"]
    for d in sorted(p for p in out.iterdir() if any((p / f).is_file() for f in ("run.json", "config.yaml", ".lock"))):
        try:
            status = "running" if lock_holder(d) is not None else (run_status(d) or "not started")
        except CorruptFile:
            status = "unreadable run.json"
        metrics = []
        for line in (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").is_file() else []:
            with suppress(ValueError):
                metrics.append(json.loads(line))
        try:
            planned = yaml.safe_load((d / "config.yaml").read_text())["train"]["epochs"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            planned = None
        last = [next((f"{m[k]:.4f}" for m in reversed(metrics) if m.get(k) is not None), "-")
                for k in ("val_acc", "test_acc")]
        text = f"{d.name}: {status}, epochs {len(metrics)}/{planned or '?'}, val_acc {last[0]}, test_acc {last[1]}"
        times = [m["epoch_time_s"] for m in metrics[-5:] if m.get("epoch_time_s")]
        if times:
            per = sum(times) / len(times)
            text += f", {per:.1f} s/epoch"
            if isinstance(planned, int) and status != "completed":
                text += f", ETA {max(planned - len(metrics), 0) * per / 60:.1f} min"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m satconv.campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the specs one after another")
    r.add_argument("specs", nargs="+", metavar="SPEC", help="config:seed:epochs[:key=value,key=value]")
    r.add_argument("--data", required=True, help="the image-folder root ('synthetic': CPU smoke runs only)")
    r.add_argument("--overrides", default=DEFAULT_OVERRIDES, help=f"for every run (default: {DEFAULT_OVERRIDES})")
    r.add_argument("--profile", default="", help="'quick': CPU smoke runs only (default: as configured)")
    r.add_argument("--grace", type=float, default=60.0, help="seconds a stopped run gets to checkpoint")
    r.add_argument("--processes", type=int, default=1,
                   help="train each run on this many processes (GPUs) through torchrun (default: 1)")
    r.add_argument("--dry-run", action="store_true", help="check the specs and print the commands")
    r.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's last.pt (for a later spec's train.init_from=<out>/<name>)")
    s = sub.add_parser("status", help="one line per run directory")
    k = sub.add_parser("pack", help="archive the completed runs without checkpoints")
    k.add_argument("--max-mib", type=float, default=60.0)
    k.add_argument("--part-mib", type=float, default=15.0,
                   help="cut a larger archive into parts of this size, plus a manifest (default: 15)")
    i = sub.add_parser("install", help="unpack an archive into the book")
    i.add_argument("--replace", action="store_true", help="overwrite runs already there")
    for q in (r, s, k):
        q.add_argument("--out", required=True, type=Path, help="the campaign's folder, e.g. runs/gpu")
    i.add_argument("--out", type=Path, default=REPO_ROOT / "book" / "runs", help="default: book/runs")
    for q in (k, i):
        q.add_argument("archive", type=Path, metavar="ARCHIVE.tar.gz")
    a = p.parse_args(argv)
    try:
        if a.cmd == "run":
            from .rundir import Interrupted

            def stop(signum, frame):
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")

            data = str(Path(a.data).resolve()) if a.data not in ("", "synthetic") else a.data
            specs = validate(a.specs, data, a.overrides, a.profile, a.processes)
            old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                return run_campaign(specs, a.out.resolve(), data, a.overrides, a.profile, a.grace, a.dry_run,
                                    a.keep_checkpoints, a.processes)
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        if a.cmd != "install" and not a.out.is_dir():
            raise CampaignError(f"--out {a.out}: no such directory")
        if a.cmd == "status":
            print("\n".join(status_lines(a.out)))
        elif a.cmd == "pack":
            names, size, files = pack(a.out, a.archive, a.max_mib, a.part_mib)
            print(f"{a.archive}: {size / 2**20:.2f} MiB, {len(names)} runs: {', '.join(names)}"
                  + ("" if files == [a.archive] else f"; in {len(files) - 1} parts: {', '.join(f.name for f in files)}"))
        else:
            print(f"installed into {a.out}; add to _toc.yml:\n" + "\n".join(install(a.archive, a.out, a.replace)))
        return 0
    except (CampaignError, TransferError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["CampaignError", "Spec", "parse_spec", "validate", "papermill_command", "run_state", "finish_run",
           "stop_child", "run_campaign", "status_lines", "main", "DEFAULT_OVERRIDES"]

if __name__ == "__main__":
    sys.exit(main())
