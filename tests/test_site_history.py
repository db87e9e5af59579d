"""The nightly history on the site: each unit's filmstrip across checkpoints and its change plot,
the layer grid sorted by change since the previous checkpoint, and the index's timeline; an
atlas with no history (or one checkpoint) renders as it always has."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from links import check_links
from synthetic import add_history, history_change, make_atlas

from atlas.site import render
from atlas.site.timeline import CheckpointEntry, Frame, change_dots, timeline

LAYERS = {"conv1": 6, "conv2": 12, "logits": 4}
NAMES = ["step-10000", None, "step-12000"]  # the second has no label: shown by its id
INCOMPLETE = 1
ABSENT = 5  # conv2:5 is not in the second checkpoint
FAILED = 7  # every 8th unit (synthetic.STATUS_CYCLE): no picture, no score


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("history")
    make_atlas(out, LAYERS, labels={0: "tench"})
    manifest = add_history(
        out, NAMES, incomplete=[INCOMPLETE], absent={("conv2", ABSENT): [INCOMPLETE]}
    )
    render(out)
    return out, manifest


@pytest.fixture(scope="module")
def out(history) -> Path:
    return history[0]


@pytest.fixture(scope="module")
def checkpoints(history) -> list[dict]:
    return history[1]["checkpoints"]


class Parts(HTMLParser):
    """Of one page: the filmstrip's frames ({src, caption, current, name, date, score}), the
    change plot's dots ({cx, cy, class, title}) and ticks, the timeline's rows (cell texts),
    and the grid's cells ((id, data-change))."""

    def __init__(self):
        super().__init__()
        self.frames: list[dict] = []
        self.dots: list[dict] = []
        self.ticks = 0
        self.rows: list[list[str]] = []
        self.cells: list[tuple[str, str | None]] = []
        self._open: list[tuple[str, dict]] = []  # the elements the parser is inside
        self._span: str | None = None
        self._text: list | None = None  # where the data goes

    def inside(self, tag: str, **attrs) -> bool:
        return any(
            name == tag and all(found.get(k) == v for k, v in attrs.items())
            for name, found in self._open
        )

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "li" and self.inside("ol", id="filmstrip"):
            self.frames.append({"src": None, "current": "current" in attrs.get("class", "")})
        elif self.frames and tag == "a" and self.inside("ol", id="filmstrip"):
            self.frames[-1]["caption"] = attrs.get("data-caption")
            self.frames[-1]["shown"] = attrs.get("aria-current") == "true"
        elif self.frames and tag == "img" and self.inside("ol", id="filmstrip"):
            self.frames[-1]["src"] = attrs["src"]
        elif (
            self.frames and tag == "span" and "role" in attrs and self.inside("ol", id="filmstrip")
        ):
            self.frames[-1]["gap"] = attrs["aria-label"]
        elif tag == "span" and attrs.get("class") in ("name", "date", "score") and self.frames:
            self._span = attrs["class"]
            self.frames[-1][self._span] = ""
        elif tag == "circle":
            self.dots.append({**attrs, "title": ""})
        elif tag == "line" and attrs.get("class") == "tick":
            self.ticks += 1
        elif tag == "tr" and self.inside("tbody"):
            self.rows.append([])
        elif tag == "td" and self.rows:
            self.rows[-1].append("")
        elif tag == "a" and "cell" in attrs.get("class", ""):
            self.cells.append((attrs.get("id"), attrs.get("data-change")))
        if tag not in ("img", "line", "circle", "input", "meta", "link"):
            self._open.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag not in (name for name, _ in self._open):
            return  # a void element's
        while True:  # up to its start tag, past any left unclosed
            closed, attrs = self._open.pop()
            if closed == tag:
                break
        if tag == "span" and attrs.get("class") == self._span:
            self._span = None

    def handle_data(self, data):
        if self._span:
            self.frames[-1][self._span] += data
        elif self.inside("title") and self.dots and self.inside("svg"):
            self.dots[-1]["title"] += data
        elif self.rows and self.inside("td"):
            self.rows[-1][-1] += data


