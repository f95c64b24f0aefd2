"""satconv.report: glued text that reads the same on every machine."""
import math

import numpy as np
import pytest
import torch

from satconv.report import below, shown


# ------------------------------------------------------------------ below
def test_below_states_the_bound():
    assert below(4.4e-16, 1e-13) == "below 1e-13"
    assert below(0.0, 1e-6) == "below 1e-06"
    assert below(2.5e-4, 0.01) == "below 0.01"


def test_below_accepts_tensor_and_numpy_scalars():
    assert below(torch.tensor(3e-8).item(), 1e-6) == "below 1e-06"
    assert below(np.float32(3e-8), 1e-6) == "below 1e-06"


def test_below_checks_the_claim():
    assert below(9.9e-14, 1e-13) == "below 1e-13"
    with pytest.raises(ValueError, match="raise the bound"):
        below(1e-13, 1e-13)  # not strictly below
    with pytest.raises(ValueError, match="raise the bound"):
        below(5e-13, 1e-13)


@pytest.mark.parametrize("value", [-1e-16, math.nan, math.inf])
def test_below_refuses_negative_and_non_finite_values(value):
    with pytest.raises(ValueError, match="finite, non-negative"):
        below(value, 1.0)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan])
def test_below_refuses_a_bound_that_is_not_positive(bound):
    with pytest.raises(ValueError, match="positive bound"):
        below(0.0, bound)


# ------------------------------------------------------------------ shown
@pytest.mark.parametrize("value, spec, text", [
    (1.5049270940536985e-08, ".1e", "1.5e-08"),
    (1.5049270496447775e-08, ".1e", "1.5e-08"),  # the same value on another CPU reads the same
    (0.9234142935765134, ".0%", "92%"),
    (1.6738350210201325, ".2f", "1.67"),
    (1234.0, ",.0f", "1,234"),
    (0.0, ".2f", "0.00"),
    (-0.29626554309632397, ".2f", "-0.30"),
])
def test_shown_formats_like_format(value, spec, text):
    assert shown(value, spec) == text == format(value, spec)


@pytest.mark.parametrize("value, spec", [
    (1.545000001, ".2f"),  # 1.55 or 1.54 depending on the 9th digit
    (0.125, ".2f"),  # exactly on a boundary
    (9.95e-09, ".1e"),  # 9.9e-09 or 1.0e-08, across a decade
    (0.9250000001, ".0%"),
])
def test_shown_refuses_values_next_to_a_rounding_boundary(value, spec):
    with pytest.raises(ValueError, match="show fewer digits"):
        shown(value, spec)


def test_shown_rtol_sets_how_close_a_boundary_may_be():
    value = 1.5456431834989341  # 0.04% above the boundary 1.545 of ".2f"
    assert shown(value, ".2f", rtol=1e-4) == "1.55"
    with pytest.raises(ValueError):
        shown(value, ".2f", rtol=1e-3)
    assert shown(0.125, ".2f", rtol=0) == "0.12"  # rtol=0 checks nothing


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_shown_refuses_non_finite_values(value):
    with pytest.raises(ValueError, match="finite"):
        shown(value, ".2f")


@pytest.mark.parametrize("rtol", [-1e-4, 1.0])
def test_shown_refuses_bad_rtol(rtol):
    with pytest.raises(ValueError, match="rtol"):
        shown(1.0, ".2f", rtol=rtol)


# ------------------------------------------------------------------ in the book
def test_glued_text_is_pasted_as_it_is():
    """glue() stores the text's repr as text/plain; the glue:text role without a format spec pastes the text."""
    variables = pytest.importorskip("myst_nb.core.variables")
    for text in (below(4.4e-16, 1e-13), shown(0.9234142935765134, ".0%"), shown(1.5049e-08, ".1e")):
        assert variables.format_plain_text(repr(text), "s") == text


def test_html_table_escapes_cells_and_keeps_markup_when_asked():
    from satconv.report import html_table
    t = html_table(["a<b", "c"], [[1, "<i>x</i>"], ["&", 2.5]], notes=["n<1"])
    assert "<th>a&lt;b</th>" in t.html and "<td>&lt;i&gt;x&lt;/i&gt;</td>" in t.html and "<td>&amp;</td>" in t.html
    assert "<small>n&lt;1</small>" in t.html and t._repr_html_() == t.html == str(t)
    assert repr(t) == "<table: 2 rows x 2 columns>" and t.shape == (2, 2)
    raw = html_table(["h"], [["<i>x</i>"]], escape=False)
    assert "<td><i>x</i></td>" in raw.html
    assert raw.html.count("<tr>") == 2  # header row and one body row


def test_html_table_refuses_ragged_rows():
    import pytest
    from satconv.report import html_table
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        html_table(["a", "b"], [[1, 2], [3]])
