"""satconv.parts: a file cut into parts and joined back, refusing a missing, short or altered part."""
import json
import os

import pytest

from satconv.parts import PartsError, joined, manifest_path, split


@pytest.fixture
def whole(tmp_path):
    path = tmp_path / "src" / "runs.tar.gz"
    path.parent.mkdir()
    path.write_bytes(os.urandom(2500))
    return path


def test_split_and_join_round_trip(whole, tmp_path):
    dest = tmp_path / "out" / whole.name
    dest.parent.mkdir()
    files = split(whole, dest, 1000)
    assert [f.name for f in files] == ["runs.tar.gz.part00", "runs.tar.gz.part01", "runs.tar.gz.part02",
                                       "runs.tar.gz.parts"]
    assert [f.stat().st_size for f in files[:-1]] == [1000, 1000, 500]
    assert b"".join(f.read_bytes() for f in files[:-1]) == whole.read_bytes()
    spec = json.loads(manifest_path(dest).read_text())
    assert spec["size"] == 2500 and [p["size"] for p in spec["parts"]] == [1000, 1000, 500]
    with joined(manifest_path(dest)) as path:
        assert path.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [f.name for f in files]  # the temporary file is gone
    assert [f.name for f in split(whole, dest, 5000)] == ["runs.tar.gz.part00", "runs.tar.gz.parts"]


@pytest.mark.parametrize("damage", ["missing", "short", "altered"])
def test_join_refuses_a_damaged_part_and_names_it(whole, tmp_path, damage):
    files = split(whole, tmp_path / whole.name, 1000)
    part = files[1]
    if damage == "missing":
        part.unlink()
    elif damage == "short":
        part.write_bytes(part.read_bytes()[:-1])
    else:
        data = bytearray(part.read_bytes())
        data[10] ^= 1
        part.write_bytes(bytes(data))
    with pytest.raises(PartsError, match="part01"):
        with joined(manifest_path(tmp_path / whole.name)):
            pass
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_bad_manifest_and_bad_size(whole, tmp_path):
    bad = tmp_path / "x.parts"
    bad.write_text("{not json")
    with pytest.raises(PartsError, match="not a parts manifest"):
        with joined(bad):
            pass
    with pytest.raises(ValueError, match="positive"):
        split(whole, tmp_path / "y", 0)
