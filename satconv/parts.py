"""A file cut into parts of at most a given size, and put back together with its checksum verified.

A GPU machine returns files of at most 16 MiB each (the device README), so :func:`satconv.transfer.pack`
cuts a larger archive ``runs.tar.gz`` into ``runs.tar.gz.part00``, ``runs.tar.gz.part01``, ... and writes
the manifest ``runs.tar.gz.parts`` (JSON: the whole file's size and SHA-256, each part's name, size and
SHA-256) last, so that a manifest means every part was written.  :func:`joined` gives back the whole file,
refusing a missing, truncated or altered part with a message that names it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .rundir import atomic_write


class PartsError(ValueError):
    """A manifest or a part that does not match what was written."""


def manifest_path(path: Path) -> Path:
    """``<path>.parts``: the manifest of ``path`` cut into parts."""
    return path.with_name(path.name + ".parts")


def split(source: Path, dest: Path, part_bytes: int) -> list[Path]:
    """Cut ``source`` into ``<dest>.partNN`` files of at most ``part_bytes`` each, then write the manifest
    ``<dest>.parts``.

    Args:
        source: the whole file (left as it is).
        dest: the name the parts and the manifest are derived from (the whole file's name).
        part_bytes: the largest part, in bytes (> 0).

    Returns:
        The parts, then the manifest (the files to send).
    """
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, not {part_bytes}")
    size = source.stat().st_size
    count = max(1, -(-size // part_bytes))
    if count > 100:
        raise ValueError(f"{source}: {count} parts of {part_bytes} bytes; at most 100")
    parts, entries, whole = [], [], hashlib.sha256()
    with open(source, "rb") as f:
        for i in range(count):
            data = f.read(part_bytes)
            part = dest.with_name(f"{dest.name}.part{i:02d}")
            atomic_write(part, data)
            parts.append(part)
            whole.update(data)
            entries.append({"name": part.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"name": dest.name, "size": size, "sha256": whole.hexdigest(), "parts": entries}
    atomic_write(manifest_path(dest), (json.dumps(manifest, indent=1) + "\n").encode())
    return [*parts, manifest_path(dest)]


@contextmanager
def joined(manifest: Path):
    """The whole file of a :func:`split` manifest, as a temporary file (removed on exit).

    Args:
        manifest: ``<name>.parts``; the parts lie beside it.

    Yields:
        The path of the reassembled file, whose size and SHA-256 match the manifest.

    Raises:
        PartsError: an unreadable manifest, or a part missing, of the wrong size or checksum (named).
    """
    try:
        spec = json.loads(manifest.read_text())
        entries = [(e["name"], int(e["size"]), e["sha256"]) for e in spec["parts"]]
        size, digest = int(spec["size"]), spec["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PartsError(f"{manifest}: not a parts manifest ({exc})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(str(spec.get('name') or 'joined')).name}.", dir=manifest.parent)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for name, want, sha in entries:
                part = manifest.parent / Path(name).name
                if not part.is_file():
                    raise PartsError(f"{manifest}: its part {part.name} is missing")
                data = part.read_bytes()
                if len(data) != want or hashlib.sha256(data).hexdigest() != sha:
                    raise PartsError(f"{manifest}: its part {part.name} is {len(data)} bytes or altered "
                                     f"(written: {want} bytes, SHA-256 {sha[:12]}...)")
                out.write(data)
                whole.update(data)
        if Path(tmp).stat().st_size != size or whole.hexdigest() != digest:
            raise PartsError(f"{manifest}: the joined parts do not give the file it describes")
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


__all__ = ["split", "joined", "manifest_path", "PartsError"]
