"""Chapters import the package; they do not define it (conventions.md §3 item 13).

A chapter may keep a toy ``nn.Module`` for illustration, but one longer than
:data:`MAX_MODULE_LINES` belongs in ``satconv/`` with its own tests. The check is syntactic: any
class in ``chapters/*.py`` with a base named ``Module`` (``nn.Module``, ``torch.nn.Module``,
``Module``) or a ``satconv`` attention base counts.
"""
import ast
from pathlib import Path

import pytest

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
SOURCES = sorted(CHAPTERS.glob("*.py"))
MAX_MODULE_LINES = 15  # conventions.md §3 item 13: toy modules only
MODULE_BASES = {"Module", "AttentionBase"}


def _base_name(node: ast.expr) -> str:
    """Last component of a base-class expression: ``nn.Module`` -> ``Module``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def long_modules(source: str, limit: int = MAX_MODULE_LINES) -> list[tuple[str, int]]:
    """``(class name, line count)`` of every ``nn.Module`` subclass longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(_base_name(b) in MODULE_BASES for b in node.bases):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append((node.name, length))
    return found


def test_detector_flags_long_module_and_spares_short_one():
    """The checker itself: a 16-line module is flagged, a 3-line one and a plain class are not."""
    body = "\n".join(f"        self.l{i} = None" for i in range(14))  # class + def + 14 = 16 lines
    long_src = f"import torch.nn as nn\nclass Big(nn.Module):\n    def __init__(self):\n{body}\n"
    short_src = "from torch import nn\nclass Small(nn.Module):\n    def forward(self, x):\n        return x\n"
    plain_src = "class Plain:\n" + "\n".join(f"    a{i} = {i}" for i in range(30)) + "\n"
    assert long_modules(long_src) == [("Big", 16)]
    assert long_modules(short_src) == []
    assert long_modules(plain_src) == []


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_chapter_defines_no_long_module(source: Path):
    offenders = long_modules(source.read_text())
    assert not offenders, (
        f"{source.name} defines nn.Module classes longer than {MAX_MODULE_LINES} lines: {offenders}; "
        "move them into satconv/ and import them")
