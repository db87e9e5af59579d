"""The rendered site in a real browser (the system Chromium, driven by Playwright), over
file:// and over http://127.0.0.1 (`atlas.serve`), plus a link checker that needs no browser.

The browser tests skip when Chromium or the playwright package is missing, except with
CI=true, where they fail instead: CI must never skip them silently. Never `playwright install`:
the tests use /usr/bin/chromium (or `chromium` on PATH). Full-page screenshots of each page
kind go to test-artifacts/ at the repository root (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from links import check_links, parse
from synthetic import add_history, history_change, make_atlas, purposes

from atlas.record import LOW_TRUST
from atlas.serve import make_server
from atlas.site import render
from atlas.store import Store, layer_dirname

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the link checker still runs; the browser tests skip (or fail in CI)
    expect = sync_playwright = None

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>"
QUOTED = "say \"cheese\" & 'smile'"
LABELS = {0: "tench", 1: "goldfish", 3: HOSTILE, 4: QUOTED, 6: "great white shark"}
SANITIZED = "a:b"  # a layer whose folder name is sanitized (a_b-<hash>)
LAYERS = {"conv2": 24, SANITIZED: 3, "logits": 10}
# Every 8th unit (index 7, 15, ...) is failed (synthetic.STATUS_CYCLE).
FAILED, STALE, MISSING, DONE = 7, 2, 4, 0
MODEL = "synthetic<model>"  # the spec: in every <title>, so escaping is checked there too


def chromium_path() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def title(what: str) -> str:
    return f"{what} · {MODEL} · atlas"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def atlas_out(tmp_path_factory) -> Path:
    """One synthetic atlas, K=2 images per unit, 160 px images (so WebP thumbnails are made)."""
    out = tmp_path_factory.mktemp("atlas-browser")
    make_atlas(
        out,
        LAYERS,
        labels=LABELS,
        stale={"conv2": [STALE]},
        missing={"conv2": [MISSING], "logits": [9]},
        samples=2,
        image_size=160,
    )
    render(out)
    return out


@pytest.fixture(scope="module")
def browser():
    chromium = chromium_path()
    reason = None
    if sync_playwright is None:
        reason = "the playwright package is not installed (pip install -e '.[test]')"
    elif chromium is None:
        reason = "no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run: {reason}; CI=true forbids skipping them")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@contextlib.contextmanager
def serving(out: Path):
    """`atlas serve` of an atlas on a free port, for the block: its root URL."""
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def http_root(atlas_out):
    with serving(atlas_out) as root:
        yield root


class Site:
    """Where the site is opened from: file:// or http://127.0.0.1:<port>/."""

    def __init__(self, scheme: str, root: str):
        self.scheme, self.root = scheme, root

    def url(self, page: str, query: str = "") -> str:
        return self.root + page + (f"?{query}" if query else "")

    def inside(self, url: str) -> bool:
        """Is this request for the site itself (never another host, never outside the site)?"""
        return url.startswith(self.root) or url.startswith("data:")


@pytest.fixture(scope="module", params=["file", "http"])
def site(request, atlas_out) -> Site:
    if request.param == "file":
        return Site("file", (atlas_out / "site").as_uri() + "/")
    return Site("http", request.getfixturevalue("http_root"))


