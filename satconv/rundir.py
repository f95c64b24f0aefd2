"""The run directory's safety machinery: one writer, whole files, honest status, clean stops.

:mod:`satconv.train` writes a run directory through this module:

- :class:`RunLock`: one process per run directory.  An OS file lock (``fcntl.flock``) on ``.lock``, which
  holds the owner's pid, host, start time and command.  The kernel drops the lock when its process dies,
  so a lock left by a killed process is taken over (with a warning naming it); a live owner makes a
  second writer fail with :class:`RunDirBusy` before it touches any file.
- :func:`atomic_write`, :func:`save_torch`, :func:`write_text`: a temporary file beside the target, fsynced,
  renamed over it: a reader sees the old or the new file, never half of one.  A failed or interrupted
  write removes its temporary file; :func:`remove_temp_files` removes those of killed processes;
  :func:`append_text` appends a line, or nothing.  A full disk raises :class:`DiskFull`.
- :func:`run_status`: ``run.json``'s status, where ``running`` without a live lock owner reads ``died``.
- :class:`StopSignals`: SIGINT and SIGTERM ask a run to stop at its next step boundary
  (:class:`Interrupted` reports which signal).

Readable checkpoints (``last.pt`` and ``last.prev.pt``, checked on load) are the job of
:mod:`satconv.checkpoints`.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: what a temporary file of :func:`atomic_write` is called: ``.<name>.tmp-<pid>`` beside ``<name>``
TEMP_PATTERN = ".*.tmp-*"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class RunDirError(RuntimeError):
    """A run directory cannot be used as it is: in use, full, or holding an unreadable file."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock; the message names it.

    Attributes:
        run_dir: the directory.
        holder: the owner's ``{"pid", "host", "started", "command"}`` as its lock file says (may be empty).
    """

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = run_dir, holder
        if holder:
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
                   f"running: {holder.get('command')}")
        else:
            who = "its lock file does not say which"
        super().__init__(f"{run_dir} is in use by another process ({who}); wait for it to finish or stop it, "
                         f"or choose another output directory (--out)")


class DiskFull(RunDirError):
    """A write failed for want of space (``ENOSPC``) or quota (``EDQUOT``); nothing was overwritten.

    Attributes:
        path: the file that could not be written.
    """

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class CorruptFile(RunDirError):
    """A run file (checkpoint, config.yaml, run.json) is truncated, damaged or not what it should be.

    Attributes:
        path: the file.
        reason: what is wrong with it.
    """

    def __init__(self, path: Path, reason: str, advice: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is unreadable: {reason}{'; ' + advice if advice else ''}")


class BadRunDir(ValueError):
    """The run directory path is a file, or cannot be created or written (a bad argument)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped on SIGINT or SIGTERM (a :class:`KeyboardInterrupt`, as Ctrl-C always was).

    Attributes:
        signum: the signal's number; a command line exits with ``128 + signum`` (130 or 143).
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _disk_full(exc: OSError, path: Path) -> DiskFull:
    return DiskFull(f"{os.strerror(exc.errno)} in {path.parent} (writing {path.name})", path)


