"""Every chapter's jupytext source (chapters/<name>.py) and its paired notebook agree.

The book reads ``chapters/*.py``; papermill, nbval and Jupyter users read the paired
``chapters/*.ipynb``. A forgotten ``make sync`` leaves the two with different code, which this test
catches by comparing the code cells of ``jupytext.read(py)`` with those of ``nbformat.read(ipynb)``.
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
SOURCES = sorted(CHAPTERS.glob("*.py"))


def _code_sources(notebook) -> list[str]:
    """Sources of the code cells, in order, without trailing blank lines."""
    return [cell.source.rstrip() for cell in notebook.cells if cell.cell_type == "code"]


def test_chapters_exist():
    assert SOURCES, f"no chapters/*.py found in {CHAPTERS}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_paired_notebook_has_same_code(source: Path):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `make sync`"
    from_py = _code_sources(jupytext.read(source))
    from_ipynb = _code_sources(nbformat.read(paired, as_version=4))
    assert len(from_py) == len(from_ipynb), (
        f"{source.name} has {len(from_py)} code cells, {paired.name} has {len(from_ipynb)}: run `make sync`")
    for index, (a, b) in enumerate(zip(from_py, from_ipynb)):
        assert a == b, f"code cell {index} of {source.name} differs from {paired.name}: run `make sync`"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_chapter_header_pairs_and_names_kernel(source: Path):
    """papermill needs a kernelspec, and `jupytext --sync` needs the pairing in the header."""
    metadata = jupytext.read(source).metadata
    assert metadata.get("kernelspec", {}).get("name") == "python3", f"{source.name}: no python3 kernelspec"
    assert metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
        f"{source.name}: header must pair `formats: ipynb,py:percent`")


def test_papermill_sees_every_training_parameter():
    """papermill parses each line of train's `parameters` cell (a second `=` in a comment hides a line)."""
    from papermill.inspection import inspect_notebook

    params = inspect_notebook(str(CHAPTERS / "train.ipynb"))
    assert set(params) == {"config", "profile", "data", "overrides", "output_dir", "device", "processes"}
