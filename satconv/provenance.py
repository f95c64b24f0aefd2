"""Provenance: which code, commit, device and time a result came from.

One home for what ``run.json``, the benchmark rows and the chapters record about where a number was
made: :func:`source_digest` (a hash of the package's sources), :func:`git_commit`, :func:`device_name`
and :func:`utc_now`.
"""
from __future__ import annotations

import datetime
import hashlib
import platform
import subprocess
from pathlib import Path

import torch

from .config import REPO_ROOT


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


def git_commit(repo: str | Path | None = None) -> str | None:
    """The commit checked out in ``repo`` (default: this checkout), with ``+dirty`` when tracked files
    differ from it; ``None`` outside a git checkout or without git."""
    repo = str(REPO_ROOT if repo is None else repo)
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(device=None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``; strings become ``torch.device``; a bare
    ``cuda`` gets the current device's index."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device=None) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or the CPU's model (``/proc/cpuinfo``, else
    ``platform``) with the number of threads PyTorch uses: ``"cpu (<model>, <n> threads)"``."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-06T19:30:00+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
