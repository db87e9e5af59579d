"""Page building: escaping, safe paths, statuses, thumbnails, incremental rendering."""

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from synthetic import make_atlas

from atlas.cli import cli
from atlas.errors import AtlasError
from atlas.files import exclusive_lock
from atlas.site import Page, render, write_pages
from atlas.site.units import curve_points
from atlas.store import Store

HOSTILE_LABEL = "<script>alert('label')</script>"
HOSTILE_LAYER = '<b onmouseover="x">../../evil'


@pytest.fixture(scope="module")
def atlas_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    make_atlas(
        out,
        {"conv2": 12, HOSTILE_LAYER: 3, "a:b": 2, "a_b": 2, "logits": 10},
        labels={1: HOSTILE_LABEL, 8: "hen"},
        stale={"conv2": [2]},
        missing={"conv2": [3]},
        samples=2,
    )
    render(out)
    return out


def pages(out: Path) -> list[Path]:
    return sorted((out / "site").rglob("*.html"))


def test_hostile_labels_and_layer_names_are_escaped(atlas_out):
    for page in pages(atlas_out):
        text = page.read_text()
        assert "<script>alert" not in text, page
        assert '<b onmouseover="x">' not in text, page
    logits = (atlas_out / "site" / "logits" / "1.html").read_text()
    assert "&lt;script&gt;alert(&#39;label&#39;)&lt;/script&gt;" in logits


def test_layer_folders_are_sanitized_and_never_clash(atlas_out):
    site = (atlas_out / "site").resolve()
    folders = [p for p in site.iterdir() if p.is_dir() and p.name != "static"]
    assert len(folders) == 5  # conv2, hostile, a:b, a_b, logits
    for page in pages(atlas_out):
        assert site in page.resolve().parents
    assert not (atlas_out / "evil").exists() and not (atlas_out.parent / "evil").exists()


def test_failed_stale_and_missing_units_are_shown_as_such(atlas_out):
    grid = (atlas_out / "site" / "conv2" / "index.html").read_text()
    assert 'class="cell failed" id="c7"' in " ".join(grid.split())
    assert 'class="cell stale" id="c2"' in " ".join(grid.split())
    assert 'class="cell missing" id="c3"' in " ".join(grid.split())
    assert grid.count('<span class="badge failed">failed</span>') == 1
    failed = (atlas_out / "site" / "conv2" / "7.html").read_text()
    assert "Failed: objective became NaN" in failed
    assert (
        "Stale: this result is from an earlier plan"
        in (atlas_out / "site" / "conv2" / "2.html").read_text()
    )
    assert (
        "Missing: planned, not computed yet."
        in (atlas_out / "site" / "conv2" / "3.html").read_text()
    )
    index = (atlas_out / "site" / "index.html").read_text()
    assert "failed" in index and "stale" in index and "missing" in index


def test_every_image_has_alt_text_and_a_size(atlas_out):
    for page in pages(atlas_out):
        for tag in page.read_text().split("<img")[1:]:
            tag = tag.split(">")[0]
            assert 'alt="Feature visualization of ' in tag, page
            assert 'width="' in tag and 'height="' in tag and 'width="0"' not in tag, page


def test_unit_pages_show_variants_curve_and_neighbours(atlas_out):
    page = (atlas_out / "site" / "conv2" / "1.html").read_text()
    assert page.count('src="img/1.0.webp"') == 2  # the main image and the first variant
    assert 'src="img/1.1.webp"' in page and "2 diverse images" in page
    assert "<polyline" in page
    assert 'data-previous="0.html"' in page and 'data-next="2.html"' in page
    assert 'href="index.html#c1"' in page


def test_logits_grid_shows_labels_and_the_search_index_lists_every_unit(atlas_out):
    grid = (atlas_out / "site" / "logits" / "index.html").read_text()
    assert "Class logits" in grid and "8 hen" in " ".join(grid.split())
    search = (atlas_out / "site" / "search-index.js").read_text()
    assert search.startswith("window.ATLAS_SEARCH = [")
    assert '["logits:8", "hen", "logits/8.html", []]' in search


def test_curve_points_fill_the_box():
    points = curve_points([[0, 1.0], [5, 3.0], [10, 2.0]], width=100, height=50)
    assert points == "0.0,50.0 50.0,0.0 100.0,25.0"
    assert curve_points([[0, 1.0]]) == ""


def test_large_images_get_thumbnails_and_small_ones_are_their_own(tmp_path):
    make_atlas(tmp_path, {"conv2": 2}, image_size=300)
    render(tmp_path)
    with Image.open(tmp_path / "site" / "conv2" / "img" / "0.thumb.webp") as thumb:
        assert max(thumb.size) == 128
    grid = (tmp_path / "site" / "conv2" / "index.html").read_text()
    assert 'width="128" height="128"' in grid
    assert 'width="300" height="300"' in (tmp_path / "site" / "conv2" / "0.html").read_text()


