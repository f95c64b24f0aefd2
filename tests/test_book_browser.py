"""The built book works in a browser with no network: pages load, math renders, widgets respond.

Serves ``_build/html`` on 127.0.0.1 and drives the system Chromium through Playwright's
``executable_path`` (never ``playwright install``: its download CDN is unreachable here). For every
page listed in ``_toc.yml`` it checks that

- the page loads without page errors other than the known harmless ones (:data:`ALLOWED_PAGE_ERRORS`)
  and without failed local requests other than the widget icon fonts (:data:`ALLOWED_MISSING`);
- no request leaves 127.0.0.1 (MathJax and the widget manager are vendored, toolchain.md §7);
- every embedded widget view renders, and pressing ArrowRight on each slider changes what the
  slider drives: the displayed image(s) of its cell, or at least its readout when the cell has no
  image (the kernel-free Stack + jslink pattern, conventions.md §3 item 22).

Math pages (:data:`MATH_PAGES`) must show MathJax output for every math element, with no MathJax
error. To cover a new page, list it in ``_toc.yml``; to require sliders on it, add it to
:data:`MIN_SLIDERS`. Screenshots go to ``_build/screenshots/``.

Skipped, with the reason, when the book is not built or Chromium / Playwright are missing; with
``SATCONV_REQUIRE_BROWSER=1`` (``make test``) those skips become failures.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("SATCONV_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE_BROWSER = os.environ.get("SATCONV_REQUIRE_BROWSER") == "1"

# Flags of toolchain.md §8 (Playwright adds --headless and its own --user-data-dir).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1000, "height": 1800}

# --- What the test expects; extend these as the book grows. -----------------------------------
#: Pages whose math must render; each one that is in the toc is checked (the theory chapter, once
#: it exists, carries the labelled equations; the intro has one display equation).
MATH_PAGES = ("chapters/theory", "chapters/intro")
#: Pages that must show at least this many working widget sliders, e.g. {"chapters/visualisation": 2}.
MIN_SLIDERS: dict[str, int] = {"chapters/visualise": 3, "chapters/theory": 2}
#: Page errors that every JB1 page or widget page raises and that do no harm (toolchain.md §8).
ALLOWED_PAGE_ERRORS = (
    "Identifier 'THEBE_JS_URL' has already been declared",  # every JB1 page
    "Cannot read properties of undefined (reading 'Queue')",  # html-manager calls the MathJax 2 API
)
#: Local 404s that do no harm: FontAwesome icon fonts the widget CSS looks up next to the page.
ALLOWED_MISSING = re.compile(r"/@jupyter-widgets/(html-manager/dist/)?[^/]+\.(woff2?|ttf|eot|svg)(\?.*)?$")
LOCAL_HOSTS = {"127.0.0.1"}
LOCAL_SCHEMES = {"data", "blob", "about"}
RENDER_TIMEOUT_MS = 20_000  # MathJax and the widget manager on 2 busy CPU cores
CHANGE_TIMEOUT_MS = 5_000  # a slider press re-renders one widget


def toc_pages(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Docnames of every page in a jb-book ``_toc.yml``, in reading order (root first)."""
    toc = yaml.safe_load(toc_path.read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(re.sub(r"\.(md|py|ipynb)$", "", entry["file"]))
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    walk(toc.get("sections"))
    return pages


PAGES = toc_pages()


def _unavailable() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not (HTML / "index.html").exists():
        return f"book not built: {HTML / 'index.html'} missing (run `make book`)"
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set SATCONV_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    return None


@pytest.fixture(scope="module")
def server():
    """``_build/html`` on an ephemeral 127.0.0.1 port; yields the base URL."""
    reason = _unavailable()
    if reason:
        (pytest.fail if REQUIRE_BROWSER else pytest.skip)(reason)

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 (signature of the base class)
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(HTML)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageVisit:
    """One page opened offline, with every page error, outside request and failed response recorded."""

    def __init__(self, browser, base_url: str, docname: str):
        self.docname = docname
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.missing: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", self._response)
        self.page.goto(f"{base_url}/{docname}.html", wait_until="load")

    def _route(self, route):
        url = urlparse(route.request.url)
        if url.scheme in LOCAL_SCHEMES or url.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def _response(self, response):
        if response.status >= 400 and not ALLOWED_MISSING.search(urlparse(response.url).path):
            self.missing.append(f"{response.status} {response.url}")

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(allowed in e for allowed in ALLOWED_PAGE_ERRORS)]

    def wait_for_math(self) -> None:
        """Until every Sphinx math element holds MathJax output (or the timeout)."""
        self.page.wait_for_function(
            "() => [...document.querySelectorAll('.math')].every(m => m.querySelector('mjx-container'))",
            timeout=RENDER_TIMEOUT_MS)

    def wait_for_widgets(self) -> int:
        """Until every embedded widget view is rendered; returns the number of views."""
        views = self.page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
        if views:
            self.page.wait_for_function(
                """n => { const areas = document.querySelectorAll('.widget-subarea');
                          return areas.length >= n && [...areas].every(a => a.childElementCount > 0); }""",
                arg=views, timeout=RENDER_TIMEOUT_MS)
        return views

    def screenshot(self, suffix: str = "") -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = self.docname.replace("/", "__") + suffix + ".png"
        self.page.screenshot(path=str(SCREENSHOTS / name), full_page=True)

    def screenshot_around(self, element, suffix: str) -> None:
        """Screenshot of the notebook cell output holding ``element`` (the element alone if none)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        area = element.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' cell_output ')][1]")
        target = area if area.count() else element
        target.screenshot(path=str(SCREENSHOTS / (self.docname.replace("/", "__") + suffix + ".png")))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser, server):
    visits = []

    def open_page(docname: str) -> PageVisit:
        visits.append(PageVisit(browser, server, docname))
        return visits[-1]

    yield open_page
    for v in visits:
        v.close()


# JS helpers for the slider check: what a slider drives lives in its notebook cell's output.
_VISIBLE_IMAGES = """slider => {
    const area = slider.closest('.cell_output') || slider.closest('.cell') || document.body;
    return [...area.querySelectorAll('img')]
        .filter(img => img.offsetParent !== null && img.getBoundingClientRect().width > 0)
        .map(img => img.src);
}"""
_READOUT = """slider => { const r = slider.querySelector('.widget-readout');
                        return r ? (r.value !== undefined ? r.value : r.textContent) : null; }"""


def _slider_state(slider) -> tuple:
    return tuple(slider.evaluate(_VISIBLE_IMAGES)), slider.evaluate(_READOUT)


def _press_until_changed(page, slider, key: str, before: tuple) -> tuple:
    slider.locator(".noUi-handle").first.press(key)
    for _ in range(CHANGE_TIMEOUT_MS // 100):
        after = _slider_state(slider)
        if after != before:
            return after
        page.wait_for_timeout(100)
    return before


def check_sliders(visit: PageVisit) -> int:
    """Press ArrowRight on every slider (ArrowLeft if it sits at its maximum); assert it drives its cell.

    Returns the number of sliders checked.
    """
    page, sliders = visit.page, visit.page.locator(".widget-slider")
    for index in range(sliders.count()):
        slider = sliders.nth(index)
        slider.scroll_into_view_if_needed()
        images, readout = before = _slider_state(slider)
        after = _press_until_changed(page, slider, "ArrowRight", before)
        if after == before:
            after = _press_until_changed(page, slider, "ArrowLeft", before)
        visit.screenshot_around(slider, f"__slider{index}")
        where = f"{visit.docname}: slider {index} (readout {readout!r})"
        assert after[1] != readout, f"{where}: neither ArrowRight nor ArrowLeft changed the slider"
        if images:
            assert after[0] != images, f"{where}: the slider moved but the displayed image did not change"
    return sliders.count()


def test_toc_pages_were_built():
    reason = _unavailable()
    if reason and "book not built" in reason:
        (pytest.fail if REQUIRE_BROWSER else pytest.skip)(reason)
    missing = [p for p in PAGES if not (HTML / f"{p}.html").exists()]
    assert not missing, f"pages in _toc.yml without HTML in {HTML}: {missing}"


@pytest.mark.parametrize("docname", PAGES)
def test_page_works_offline(visit, docname):
    v = visit(docname)
    if v.page.locator(".math").count():
        v.wait_for_math()
    v.wait_for_widgets()
    sliders = check_sliders(v)
    v.screenshot()
    assert not v.external, f"{docname}: requests left 127.0.0.1: {v.external}"
    assert not v.unexpected_errors(), f"{docname}: page errors: {v.unexpected_errors()}"
    assert not v.missing, f"{docname}: failed requests: {v.missing}"
    assert sliders >= MIN_SLIDERS.get(docname, 0), (
        f"{docname}: {sliders} widget sliders, expected at least {MIN_SLIDERS[docname]}")


@pytest.mark.parametrize("docname", [p for p in MATH_PAGES if p in PAGES])
def test_math_renders(visit, docname):
    v = visit(docname)
    math = v.page.locator(".math").count()
    assert math, f"{docname}: no math on the page"
    v.wait_for_math()
    assert v.page.locator("mjx-container").count() >= math
    assert v.page.locator('mjx-container[display="true"]').count() >= 1, f"{docname}: no display equation"
    errors = v.page.locator("mjx-merror").all_inner_texts()
    assert not errors, f"{docname}: MathJax errors: {errors}"
    assert not v.external, f"{docname}: requests left 127.0.0.1: {v.external}"


# Nothing is clipped or runs into the margin: a display equation fits the text column whole (a reader
# should not have to scroll an equation: long ones are split over lines), and a table wider than the
# column scrolls inside it (book/static/satconv.css). Cells tagged full-width may use the margin.
_OVERFLOW = """() => {
  const article = document.querySelector('main article') || document.querySelector('article');
  const column = article.getBoundingClientRect();
  const over = [];
  for (const el of article.querySelectorAll('mjx-container[display="true"], table')) {
    if (el.getBoundingClientRect().width === 0 || el.closest('.tag_full-width')) continue;
    const what = `${el.tagName} ${el.textContent.slice(0, 50)}`;
    if (el.tagName !== 'TABLE') {
      const drawn = (el.querySelector('svg') || el).getBoundingClientRect();
      if (drawn.width > Math.min(el.clientWidth, column.width) + 1)
        over.push(`equation ${Math.round(drawn.width)} px wide in ${Math.round(el.clientWidth)} px: ${what}`);
      continue;
    }
    let box = el;  // what the reader sees: the nearest element that scrolls sideways, or the table
    for (let e = el; e && e !== article; e = e.parentElement) {
      if (['auto', 'scroll'].includes(getComputedStyle(e).overflowX)) { box = e; break; }
    }
    const right = box.getBoundingClientRect().right;
    if (right > column.right + 1) over.push(`table ${Math.round(right - column.right)} px past the column: ${what}`);
  }
  return over;
}"""


@pytest.mark.parametrize("docname", PAGES)
def test_nothing_wider_than_the_text_column(visit, docname):
    v = visit(docname)
    if v.page.locator(".math").count():
        v.wait_for_math()
    over = {}
    for width in (VIEWPORT["width"], 1280):  # 1280: a laptop, where the page's table of contents takes a column
        v.page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        v.page.wait_for_timeout(200)
        if found := v.page.evaluate(_OVERFLOW):
            over[width] = found
    assert not over, f"{docname}: clipped or past the text column (by viewport width): {over}"