class Tab:
    """A browser page that records JS errors, console errors, failed requests, every request
    URL and every dialog (a dialog would mean that a label ran as code)."""

    def __init__(self, page, site: Site):
        self.page, self.site = page, site
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.visited: list[str] = []
        self.checked = False
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", self._console)
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("requestfailed", self._failed)
        page.on("dialog", self._dialog)
        page.on("framenavigated", self._navigated)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        self.errors.append(f"console error: {message.text} ({message.location})")

    def _failed(self, request) -> None:
        # lazy images still loading when a test navigates away are aborted: not an error
        if request.failure != "net::ERR_ABORTED":
            self.errors.append(f"request failed: {request.url} {request.failure}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _navigated(self, frame) -> None:
        if frame == self.page.main_frame:
            self.visited.append(frame.url)

    def goto(self, page: str, query: str = ""):
        response = self.page.goto(self.site.url(page, query))
        if self.site.scheme == "http":
            assert response is not None and response.status == 200, page
        return self.page

    def assert_clean(self) -> None:
        """No JS error, no dialog, no request that leaves the site, on every page visited."""
        self.checked = True
        where = f"pages visited: {self.visited}"
        assert not self.errors, f"{self.errors}; {where}"
        assert not self.dialogs, f"a dialog opened (script ran): {self.dialogs}; {where}"
        outside = [url for url in self.requests if not self.site.inside(url)]
        assert not outside, f"requests outside {self.site.root}: {outside}"
        # the recorder works: the stylesheet and script of the pages were seen
        assert any(url.endswith("static/atlas.css") for url in self.requests), self.requests
        assert any(url.endswith("static/atlas.js") for url in self.requests), self.requests


@contextlib.contextmanager
def opened(browser, site: Site):
    context = browser.new_context(viewport={"width": 1280, "height": 640})
    context.set_default_timeout(5000)
    recorder = Tab(context.new_page(), site)
    yield recorder
    context.close()
    if not recorder.checked:  # every test ends with assert_clean(); this catches one that won't
        recorder.assert_clean()


@pytest.fixture
def tab(browser, site):
    with opened(browser, site) as recorder:
        yield recorder


# ---------------------------------------------------------------------------------------------
# Helpers

# One round trip per page: wait for the images in view (or, with scroll, for every image,
# scrolled into view so that lazy ones load) to load or fail, then describe every image.
IMAGE_FACTS = """async (scroll) => {
  const images = Array.from(document.images);
  const inView = img => {
    const box = img.getBoundingClientRect();
    return box.width > 0 && box.bottom > 0 && box.top < window.innerHeight;
  };
  const settled = img => img.complete ? Promise.resolve() : new Promise(done => {
    img.addEventListener("load", done, {once: true});
    img.addEventListener("error", done, {once: true});
  });
  if (scroll) {
    for (const img of images) { img.scrollIntoView(); await settled(img); }
    window.scrollTo(0, 0);
  } else {
    await Promise.all(images.filter(inView).map(settled));
  }
  return images.map(img => ({
    src: img.getAttribute("src"), alt: img.getAttribute("alt"),
    width: img.getAttribute("width"), height: img.getAttribute("height"),
    naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
    checked: scroll || inView(img)}));
}"""


def check_images(page, *, scroll: bool = False) -> int:
    """Every <img> has a non-empty alt and numeric width and height; the images in view (all of
    them with scroll=True) load, at the size that width and height announce. Returns how many
    images were checked as loaded."""
    images = page.evaluate(IMAGE_FACTS, scroll)
    for image in images:
        assert image["alt"] and image["alt"].strip(), f"{page.url}: img without alt: {image}"
        for side in ("width", "height"):
            value = image[side]
            assert value and value.isdigit() and int(value) > 0, f"{page.url}: {side}: {image}"
    loaded = [image for image in images if image["checked"]]
    for image in loaded:
        assert image["naturalWidth"] > 0, f"{page.url}: image did not load: {image}"
        size = (image["naturalWidth"], image["naturalHeight"])
        assert size == (int(image["width"]), int(image["height"])), f"{page.url}: {image}"
    return len(loaded)


def visible_cells(page) -> list[str]:
    return page.eval_on_selector_all(
        "#grid .cell", "cells => cells.filter(c => c.offsetParent !== null).map(c => c.id)"
    )


def screenshot(page, site: Site, kind: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"site-{kind}-{site.scheme}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Browser tests (each runs over file:// and over http://127.0.0.1)


def test_index_to_layer_to_unit_by_clicking(tab):
    page = tab.goto("index.html")
    expect(page).to_have_title(title("Feature atlas"))
    expect(page.locator("h1")).to_have_text(f"Feature atlas of {MODEL}")

    page.locator("section.layer h2 a", has_text=re.compile("^conv2$")).click()
    expect(page).to_have_url(tab.site.url("conv2/index.html"))
    expect(page).to_have_title(title("conv2"))
    expect(page.locator("#grid .cell")).to_have_count(LAYERS["conv2"])

    page.locator("#grid #c13").click()
    expect(page).to_have_url(tab.site.url("conv2/13.html"))
    expect(page).to_have_title(title("conv2:13"))
    expect(page.locator("h1")).to_contain_text("conv2:13")

    page.locator("header.top a.home").click()
    expect(page).to_have_url(tab.site.url("index.html"))
    page.locator("section.layer h2 a", has_text="logits").click()
    expect(page).to_have_url(tab.site.url("logits/index.html"))
    expect(page.locator("h1")).to_have_text("Class logits")
    page.locator("#grid #c1").click()
    expect(page).to_have_url(tab.site.url("logits/1.html"))
    expect(page).to_have_title(title("logits:1 (goldfish)"))

    # a layer whose folder name is sanitized, from a preview cell on the index page
    tab.goto("index.html")
    folder = layer_dirname(SANITIZED)
    assert folder != SANITIZED
    page.locator(f'.previews a.cell[href="{folder}/1.html"]').click()
    expect(page).to_have_url(tab.site.url(f"{folder}/1.html"))
    expect(page).to_have_title(title(f"{SANITIZED}:1"))
    tab.assert_clean()


def test_layer_filter_hides_cells_and_counts_matches(tab):
    page = tab.goto("conv2/index.html")
    total = LAYERS["conv2"]
    assert len(visible_cells(page)) == total
    expect(page.locator("#matches")).to_have_text("")

    page.locator("#filter").press_sequentially("13")
    expect(page.locator("#matches")).to_have_text(f"1 of {total} units match")
    assert visible_cells(page) == ["c13"]
    expect(page.locator("#c12")).to_be_hidden()
    expect(page).to_have_url(tab.site.url("conv2/index.html", "q=13"))  # shareable

    page.locator("#filter").fill("failed")
    failed = [f"c{i}" for i in range(total) if i % 8 == FAILED]
    expect(page.locator("#matches")).to_have_text(f"{len(failed)} of {total} units match")
    assert visible_cells(page) == failed

    page.locator("#filter").fill("FAILED 15")  # every word must match, in any case
    expect(page.locator("#matches")).to_have_text(f"1 of {total} units match")
    assert visible_cells(page) == ["c15"]

    page.locator("#filter").fill("no such unit")
    expect(page.locator("#matches")).to_have_text(f"0 of {total} units match")
    assert visible_cells(page) == []

    page.locator("#filter").fill("")
    expect(page.locator("#matches")).to_have_text("")
    assert len(visible_cells(page)) == total
    expect(page).to_have_url(tab.site.url("conv2/index.html"))
    tab.assert_clean()


def test_filter_deep_link_prefills_and_filters_on_load(tab):
    page = tab.goto("conv2/index.html", "q=13")
    expect(page.locator("#filter")).to_have_value("13")
    expect(page.locator("#matches")).to_have_text(f"1 of {LAYERS['conv2']} units match")
    assert visible_cells(page) == ["c13"]

    page = tab.goto("logits/index.html", "q=" + quote("white shark"))
    expect(page.locator("#filter")).to_have_value("white shark")
    assert visible_cells(page) == ["c6"]
    tab.assert_clean()


def test_logits_filter_by_label(tab):
    page = tab.goto("logits/index.html")
    expect(page.locator("#filter")).to_have_attribute("placeholder", re.compile("label"))
    page.locator("#filter").press_sequentially("Gold")
    expect(page.locator("#matches")).to_have_text(f"1 of {LAYERS['logits']} units match")
    assert visible_cells(page) == ["c1"]
    expect(page.locator("#c1 .caption")).to_contain_text("goldfish")

    page.locator("#filter").fill("great shark")
    assert visible_cells(page) == ["c6"]
    page.locator("#filter").fill("cheese")  # a label with quotes and an ampersand
    assert visible_cells(page) == ["c4"]
    tab.assert_clean()


def test_layer_filter_by_channel_number_ignores_the_layer_name(tab):
    page = tab.goto("conv2/index.html")
    page.locator("#filter").fill("2")
    expect(page.locator("#matches")).not_to_be_empty()
    shown = visible_cells(page)
    assert "c2" in shown and "c5" not in shown, shown
    tab.assert_clean()


def test_index_search_finds_a_unit_by_label(tab):
    page = tab.goto("index.html")
    results = page.locator("#results li a")
    page.locator("#search").press_sequentially("goldf")
    expect(results).to_have_count(1)
    expect(results).to_have_text("logits:1 (goldfish)")

    page.locator("#search").fill("conv2:13")
    expect(results).to_have_text(["conv2:13"])
    page.locator("#search").fill("")
    expect(results).to_have_count(0)

    page.locator("#search").fill("white shark")
    expect(results).to_have_text(["logits:6 (great white shark)"])
    results.first.click()
    expect(page).to_have_url(tab.site.url("logits/6.html"))
    expect(page).to_have_title(title("logits:6 (great white shark)"))
    tab.assert_clean()


def test_the_search_announces_how_many_units_it_found(tab):
    page = tab.goto("index.html")
    found = page.locator("#found")
    expect(found).to_have_attribute("aria-live", "polite")
    page.locator("#search").fill("conv2")
    expect(found).to_have_text(re.compile(r"^\d+ units found"))
    page.locator("#search").fill("goldfish")
    expect(found).to_have_text("1 unit found")
    page.locator("#search").fill("")
    expect(found).to_have_text("")
    tab.assert_clean()


def test_a_skip_link_leads_past_the_header_to_the_content(tab):
    page = tab.goto("conv2/index.html")
    page.keyboard.press("Tab")
    skip = page.locator("a.skip")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#main$"))
    expect(page.locator("main")).to_be_focused()
    tab.assert_clean()


@pytest.fixture(scope="module")
def timelapse_out(tmp_path_factory) -> Path:
    """A synthetic atlas whose unit conv2:0 has a timelapse: three frames of other colours."""
    import numpy as np

    from atlas.files import encode_animation

    out = tmp_path_factory.mktemp("atlas-timelapse")
    make_atlas(out, {"conv2": 3})
    frames = [np.full((64, 64, 3), value, np.uint8) for value in (40, 120, 200)]
    (out / "units/conv2/0.timelapse.webp").write_bytes(encode_animation(frames))
    record_path = out / "units/conv2/0.json"
    record = json.loads(record_path.read_text())
    record.update(timelapse="units/conv2/0.timelapse.webp", frames_every=2)
    record_path.write_text(json.dumps(record))
    Store(out).write_manifest()
    render(out)
    return out


@pytest.mark.parametrize("motion", ["no-preference", "reduce"])
def test_the_timelapse_pauses_and_plays_and_rests_under_reduced_motion(
    browser, timelapse_out, motion
):
    site = Site("file", (timelapse_out / "site").as_uri() + "/")
    context = browser.new_context(reduced_motion=motion)
    recorder = Tab(context.new_page(), site)
    page = recorder.goto("conv2/0.html")
    image, button = page.locator("figure.timelapse img"), page.locator("button.motion")
    animation, still = "img/0.timelapse.webp", "img/0.webp"
    playing = motion == "no-preference"
    for _ in range(3):
        expect(image).to_have_attribute("src", animation if playing else still)
        expect(button).to_have_text("Pause" if playing else "Play")
        expect(button).to_have_attribute("aria-label", re.compile("the animation$"))
        current = image.evaluate("img => img.currentSrc")
        assert current.endswith(animation if playing else still), current
        button.click()
        playing = not playing
    recorder.assert_clean()
    context.close()
    if motion == "reduce":  # without the script, the picture element shows the still
        context = browser.new_context(reduced_motion=motion, java_script_enabled=False)
        page = context.new_page()
        page.goto(site.url("conv2/0.html"))
        image = page.locator("figure.timelapse img")
        assert image.evaluate("img => img.currentSrc").endswith(still)
        expect(page.locator("button.motion")).to_be_hidden()
        context.close()


def test_unit_page_arrow_keys_go_to_next_and_previous_unit(tab):
    page = tab.goto("conv2/3.html")
    for key, number in [("ArrowRight", 4), ("ArrowRight", 5), ("ArrowLeft", 4), ("ArrowLeft", 3)]:
        page.keyboard.press(key)
        expect(page).to_have_url(tab.site.url(f"conv2/{number}.html"))
        expect(page.locator("h1")).to_contain_text(f"conv2:{number}")
        page.wait_for_load_state()  # the keys work once the page's script has run

    # no previous unit before the first, no next one after the last: the keys do nothing
    for start, key in [(0, "ArrowLeft"), (LAYERS["conv2"] - 1, "ArrowRight")]:
        page = tab.goto(f"conv2/{start}.html")
        page.keyboard.press(key)
        page.wait_for_timeout(150)
        expect(page).to_have_url(tab.site.url(f"conv2/{start}.html"))
    tab.assert_clean()


def test_slash_focuses_the_filter_and_the_search_box(tab):
    page = tab.goto("conv2/index.html")
    expect(page.locator("#filter")).not_to_be_focused()
    page.keyboard.press("/")
    expect(page.locator("#filter")).to_be_focused()
    expect(page.locator("#filter")).to_have_value("")  # the "/" is not typed into it
    page.keyboard.type("13")
    assert visible_cells(page) == ["c13"]

    page = tab.goto("index.html")
    page.keyboard.press("/")
    expect(page.locator("#search")).to_be_focused()
    page.keyboard.type("goldfish")
    expect(page.locator("#results li a")).to_have_text(["logits:1 (goldfish)"])
    tab.assert_clean()


def test_unit_back_link_goes_to_its_cell_in_the_layer_grid(tab):
    unit = 22  # far enough down the grid that the page has to scroll to it
    page = tab.goto(f"conv2/{unit}.html")
    page.locator("nav.pager a", has_text="all of conv2").click()
    expect(page).to_have_url(tab.site.url(f"conv2/index.html#c{unit}"))
    assert page.evaluate("document.querySelector(':target').id") == f"c{unit}"
    expect(page.locator(f"#c{unit}")).to_be_in_viewport()
    assert page.evaluate("window.scrollY") > 0

    page = tab.goto(f"conv2/{unit}.html")  # the breadcrumb goes to the same place
    page.locator("header.top a", has_text="conv2").click()
    expect(page).to_have_url(tab.site.url(f"conv2/index.html#c{unit}"))
    tab.assert_clean()


def test_failed_stale_and_missing_units_are_visibly_marked(tab):
    page = tab.goto("conv2/index.html")
    for index, status in [(FAILED, "failed"), (STALE, "stale"), (MISSING, "missing")]:
        badge = page.locator(f"#c{index} .badge")
        expect(badge).to_be_visible()
        expect(badge).to_have_text(status)
    for index, status in [(FAILED, "failed"), (MISSING, "missing")]:
        placeholder = page.locator(f"#c{index} .placeholder")
        expect(placeholder).to_be_visible()
        expect(placeholder).to_have_text(status)
        expect(page.locator(f"#c{index} img")).to_have_count(0)
    expect(page.locator(f"#c{STALE} img")).to_be_visible()  # a stale result still has its image
    expect(page.locator(f"#c{DONE} .badge")).to_have_count(0)
    # the stylesheet applies: failed cells have a red border, stale images are faded
    expect(page.locator(f"#c{FAILED}")).to_have_css("border-top-color", "rgb(255, 107, 107)")
    expect(page.locator(f"#c{DONE}")).not_to_have_css("border-top-color", "rgb(255, 107, 107)")
    expect(page.locator(f"#c{STALE} img")).to_have_css("opacity", "0.55")
    expect(page.locator(".meta .count.failed")).to_have_text("3 failed")

    for index, selector, text in [
        (FAILED, "p.error", "Failed: objective became NaN"),
        (STALE, "p.warning", "Stale:"),
        (MISSING, "p.warning", "Missing:"),
    ]:
        page = tab.goto(f"conv2/{index}.html")
        expect(page.locator(selector)).to_be_visible()
        expect(page.locator(selector)).to_contain_text(text)
    tab.assert_clean()


def test_hostile_label_is_shown_as_text_and_never_runs(tab):
    page = tab.goto("logits/index.html")
    expect(page.locator("#c3 .caption")).to_contain_text(HOSTILE)
    expect(page.locator("#c3 img")).to_have_count(1)  # only the thumbnail
    expect(page.locator("#c3 img")).to_have_attribute("alt", re.compile(re.escape(HOSTILE)))
    expect(page.locator("#c4 img")).to_have_attribute(
        "alt", f"Feature visualization of logits class 4 ({QUOTED})"
    )
    assert (
        page.evaluate("Array.from(document.images).filter(i => i.src.endsWith('/x')).length") == 0
    )

    page = tab.goto("logits/index.html", "q=" + quote(HOSTILE))  # through the deep link too
    expect(page.locator("#filter")).to_have_value(HOSTILE)
    assert visible_cells(page) == ["c3"]

    page = tab.goto("logits/3.html")
    expect(page).to_have_title(title(f"logits:3 ({HOSTILE})"))
    expect(page.locator("h1")).to_contain_text(HOSTILE)
    assert page.locator("h1 img").count() == 0

    page = tab.goto("index.html")
    page.locator("#search").fill("onerror")
    expect(page.locator("#results li a")).to_have_text([f"logits:3 ({HOSTILE})"])
    expect(page.locator("#results img")).to_have_count(0)
    page.wait_for_timeout(100)  # give an injected onerror a chance to fire
    assert not any(url.endswith("/x") for url in tab.requests), tab.requests
    tab.assert_clean()  # no dialog


def test_every_page_kind_images_load_and_screenshots(tab):
    kinds = [
        ("index", "index.html"),
        ("layer", "conv2/index.html"),
        ("logits-layer", "logits/index.html"),
        ("unit", f"conv2/{DONE}.html"),
    ]
    for kind, path in kinds:
        page = tab.goto(path)
        assert check_images(page) > 0, f"{path}: no image in view"
        screenshot(page, tab.site, kind)
    # the unit page: the large image and the K=2 diverse images, all loaded
    page = tab.goto(f"conv2/{DONE}.html")
    assert page.locator("img.large").get_attribute("loading") is None  # not lazy: in view
    expect(page.locator(".variants img")).to_have_count(2)
    assert check_images(page, scroll=True) == 3
    expect(page.locator("svg.curve polyline")).to_have_count(1)
    # a preview row per layer on the index page, at most 6 images each
    page = tab.goto("index.html")
    assert check_images(page, scroll=True) == 6 + 3 + 6
    tab.assert_clean()


def test_every_page_has_no_errors_and_well_formed_images(tab, atlas_out):
    """Visit every page of the site (41): no JS errors, alt, width and height everywhere, the
    images in view load."""
    site = atlas_out / "site"
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    assert len(pages) == 1 + len(LAYERS) + sum(LAYERS.values())
    for path in pages:
        page = tab.goto(path)
        check_images(page)
    assert len(tab.visited) == len(pages)
    tab.assert_clean()


# ---------------------------------------------------------------------------------------------
# What a unit is for (a second atlas, with inputs, classes, maps, exemplars and trust)

PURPOSE_LAYERS = {"conv1": 6, "conv2": 12, "logits": 10}


def trust_of(index: int) -> float:
    return ((index * 37) % 100) / 100  # synthetic.purposes()


@pytest.fixture(scope="module")
def purpose_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas-purpose")
    analysis = purposes(PURPOSE_LAYERS)
    make_atlas(out, PURPOSE_LAYERS, labels=LABELS, analysis=analysis, image_size=160)
    render(out)
    return out


def site_of(how: str, out: Path) -> Iterator[Site]:
    """OUT's site opened from disk ("file") or served on 127.0.0.1 ("http")."""
    if how == "file":
        yield Site("file", (out / "site").as_uri() + "/")
        return
    with serving(out) as root:
        yield Site("http", root)


@pytest.fixture(scope="module", params=["file", "http"])
def purpose_site(request, purpose_out):
    yield from site_of(request.param, purpose_out)


@pytest.fixture
def purpose_tab(browser, purpose_site):
    with opened(browser, purpose_site) as recorder:
        yield recorder


def test_an_input_thumbnail_opens_that_units_page_and_its_outputs_lead_back(purpose_tab):
    tab = purpose_tab
    page = tab.goto("conv2/1.html")
    # purposes(): conv2:1 is excited most by conv1:1, then conv1:3; inhibited by conv1:2
    inputs = page.locator("#inputs ol.links.up li")
    expect(inputs).to_have_count(2)
    expect(inputs.nth(0)).to_contain_text("+0.9")
    expect(page.locator("#inputs ol.links.down li")).to_contain_text("-0.7")
    assert check_images(page, scroll=True) > 0  # thumbnails, maps and exemplars load, sized
    screenshot(page, tab.site, "purpose-unit")
    inputs.nth(0).locator("img").click()
    expect(page).to_have_url(tab.site.url("conv1/1.html"))
    expect(page).to_have_title(title("conv1:1"))
    expect(page.locator("#inputs")).to_contain_text("No planned layer before conv1")
    # conv2:1 lists conv1:1 as its top input: it is conv1:1's top output
    first = page.locator("#outputs ol.links.up li").first
    expect(first).to_contain_text("+0.9")
    first.locator("a").click()
    expect(page).to_have_url(tab.site.url("conv2/1.html"))
    page.locator("#classes ol.links.up a", has_text="goldfish").click()
    expect(page).to_have_url(tab.site.url("logits/1.html"))
    tab.assert_clean()


def test_the_layer_grid_sorts_by_trust_and_filters_by_a_class(purpose_tab):
    tab = purpose_tab
    page = tab.goto("conv2/index.html")
    count = PURPOSE_LAYERS["conv2"]
    scored = [i for i in range(count) if i % 8 != FAILED]  # a failed unit has no score
    assert visible_cells(page) == [f"c{i}" for i in range(count)]
    low = [i for i in scored if trust_of(i) < LOW_TRUST]
    for index in low:
        badge = page.locator(f"#c{index} .badge.low-trust")
        expect(badge).to_be_visible()
        expect(badge).to_have_attribute("title", re.compile(rf"^trust {trust_of(index):.2f}, "))
    expect(page.locator(".cell .badge.low-trust")).to_have_count(len(low))

    page.locator("#sort").select_option("trust-low")
    lowest_first = [f"c{i}" for i in sorted(scored, key=trust_of)] + [f"c{FAILED}"]
    assert visible_cells(page) == lowest_first
    expect(page).to_have_url(tab.site.url("conv2/index.html", "sort=trust-low"))

    # purposes(): conv2:i pushes class i % 10 up; class 1 is goldfish
    page.locator("#pushes").press_sequentially("goldf")
    assert visible_cells(page) == ["c11", "c1"]  # trust 0.07, then 0.37
    expect(page.locator("#matches")).to_have_text(f"2 of {count} units match")
    page.locator("#sort").select_option("trust-high")
    assert visible_cells(page) == ["c1", "c11"]
    page.locator("#sort").select_option("index")
    assert visible_cells(page) == ["c1", "c11"]
    page.locator("#pushes").fill("")
    assert visible_cells(page) == [f"c{i}" for i in range(count)]
    expect(page).to_have_url(tab.site.url("conv2/index.html"))

    page = tab.goto("conv2/index.html", "sort=ratio-high&pushes=" + quote("white shark"))
    expect(page.locator("#sort")).to_have_value("ratio-high")
    expect(page.locator("#pushes")).to_have_value("white shark")
    assert visible_cells(page) == ["c6"]  # class 6 is "great white shark"
    page.locator("#pushes").fill("tench")  # class 0: conv2:0 and conv2:10
    assert visible_cells(page) == ["c10", "c0"]
    page.locator("#pushes").fill("")
    # activation 1 + 0.1 i over the best exemplar's 2.0: the highest index first
    assert visible_cells(page)[:3] == ["c11", "c10", "c9"]
    tab.assert_clean()


def test_the_index_search_finds_units_by_the_classes_they_push(purpose_tab):
    tab = purpose_tab
    page = tab.goto("index.html")
    results = page.locator("#results li")
    page.locator("#search").press_sequentially("goldfish")
    expect(results).to_have_text(
        [
            "logits:1 (goldfish)",  # by its label first, then by the classes units push
            "conv1:1 pushes goldfish",
            "conv2:1 pushes goldfish",
            "conv2:11 pushes goldfish",
        ]
    )
    # a hostile label is text in the results, never markup (conv1:3 and conv2:3 push class 3)
    page.locator("#search").fill("onerror")
    expect(results).to_have_text(
        [f"logits:3 ({HOSTILE})", f"conv1:3 pushes {HOSTILE}", f"conv2:3 pushes {HOSTILE}"]
    )
    expect(page.locator("#results img")).to_have_count(0)
    page.locator("#search").fill("goldfish")
    results.nth(3).locator("a").click()
    expect(page).to_have_url(tab.site.url("conv2/11.html"))
    tab.assert_clean()


# ---------------------------------------------------------------------------------------------
# Across checkpoints (a third atlas, with three checkpoints, the second incomplete)

HISTORY_LAYERS = {"conv1": 4, "conv2": 12}


@pytest.fixture(scope="module")
def history_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas-history")
    make_atlas(out, HISTORY_LAYERS, image_size=160)
    add_history(out, ["step-10000", None, "step-12000"], incomplete=[1])
    render(out)
    return out


@pytest.fixture(scope="module", params=["file", "http"])
def history_site(request, history_out):
    yield from site_of(request.param, history_out)


@pytest.fixture
def history_tab(browser, history_site):
    with opened(browser, history_site) as recorder:
        yield recorder


def test_the_filmstrip_shows_each_checkpoint_large_and_the_grid_puts_the_most_changed_first(
    history_tab,
):
    tab = history_tab
    page = tab.goto("conv2/4.html")
    frames = page.locator("#filmstrip li")
    expect(frames).to_have_count(3)
    expect(frames.nth(0)).to_contain_text("step-10000")
    expect(frames.nth(1)).to_contain_text("incomplete")
    expect(frames.nth(2)).to_contain_text(f"change {history_change(4, 2):.2f}")
    expect(page.locator("svg.change-plot circle")).to_have_count(2)
    large, caption = page.locator("figure.main img.large"), page.locator("#shown")
    expect(caption).to_have_text(
        f"step-12000 · 2026-11-30 02:00 · change {history_change(4, 2):.2f} · current"
    )
    assert check_images(page, scroll=True) == 4  # the large picture and three frames
    screenshot(page, tab.site, "history-unit")

    frames.nth(0).locator("a").click()  # the oldest picture, large, without leaving the page
    expect(page).to_have_url(tab.site.url("conv2/4.html"))
    oldest = frames.nth(0).locator("img").get_attribute("src")
    assert oldest != "img/4.webp"
    expect(large).to_have_attribute("src", oldest)
    expect(large).to_have_attribute("alt", re.compile(r"at checkpoint step-10000$"))
    expect(caption).to_have_text("step-10000 · 2026-11-28 02:00")
    expect(page.locator("#filmstrip a[aria-current]")).to_have_count(1)
    expect(frames.nth(0).locator("a")).to_have_attribute("aria-current", "true")
    check_images(page)  # loaded at the size it announces
    frames.nth(1).locator("a").click()
    expect(caption).to_have_text(
        re.compile(r"^\d{3}-\w{8} · 2026-11-29 02:00 · change .* · incomplete$")
    )
    frames.nth(2).locator("a").click()
    expect(large).to_have_attribute("src", "img/4.webp")

    page = tab.goto("conv2/index.html")
    count = HISTORY_LAYERS["conv2"]
    scored = [i for i in range(count) if i % 8 != FAILED]
    by_change = sorted(scored, key=lambda i: (-history_change(i, 2), i)) + [FAILED]
    expect(page.locator("#sort")).to_have_value("change-high")
    assert visible_cells(page) == [f"c{i}" for i in by_change]
    expect(page.locator(f"#c{by_change[0]} .badge.change")).to_have_text("Δ0.94")
    page.locator("#sort").select_option("index")
    assert visible_cells(page) == [f"c{i}" for i in range(count)]
    expect(page).to_have_url(tab.site.url("conv2/index.html", "sort=index"))
    page.locator("#sort").select_option("change-high")  # the default: no ?sort= for it
    expect(page).to_have_url(tab.site.url("conv2/index.html"))
    assert visible_cells(page) == [f"c{i}" for i in by_change]
    page = tab.goto("conv2/index.html", "sort=index")
    assert visible_cells(page)[:2] == ["c0", "c1"]

    page = tab.goto("index.html")
    rows = page.locator("#timeline tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(1)).to_contain_text("incomplete")
    expect(rows.nth(2)).to_contain_text("step-12000 (current)")
    screenshot(page, tab.site, "history-index")
    tab.assert_clean()


# ---------------------------------------------------------------------------------------------
# Link checker (no browser)


def test_links_resolve_to_files_inside_the_site(atlas_out):
    site = (atlas_out / "site").resolve()
    checked = check_links(site)
    assert checked > 10 * len(list(site.rglob("*.html")))  # css, js, home, pager, images...

    # the search index: links relative to the site root, made by atlas.js on the index page
    entries, labels = search_index(site)
    assert len(entries) == sum(LAYERS.values())
    for unit_id, _label, href, _pushes in entries:
        assert not urlsplit(href).scheme and not href.startswith("/"), href
        assert (site / href).is_file(), f"{unit_id}: {href}"
    assert [label for _id, label, _href, _pushes in entries if "onerror" in label] == [HOSTILE]
    assert labels == {str(k): v for k, v in LABELS.items()}


def search_index(site: Path) -> tuple[list, dict]:
    """search-index.js's two assignments: the entries and the class labels."""
    lines = (site / "search-index.js").read_text().splitlines()
    values = []
    for line, name in zip(lines, ("ATLAS_SEARCH", "ATLAS_LABELS"), strict=True):
        prefix = f"window.{name} = "
        assert line.startswith(prefix) and line.endswith(";"), line[:80]
        values.append(json.loads(line[len(prefix) : -1]))
    return values[0], values[1]


@pytest.mark.parametrize("which", ["atlas_out", "purpose_out", "history_out"])
def test_ids_are_unique_on_every_page(request, which):
    out = request.getfixturevalue(which)
    for page in sorted((out / "site").rglob("*.html")):
        ids = parse(page).ids
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        assert not duplicates, f"{page.name}: duplicate ids {duplicates}"