def test_rendering_again_rewrites_nothing(atlas_out):
    before = {p: p.stat().st_mtime_ns for p in (atlas_out / "site").rglob("*") if p.is_file()}
    render(atlas_out)
    after = {p: p.stat().st_mtime_ns for p in (atlas_out / "site").rglob("*") if p.is_file()}
    assert before == after


def test_pages_and_images_of_pruned_units_leave_the_site(tmp_path):
    make_atlas(tmp_path, {"conv2": 4, "logits": 2}, image_size=300)
    render(tmp_path)
    (tmp_path / "site/notes.txt").write_text("mine")
    Store(tmp_path).remove_unit("conv2", 3)
    for name in ("0", "1"):
        Store(tmp_path).remove_unit("logits", int(name))
    plan = Store(tmp_path).read_plan()
    plan["units"] = [u for u in plan["units"] if u["layer"] == "conv2" and u["index"] != 3]
    plan["layers"] = [layer for layer in plan["layers"] if layer["name"] == "conv2"]
    Store(tmp_path).write_plan(plan)
    Store(tmp_path).write_manifest()
    render(tmp_path)
    site = tmp_path / "site"
    assert not (site / "conv2/3.html").exists()
    assert sorted(p.name for p in (site / "conv2/img").iterdir()) == sorted(
        f"{i}{suffix}" for i in range(3) for suffix in (".webp", ".thumb.webp")
    )
    assert not (site / "logits").exists()  # the whole folder of a layer no longer there
    assert (site / "notes.txt").read_text() == "mine"  # not atlas's: kept
    assert (site / "static/atlas.css").is_file()


def test_a_render_sweeps_what_a_killed_render_left_and_waits_for_one_running(tmp_path):
    make_atlas(tmp_path, {"conv2": 3})
    render(tmp_path)
    leftover = tmp_path / "site" / "conv2" / ".1.html.dead.tmp"
    leftover.write_text("<html")
    with exclusive_lock(tmp_path / ".render.lock"):  # a render in progress
        waiting = threading.Thread(target=render, args=(tmp_path,))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and leftover.exists()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and not leftover.exists()


def test_renders_side_by_side_all_finish(tmp_path):
    """`atlas render` while `atlas run` renders at its end: no shared temporary names."""
    make_atlas(tmp_path, {"conv2": 24, "logits": 8}, image_size=300)  # links and thumbnails
    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda _: render(tmp_path), range(4)))
    assert len(set(pages)) == 1 and pages[0].is_file()
    side_by_side = sorted(p.relative_to(tmp_path) for p in (tmp_path / "site").rglob("*"))
    shutil.rmtree(tmp_path / "site")
    render(tmp_path)
    assert side_by_side == sorted(p.relative_to(tmp_path) for p in (tmp_path / "site").rglob("*"))


def test_the_site_never_imports_torch(atlas_out):
    code = (
        "import sys; from atlas.site import render; "
        f"render({str(atlas_out)!r}); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_render_command_and_its_errors(atlas_out, tmp_path):
    result = CliRunner().invoke(cli, ["render", str(atlas_out)])
    assert result.exit_code == 0 and "site/index.html" in result.output
    result = CliRunner().invoke(cli, ["render", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no manifest.json" in result.stderr


def test_the_files_a_build_keeps_are_its_pages_their_links_and_the_assets(tmp_path):
    """What a build writes is one list of pages; what it keeps follows from that list."""
    linked = ("img/linked.webp",)
    for name in ("old.html", *linked, "img/unlinked.webp", "static/atlas.css"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("earlier")
    search = {"search": [["conv2:0", "", "conv2/0.html", []]], "labels": {}}
    write_pages(tmp_path, [Page("search-index.js", "search-index.js", search, None, linked)])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*")) == [
        "img/linked.webp",
        "search-index.js",
        "static/atlas.css",
        "static/atlas.js",
    ]
    assert (tmp_path / "static/atlas.css").read_text() != "earlier"


def test_a_page_that_fails_to_render_is_named_with_its_unit_and_deletes_nothing(
    tmp_path, monkeypatch
):
    make_atlas(tmp_path, {"conv2": 3})
    render(tmp_path)
    before = sorted((tmp_path / "site").rglob("*"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["units"][1]["history"] = [[0, 1.0], [1, 2.0], [2, 3.0]]  # marks the unit
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    def fragile(history, *args, **kwargs):  # a bug in a page's code, hit by one unit
        if len(history) == 3:
            raise ValueError("a bug")
        return curve_points(history, *args, **kwargs)

    monkeypatch.setattr("atlas.site.units.curve_points", fragile)
    with pytest.raises(
        AtlasError, match=r"^page conv2/1\.html \(unit conv2:1\) failed: ValueError"
    ):
        render(tmp_path)
    assert sorted((tmp_path / "site").rglob("*")) == before
    result = CliRunner().invoke(cli, ["render", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: page conv2/1.html (unit conv2:1) failed: ValueError: ")
