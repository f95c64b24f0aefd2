"""Numbers for the book's prose that read the same on every machine.

A chapter's glued values are stored in its committed notebook, and strict nbval compares them when it
re-executes the notebook, possibly on another CPU. Round-off is not the same everywhere: PyTorch picks
its CPU kernels by vector width (``ATEN_CPU_CAPABILITY``), BLAS and oneDNN pick theirs by CPU, and
``torch.randn`` draws float32 numbers through a vectorised path on AVX2 machines, so an error of float
rounding, or the last digits of any float, differ between an x86-64 and an arm64 machine, or between two
x86-64 generations. A chapter therefore glues *text*, never a raw float whose digits carry round-off:

- :func:`below` for a quantity at the level of rounding error (the difference between two routes that
  agree in exact arithmetic): the claim "below 1e-13", after checking it; the bound is chosen with room
  (a factor of 10 or more above the measured value) so that it holds for another machine's round-off too;
- :func:`shown` for a quantity whose leading digits do not depend on the machine (a relative error
  dominated by the construction's leak, an output scale, a fraction): the value formatted as the prose
  shows it, after checking that a relative change of ``rtol`` does not change that text, so that a
  value sitting next to a rounding boundary is caught here rather than on another machine.

:func:`html_table` renders the book's tables (one helper for every chapter).

Exact quantities (counts, and ratios or sums of counts computed in Python floats, which round the
same way everywhere) may be glued as numbers. Both functions return the text to glue, as in
``glue("concat_vs_sum", below(err, 1e-13), display=False)``; the prose pastes it with the ``glue:text``
role and no format spec (the format is applied here).
"""
from __future__ import annotations

import html
import math

__all__ = ["below", "shown", "html_table", "HtmlTable"]


def below(value: float, bound: float) -> str:
    """``"below <bound>"`` for a non-negative round-off-level ``value``, after checking the claim.

    Pick ``bound`` well above the measured value (a factor of 10 or more): round-off on another CPU
    differs from this one's by small factors, and the claim must hold wherever the chapter runs.

    Args:
        value: the measured quantity (an absolute or relative error), finite and non-negative.
        bound: the claim made in the text, ``value < bound``.

    Returns:
        ``f"below {bound:g}"``, e.g. ``"below 1e-13"``.

    Raises:
        ValueError: if ``value`` is negative or not finite, ``bound`` is not positive, or
            ``value >= bound`` (the text would claim something false).
    """
    value, bound = float(value), float(bound)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"below() needs a finite, non-negative value, got {value!r}")
    if not bound > 0:
        raise ValueError(f"below() needs a positive bound, got {bound!r}")
    if not value < bound:
        raise ValueError(f"{value!r} is not below {bound:g}: raise the bound the text claims")
    return f"below {bound:g}"


def shown(value: float, spec: str, *, rtol: float = 1e-4) -> str:
    """``format(value, spec)``, after checking that the text does not hinge on the last digits.

    Args:
        value: a finite float (a tensor's ``.item()``, a numpy scalar).
        spec: a format specification of a float, as in ``f"{value:.2f}"``: ``".2f"``, ``".1e"``,
            ``".0%"``, ``",.0f"``.
        rtol: the relative change of ``value`` that must leave the text unchanged. Rounding is
            monotone, so checking ``value * (1 - rtol)`` and ``value * (1 + rtol)`` covers the interval.

    Returns:
        the formatted value.

    Raises:
        ValueError: if ``value`` is not finite, ``rtol`` is not in ``[0, 1)``, or the text changes
            within ``rtol`` (show fewer digits, or :func:`below` if the value is round-off).
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"shown() needs a finite value, got {value!r}")
    if not 0 <= rtol < 1:
        raise ValueError(f"shown() needs 0 <= rtol < 1, got {rtol!r}")
    text = format(value, spec)
    low, high = format(value * (1 - rtol), spec), format(value * (1 + rtol), spec)
    if not low == text == high:
        raise ValueError(f"{value!r} formatted as {spec!r} is {text!r}, but within a relative {rtol:g} it reads "
                         f"{low!r} or {high!r}: the text would depend on the machine; show fewer digits")
    return text


class HtmlTable:
    """An HTML table that Jupyter and ``myst_nb``'s ``glue`` display as HTML (``_repr_html_``).

    Its plain-text form is ``"<table: R rows x C columns>"``: the same on every run, so a notebook's stored
    ``text/plain`` output does not change with memory addresses.

    Attributes:
        html: the markup.
        shape: ``(rows, columns)`` of the body.
    """

    def __init__(self, markup: str, shape: tuple[int, int]):
        self.html, self.shape = markup, shape

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<table: {self.shape[0]} rows x {self.shape[1]} columns>"


def html_table(header, rows, notes=(), *, escape: bool = True) -> HtmlTable:
    """A compact, horizontally scrollable HTML table, with small notes below it.

    Args:
        header: the column titles, ``C`` of them.
        rows: ``R`` rows of ``C`` cells each; a cell is formatted with ``str``.
        notes: lines printed small below the table.
        escape: HTML-escape the header, the cells and the notes (``False``: cells already hold markup,
            such as links or ``<br>``).

    Returns:
        An :class:`HtmlTable` (``class="satconv-table"``).

    Raises:
        ValueError: a row whose length is not the header's.
    """
    header, rows = list(header), [list(r) for r in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {row!r}")
    text = (lambda c: html.escape(str(c))) if escape else str
    head = "".join(f"<th>{text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in row) + "</tr>" for row in rows)
    foot = "".join(f"<p><small>{text(n)}</small></p>" for n in notes)
    markup = (f'<div class="satconv-table" style="overflow-x: auto; font-size: 0.85em"><table>'
              f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}</div>")
    return HtmlTable(markup, (len(rows), len(header)))
