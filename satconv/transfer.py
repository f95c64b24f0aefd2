"""The archive of a campaign's finished runs: packed on the GPU machine, installed into the book.

:func:`pack` writes every completed run of a campaign folder (its notebook, log and run directory, without
checkpoints, locks or temporary files) to one gzip tar, cut into parts with a manifest when it is large
(:mod:`satconv.parts`: a GPU call returns files of at most 16 MiB).  :func:`install` joins and checks the
parts, refuses unsafe members and runs already there, and unpacks into ``book/runs``.  The command line is
``python -m satconv.campaign pack|install`` (:mod:`satconv.campaign`).
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tarfile
from contextlib import suppress
from pathlib import Path, PurePosixPath

from .config import REPO_ROOT
from .parts import PartsError, joined, manifest_path, split
from .rundir import CorruptFile, lock_holder, run_status

KEPT_PT = "atlas.pt"  # the one top-level *.pt a finished run keeps (snapshots/*.pt stay too)


class TransferError(ValueError):
    """An archive that cannot be written or installed; nothing was written."""


def _packed(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """A run directory's member as packed: no lock, temporary file, link or checkpoint."""
    parts = PurePosixPath(info.name).parts
    if parts[-1] == ".lock" or fnmatch.fnmatch(parts[-1], ".*.tmp-*") or not (info.isfile() or info.isdir()):
        return None
    if parts[-1].endswith(".pt") and parts[1:] != (KEPT_PT,) and not (len(parts) == 3 and parts[1] == "snapshots"):
        return None
    return info


def pack(out: Path, archive: Path, max_mib: float = 60.0, part_mib: float = 15.0) -> tuple[list[str], int, list[Path]]:
    """Write every completed run of ``out`` (notebook, log and run directory without checkpoints, lock or
    temporary files) to the gzip tar ``archive``, members relative to ``out``; over ``part_mib`` it is cut into
    ``<archive>.partNN`` and the manifest ``<archive>.parts`` (:mod:`satconv.parts`: a GPU call returns files
    of at most 16 MiB).  Returns (run names, bytes, files written).  Raises :class:`TransferError`, writing
    nothing, without a completed run or over ``max_mib``."""
    names = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        with suppress(CorruptFile):
            if lock_holder(d) is None and run_status(d) == "completed":
                names.append(d.name)
    if not names:
        raise TransferError(f"no completed run in {out}")
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in names:
                for f in (f"{name}.ipynb", f"{name}.log"):
                    if (out / f).is_file():
                        tar.add(out / f, arcname=f)
                tar.add(out / name, arcname=name, filter=_packed)
        size = tmp.stat().st_size
        if size > max_mib * 2**20:
            raise TransferError(f"the archive would be {size / 2**20:.2f} MiB, over --max-mib {max_mib:g}; "
                                f"nothing written")
        if size > part_mib * 2**20:
            files = split(tmp, archive, int(part_mib * 2**20))
            archive.unlink(missing_ok=True)  # one form only: install reads the archive, else its manifest
        else:
            os.replace(tmp, archive)
            manifest_path(archive).unlink(missing_ok=True)
            files = [archive]
    finally:
        tmp.unlink(missing_ok=True)
    return names, size, files


def install(archive: Path, dest: Path, replace: bool = False) -> list[str]:
    """Unpack a :func:`pack` archive into ``dest``; returns the ``_toc.yml`` lines of its pages.  ``archive`` may
    also have been cut into parts: then its manifest ``<archive>.parts`` (or the manifest itself) is given, and
    the parts are joined and checked first.  Raises :class:`TransferError`, writing nothing, at a missing or
    altered part, an unsafe member or, unless ``replace``, a run already there."""
    manifest = archive if archive.name.endswith(".parts") else manifest_path(archive)
    if archive.is_file() and archive != manifest:
        return _install(archive, archive, dest, replace)
    if not manifest.is_file():
        raise TransferError(f"{archive}: no such file, and no manifest {manifest.name} of its parts")
    try:
        with joined(manifest) as whole:
            return _install(whole, manifest, dest, replace)
    except PartsError as exc:
        raise TransferError(str(exc)) from None


def _install(path: Path, shown: Path, dest: Path, replace: bool) -> list[str]:
    """:func:`install` of the whole archive at ``path`` (``shown`` in messages)."""
    with tarfile.open(path, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if not parts or m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise TransferError(f"{shown}: refusing its member {m.name!r}")
        tops = {PurePosixPath(m.name).parts[0] for m in members}
        runs = sorted({PurePosixPath(m.name).parts[0] for m in members if m.isdir() or "/" in m.name})
        clash = sorted(t for t in tops if (dest / t).exists() or (dest / t).is_symlink())
        if clash and not replace:
            raise TransferError(f"{dest} already holds {', '.join(clash)}; pass --replace to overwrite")
        for t in clash:
            shutil.rmtree(dest / t) if (dest / t).is_dir() and not (dest / t).is_symlink() else (dest / t).unlink()
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    base = os.path.relpath(dest.resolve(), REPO_ROOT) if dest.resolve().is_relative_to(REPO_ROOT) else str(dest)
    return [f"      - file: {PurePosixPath(base, n)}" for n in runs if f"{n}.ipynb" in tops]


__all__ = ["KEPT_PT", "TransferError", "pack", "install"]