# ---------------------------------------------------------------------------------------------
# Whole-file writes
# ---------------------------------------------------------------------------------------------
def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory ``path`` (and its parents) unless it exists; returns it as a Path.

    Raises:
        BadRunDir: ``path`` is a file, or cannot be created (a parent is a file, no permission, ...).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadRunDir(f"the run directory {path} is a file, not a directory; choose another output directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadRunDir(f"cannot create the run directory {path}: {exc.strerror or exc}") from exc
    return path


def atomic_write(path: str | Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Args:
        path: the file to (re)place.
        data: its whole new content.
        before_replace: called once the temporary file is complete, just before the rename
            (:class:`satconv.checkpoints.Checkpoints` rotates there).

    Raises:
        DiskFull: no space or quota; ``path`` is unchanged.  Any failure or interruption (also a
        KeyboardInterrupt) removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # TEMP_PATTERN
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise _disk_full(exc, path) from exc
        raise


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (unbuffered: an error shows once, where it happens)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def torch_bytes(obj) -> bytes:
    """``torch.save(obj)`` into memory (so that a full disk shows as an ``OSError`` of the write, which
    ``torch.save`` to a file can report as an unrelated ``RuntimeError``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(obj, path: str | Path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, torch_bytes(obj))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`atomic_write`."""
    atomic_write(path, text.encode())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` and fsync; on any failure the file is cut back to its old length.

    Raises:
        DiskFull: no space or quota.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, text.encode())
            os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the original error is the one to report; a resume rewrites metrics.jsonl anyway
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise _disk_full(exc, path) from exc
            raise
    finally:
        os.close(fd)


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files of interrupted writes (:data:`TEMP_PATTERN`) in ``run_dir`` and its
    ``snapshots/``; call only while holding the :class:`RunLock`.  Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "snapshots"):
        for path in sorted(folder.glob(TEMP_PATTERN)):
            if path.is_file():
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


# ---------------------------------------------------------------------------------------------
# One writer per run directory
# ---------------------------------------------------------------------------------------------
def _holder_info(fd: int) -> dict:
    raw = os.pread(fd, 65536, 0)
    try:
        info = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {"unparsed": raw[:200].decode(errors="replace")}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The exclusive lock of a run directory (a context manager; :meth:`acquire` and :meth:`release`).

    Args:
        run_dir: an existing directory (:func:`prepare_run_dir`).

    Attributes:
        stale: the lock file's owner info when :meth:`acquire` took over a lock whose process died
            without releasing it, else ``None``.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.stale: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock and write this process's pid, host, start time and command into it.

        Raises:
            RunDirBusy: a live process holds it (nothing in the directory was changed).
            BadRunDir: the lock file cannot be created (no permission, read-only file system).
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BadRunDir(f"cannot write in the run directory {self.dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_info(fd)
            for _ in range(20):  # the owner writes its info just after taking the lock
                if holder:
                    break
                time.sleep(0.05)
                holder = _holder_info(fd)
            os.close(fd)
            raise RunDirBusy(self.dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            previous = _holder_info(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)  # releases the lock
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise _disk_full(exc, self.path) from exc
            raise
        self._fd = fd
        if previous:
            self.stale = previous
            log.warning("%s: took over the lock left by pid %s on %s (started %s), which ended without "
                        "releasing it", self.dir, previous.get("pid"), previous.get("host"), previous.get("started"))
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def lock_holder(run_dir: str | Path) -> dict | None:
    """The owner info of a live process holding ``run_dir``'s lock (``{}`` when it wrote none), or
    ``None`` when no process holds it.  Creates nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_json(path: str | Path) -> dict | None:
    """A JSON object file, or ``None`` when it does not exist.

    Raises:
        CorruptFile: not valid JSON, or not an object.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFile(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFile(path, f"a JSON {type(data).__name__}, not an object")
    return data


def run_status(run_dir: str | Path) -> str | None:
    """``run.json``'s ``status`` (``running``, ``completed``, ``interrupted``, ``failed``, ``stopped``),
    where ``running`` without a live process holding the run's lock reads ``"died"`` (a killed run);
    ``None`` without ``run.json``.

    Raises:
        CorruptFile: ``run.json`` cannot be read.
    """
    info = read_json(Path(run_dir) / "run.json")
    if info is None:
        return None
    status = info.get("status")
    if status == "running" and lock_holder(run_dir) is None:
        return "died"
    return status


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGTERM
# ---------------------------------------------------------------------------------------------
class StopSignals:
    """Within a ``with`` block in the main thread, the first SIGINT or SIGTERM only records itself in
    :attr:`signum` (the run checkpoints at its next step boundary and raises :class:`Interrupted`); a
    second one raises :class:`Interrupted` at once.  The previous handlers are restored on exit.  In
    another thread (signal handlers can only be set in the main one) nothing is installed.

    The same signal again within :attr:`repeat_window` seconds of the first is one request delivered twice,
    not a second one: ``timeout -s TERM`` signals its command and then the command's process group, and so
    does ``kill`` of a group that the process also hears about directly.  Without this, every run stopped by
    ``timeout`` would skip its checkpoint.

    Args:
        repeat_window: seconds after the first signal during which the same signal is ignored.

    Attributes:
        signum: the first signal received in the block, or ``None``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    #: default seconds within which the first signal's twin is a duplicate delivery (a person's second
    #: Ctrl-C comes later; GNU timeout's two deliveries come microseconds apart)
    REPEAT_WINDOW = 0.5

    def __init__(self, repeat_window: float = REPEAT_WINDOW):
        if repeat_window < 0:
            raise ValueError(f"repeat_window must be >= 0 seconds, got {repeat_window}")
        self.repeat_window = float(repeat_window)
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if signum == self.signum and now - self._first_at < self.repeat_window:
            return  # the first request delivered again (timeout, process-group kill)
        raise Interrupted(signum, f"stopped at once by a second {signal_name(signum)}")

    def __enter__(self) -> "StopSignals":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False


__all__ = ["RunDirError", "RunDirBusy", "DiskFull", "CorruptFile", "BadRunDir", "Interrupted", "signal_name",
           "prepare_run_dir", "atomic_write", "torch_bytes", "save_torch", "write_text",
           "append_text", "remove_temp_files", "RunLock", "lock_holder", "read_json", "run_status",
           "StopSignals", "LOCK_NAME", "TEMP_PATTERN"]