def parts(out: Path, page: str) -> Parts:
    parser = Parts()
    parser.feed((out / "site" / page).read_text())
    parser.close()
    for frame in parser.frames:
        for name in ("name", "date", "score"):
            frame[name] = " ".join(frame.get(name, "").split())
    parser.rows = [[" ".join(cell.split()) for cell in row] for row in parser.rows]
    return parser


def html(out: Path, page: str) -> str:
    return " ".join((out / "site" / page).read_text().split())


def name(entry: dict) -> str:
    return entry["label"] or entry["id"]


# ---------------------------------------------------------------------------------------------
# The unit page


def test_the_unit_page_shows_its_filmstrip_oldest_first_with_names_dates_and_scores(
    out, checkpoints
):
    page = parts(out, "conv2/4.html")
    first, middle, current = checkpoints
    assert [(f["name"], f["date"], f["score"]) for f in page.frames] == [
        ("step-10000", "2026-11-28 02:00", "first"),
        (f"{middle['id']} incomplete", "2026-11-29 02:00", f"change {history_change(4, 1):.2f}"),
        ("step-12000 (current)", "2026-11-30 02:00", f"change {history_change(4, 2):.2f}"),
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    (unit,) = [u for u in manifest["units"] if u["id"] == "conv2:4"]
    blobs = [Path(frame["image"]).name for frame in unit["filmstrip"][:2]]
    assert [f["src"] for f in page.frames] == [f"img/{blobs[0]}", f"img/{blobs[1]}", "img/4.webp"]
    for frame in page.frames:
        assert (out / "site/conv2" / frame["src"]).is_file()
    assert [f["current"] for f in page.frames] == [False, False, True]
    assert [f["shown"] for f in page.frames] == [False, False, True]  # the large picture's
    assert page.frames[1]["caption"] == (
        f"{middle['id']} · 2026-11-29 02:00 · change {history_change(4, 1):.2f} · incomplete"
    )
    text = html(out, "conv2/4.html")
    caption = f"step-12000 · 2026-11-30 02:00 · change {history_change(4, 2):.2f} · current"
    assert f'<figcaption id="shown">{caption}</figcaption>' in text
    assert (
        f'<dt>change</dt><dd><a href="#history">{history_change(4, 2):.2f}</a> since the '
        "previous checkpoint</dd>" in text
    )
    assert first["digest"][:8] in text  # in the first frame's title: its id


def test_the_change_plot_has_a_dot_per_scored_checkpoint_on_a_zero_to_one_scale(out):
    page = parts(out, "conv2/4.html")
    assert page.ticks == len(NAMES)  # one per checkpoint of the atlas
    changes = [history_change(4, 1), history_change(4, 2)]
    assert [(float(d["cx"]), float(d["cy"])) for d in page.dots] == [
        (240.0, round(120 - changes[0] * 120, 1)),
        (480.0, round(120 - changes[1] * 120, 1)),
    ]
    assert [d.get("class") for d in page.dots] == ["incomplete", None]  # hollow: incomplete
    assert page.dots[0]["title"].endswith(f"change {changes[0]:.2f} · incomplete")
    assert '<svg class="change-plot" viewBox="-8 -8 496 136" role="img"' in html(
        out, "conv2/4.html"
    )


def test_a_unit_absent_from_a_checkpoint_has_fewer_frames_and_no_score_after_the_gap(out):
    page = parts(out, f"conv2/{ABSENT}.html")
    assert [(f["name"], f["score"]) for f in page.frames] == [
        ("step-10000", "first"),
        ("step-12000 (current)", "no score"),
    ]
    assert page.dots == [] and "change-plot" not in html(out, f"conv2/{ABSENT}.html")
    assert "<dt>change</dt>" not in html(out, f"conv2/{ABSENT}.html")


def test_a_unit_without_frames_has_no_history_section(out):
    """add_history() gives failed units none (the store keeps their earlier frames)."""
    assert parts(out, f"conv2/{FAILED}.html").frames == []
    assert 'id="history"' not in html(out, f"conv2/{FAILED}.html")


# ---------------------------------------------------------------------------------------------
# The layer grid and the index


def most_changed_first(count: int, position: int) -> list[str]:
    """conv2's cells as the change sort orders them: scored units by change, most first
    (ties by index), then those with none (absent last night, failed) by index."""
    scored = [i for i in range(count) if i not in (ABSENT, FAILED)]
    ordered = sorted(scored, key=lambda i: (-history_change(i, position), i))
    return [f"c{i}" for i in ordered + sorted([ABSENT, FAILED])]


def test_the_layer_grid_is_sorted_by_change_since_the_previous_checkpoint_by_default(
    out, checkpoints
):
    grid = parts(out, "conv2/index.html")
    expected = most_changed_first(LAYERS["conv2"], 2)
    assert [cell for cell, _ in grid.cells] == expected
    assert expected[0] == "c4"  # history_change(4, 2) = 0.94, the most changed
    changes = dict(grid.cells)
    assert changes["c4"] == f"{history_change(4, 2):.4f}"
    assert changes[f"c{ABSENT}"] is None and changes[f"c{FAILED}"] is None
    text = html(out, "conv2/index.html")
    assert '<select id="sort" data-default="change-high">' in text
    assert (
        '<option value="change-high" selected>change since the previous checkpoint, most '
        "first</option>" in text
    )
    assert text.count('<span class="badge change"') == len(expected) - 2
    assert f"Δ{history_change(4, 2):.2f}</span>" in text.split('id="c4"')[1].split("</a>")[0]
    changed = text.split('id="changed">')[1].split("</p>")[0]
    middle, current = checkpoints[1:]
    assert f'>{middle["id"]}</span> <span class="badge incomplete">incomplete</span>' in changed
    assert ">step-12000</span> (2026-11-30 02:00)" in changed


def test_the_index_shows_the_timeline_with_each_layers_mean_change(out, checkpoints):
    rows = parts(out, "index.html").rows
    assert len(rows) == len(NAMES)
    expected = []
    for position, entry in enumerate(checkpoints):
        means = [entry["mean_change"][layer] for layer in LAYERS]
        expected.append(
            [
                name(entry) + (" (current)" if entry["current"] else ""),
                f"2026-11-{28 + position} 02:00",
                entry["digest"][:8],
                str(entry["units"]),
                "incomplete" if position == INCOMPLETE else "complete",
                *("-" if mean is None else f"{mean:.2f}" for mean in means),
            ]
        )
    assert rows == expected
    assert rows[0][5:] == ["-", "-", "-"]  # nothing before the first checkpoint
    assert html(out, "index.html").count('<tr class="current">') == 1


def test_history_pages_link_only_files_in_the_site_and_a_rerender_rewrites_nothing(out):
    check_links(out / "site")
    before = {p: p.stat().st_mtime_ns for p in (out / "site").rglob("*") if p.is_file()}
    render(out)
    after = {p: p.stat().st_mtime_ns for p in (out / "site").rglob("*") if p.is_file()}
    assert before == after


def test_frames_of_a_pruned_checkpoint_leave_the_site(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    oldest = manifest["checkpoints"].pop(0)["id"]
    pruned = []
    for unit in manifest["units"]:
        pruned += [f["image"] for f in unit.get("filmstrip", []) if f["checkpoint"] == oldest]
        unit["filmstrip"] = [f for f in unit.get("filmstrip", []) if f["checkpoint"] != oldest]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    render(copy)
    assert pruned and not any(
        (copy / "site" / layer / "img" / Path(image).name).exists()
        for image in pruned
        for layer in LAYERS
    )
    assert [f["name"] for f in parts(copy, "conv2/4.html").frames] == [
        f"{manifest['checkpoints'][0]['id']} incomplete",
        "step-12000 (current)",
    ]
    check_links(copy / "site")


def test_a_frame_whose_file_is_gone_is_a_gap_and_a_damaged_one_is_named(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "site")
    manifest = json.loads((copy / "manifest.json").read_text())
    (unit,) = [u for u in manifest["units"] if u["id"] == "conv2:4"]
    gone, damaged = (frame["image"] for frame in unit["filmstrip"][:2])  # conv1:4's too
    (copy / gone).unlink()
    (copy / damaged).write_bytes((copy / damaged).read_bytes()[:30])
    warnings = []
    render(copy, warnings.append)
    # named once, though conv1:4 has the same picture there (blobs are stored by content)
    assert warnings == [f"{damaged} is corrupt (truncated); its filmstrip frame is left as a gap"]
    assert parts(copy, "conv1/4.html").frames[1]["src"] is None
    frames = parts(copy, "conv2/4.html").frames
    assert [f["src"] for f in frames] == [None, None, "img/4.webp"]
    assert [f.get("gap") for f in frames[:2]] == [
        "no picture of checkpoint step-10000",
        f"no picture of checkpoint {manifest['checkpoints'][1]['id']}",
    ]
    assert [f["score"] for f in frames] == [
        "first",
        f"change {history_change(4, 1):.2f}",  # a gap keeps its score
        f"change {history_change(4, 2):.2f}",
    ]
    check_links(copy / "site")


# ---------------------------------------------------------------------------------------------
# No history: the pages as they were


def site_text(out: Path) -> dict[str, str]:
    return {
        page.relative_to(out / "site").as_posix(): page.read_text()
        for page in sorted((out / "site").rglob("*.html"))
    }


def test_an_atlas_without_checkpoints_or_with_one_renders_as_before(tmp_path):
    make_atlas(tmp_path, LAYERS)
    render(tmp_path)
    before = site_text(tmp_path)
    for page, text in before.items():
        for mark in ("filmstrip", "change-plot", "timeline", "change-high", "badge change"):
            assert mark not in text, (page, mark)
    add_history(tmp_path, ["step-1"])  # one checkpoint: its units' frames are their images
    render(tmp_path)
    assert site_text(tmp_path) == before
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "checkpoints": "damaged"}))
    render(tmp_path)
    assert site_text(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# The views of the history, alone


def test_timeline_reads_the_manifest_tolerantly():
    entries = [
        {"id": "001-aa", "label": "a", "started": "2026-11-28T02:00:00+00:00", "units": 3},
        "not a checkpoint",
        {"label": "no id"},
        {"id": "002-bb", "label": 7, "complete": False, "current": True, "mean_change": {"x": "?"}},
    ]
    first, second = timeline({"checkpoints": entries})
    assert (first.name, first.date, first.complete, first.units) == (
        "a",
        "2026-11-28 02:00",
        True,
        3,
    )
    assert (second.name, second.complete, second.current) == ("002-bb", False, True)
    assert second.mean_change == {"x": None}
    assert timeline({"checkpoints": entries[:1]}) == [] and timeline({}) == []


def test_change_dots_span_the_timeline_and_skip_frames_without_a_score():
    def frame(position, change):
        return Frame(CheckpointEntry(f"{position}"), change, None, position)

    frames = [frame(0, None), frame(1, 0.25), frame(3, 1.5), frame(None, 0.5)]
    dots = change_dots(frames, checkpoints=5, width=100, height=40)
    assert [(x, y) for x, y, _ in dots] == [(25.0, 30.0), (75.0, 0.0)]  # 1.5 is clipped to 1


def test_the_pages_history_imports_neither_torch_nor_jinja_nor_pillow():
    code = (
        "import sys, atlas.site.timeline; "
        "assert not {'torch', 'jinja2', 'PIL'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
