"""What a unit is for, on the site: inputs, outputs (derived from the next layer's inputs),
classes, activation maps and trust, and the layer grid's data for sorting and filtering."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from links import check_links
from PIL import Image
from synthetic import make_atlas, purposes, webp

from atlas.record import LOW_TRUST, UnitRecord
from atlas.site import load_manifest, render, site_pages
from atlas.store import Store

LAYERS = {"conv1": 6, "conv2": 12, "logits": 10}
LABELS = {0: "tench", 1: "goldfish", 8: "hen"}  # logits:2 has no label
A, B, C = 4, 5, 6  # conv1:4 is planted as the top input of conv2:5 and the worst of conv2:6
SCORED = [0, 1, 3, 5, 6, 8, 9, 11]  # conv2 units with a score (7 failed; see planted())
LOW = [i for i in SCORED if ((i * 37) % 100) / 100 < LOW_TRUST]  # purposes()


def planted() -> dict:
    analysis = purposes(LAYERS)
    analysis[("conv2", B)]["inputs"] = [[A, 5.0], [0, 0.2], [1, -0.3]]
    analysis[("conv2", C)]["inputs"] = [[2, 0.3], [A, -3.0]]
    # a done input, one not in the atlas, a missing one (conv1:3); an inhibiting one
    analysis[("conv2", 1)]["inputs"] = [[1, 0.9], [99, 0.5], [3, 0.45], [2, -0.7]]
    analysis[("conv2", 1)]["classes"] = [[1, 2.5], [42, 1.25], [2, -1.5], [8, -0.5]]
    # more inputs than a page shows, none of them in the atlas
    strong = [[20 + k, round(1.0 - 0.05 * k, 2)] for k in range(10)]
    analysis[("conv2", 11)]["inputs"] = strong + [[40 + k, -0.1 * (k + 1)] for k in range(5)]
    analysis[("conv2", 2)]["trust"] = {"unit_key": "an-older-key", "score": 0.9, "layers": {}}
    analysis[("conv2", 4)]["trust"] = {"score": None, "layers": {}}
    del analysis[("conv2", 10)]["trust"]  # no exemplars
    return analysis


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("purpose")
    make_atlas(out, LAYERS, labels=LABELS, analysis=planted(), missing={"conv1": [3]})
    render(out)
    return out


class Sections(HTMLParser):
    """A page's link lists by "<h2> / <h3>", each item as (href, thumbnail src, name, weight
    text); and the text of every h2 section."""

    def __init__(self):
        super().__init__()
        self.lists: dict[str, list[tuple]] = {}
        self.text: dict[str, str] = {}
        self.h2 = self.h3 = ""
        self._heading: str | None = None
        self._item: dict | None = None
        self._span: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h2", "h3"):
            self._heading = tag
            setattr(self, tag, "")
            if tag == "h2":
                self.h3 = ""
        elif tag == "li" and "links" in self._list_class:
            self._item = {"href": None, "src": None, "name": "", "weight": ""}
        elif tag == "ol":
            self._list_class = attrs.get("class", "")
        elif self._item is not None and tag == "a":
            self._item["href"] = attrs["href"]
        elif self._item is not None and tag == "img":
            self._item["src"] = attrs["src"]
        elif self._item is not None and tag == "span":
            self._span = attrs.get("class", "").split()[0]

    _list_class = ""

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            if tag == "h2":
                self.text[self.h2] = ""
            self._heading = None
        elif tag == "li" and self._item is not None:
            item = self._item
            self.lists.setdefault(f"{self.h2} / {self.h3}", []).append(
                (item["href"], item["src"], item["name"], item["weight"])
            )
            self._item = None
        elif tag == "span":
            self._span = None
        elif tag in ("section", "main"):  # the sections end there, the footer is no section's
            self.h2 = ""

    def handle_data(self, data):
        if self._heading:
            setattr(self, self._heading, getattr(self, self._heading) + data.strip())
            return
        if self._item is not None and self._span in ("name", "weight"):
            self._item[self._span] += data.strip()
        if self.h2 in self.text:
            self.text[self.h2] += data + " "  # table cells are words apart


def sections(out: Path, page: str) -> Sections:
    parser = Sections()
    parser.feed((out / "site" / page).read_text())
    parser.close()
    parser.text = {key: " ".join(text.split()) for key, text in parser.text.items()}
    return parser


def html(out: Path, page: str) -> str:
    return " ".join((out / "site" / page).read_text().split())


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def test_inputs_link_to_their_units_pages_with_signed_weights(out):
    page = sections(out, "conv2/1.html")
    assert page.lists["Inputs / Excited by"] == [
        ("../conv1/1.html", "../conv1/img/1.thumb.webp", "1", "+0.9"),
        (None, None, "99", "+0.5"),  # not in the atlas: the channel number alone
        ("../conv1/3.html", None, "3", "+0.45"),  # planned, not computed: no thumbnail
    ]
    assert page.lists["Inputs / Inhibited by"] == [
        ("../conv1/2.html", "../conv1/img/2.thumb.webp", "2", "-0.7")
    ]
    assert "The channels of conv1 that drive this unit most" in page.text["Inputs"]


def test_a_page_shows_the_six_strongest_exciting_and_three_inhibiting_inputs(out):
    page = sections(out, "conv2/11.html")
    up = page.lists["Inputs / Excited by"]
    down = page.lists["Inputs / Inhibited by"]
    assert [(name, weight) for *_, name, weight in up] == [
        ("20", "+1"),
        ("21", "+0.95"),
        ("22", "+0.9"),
        ("23", "+0.85"),
        ("24", "+0.8"),
        ("25", "+0.75"),
    ]
    assert [(name, weight) for *_, name, weight in down] == [
        ("44", "-0.5"),
        ("43", "-0.4"),
        ("42", "-0.3"),
    ]


def test_outputs_are_the_next_layers_units_that_list_this_one_as_an_input(out):
    """conv2:5 lists conv1:4 as its top input: conv1:4's top output is conv2:5."""
    page = sections(out, f"conv1/{A}.html")
    excites = page.lists["Outputs / Excites"]
    assert excites[0] == (f"../conv2/{B}.html", f"../conv2/img/{B}.thumb.webp", str(B), "+5")
    # purposes(): conv2:i lists conv1:(i % 6) at +0.9, (i + 2) % 6 at +0.4, (i + 1) % 6 at -0.7
    assert [name for _, _, name, _ in excites] == ["5", "4", "10", "2", "8"]
    inhibits = page.lists["Outputs / Inhibits"]
    assert [(name, weight) for *_, name, weight in inhibits] == [
        (str(C), "-3"),
        ("3", "-0.7"),
        ("9", "-0.7"),
    ]
    assert "The units of conv2 that this unit drives most" in page.text["Outputs"]


def test_the_last_layers_outputs_are_class_logits_and_logits_have_inputs_only(out):
    page = sections(out, "conv2/0.html")
    # purposes(): logits:k lists conv2:(k % 12) at +0.9 and conv2:((k + 2) % 12) at +0.4
    assert page.lists["Outputs / Excites"] == [
        ("../logits/0.html", "../logits/img/0.thumb.webp", "tench", "+0.9")
    ]
    logit = sections(out, "logits/8.html")
    assert [name for _, _, name, _ in logit.lists["Inputs / Excited by"]] == ["8", "10"]
    assert "The channels of conv2" in logit.text["Inputs"]
    assert "Outputs" not in logit.text and "Classes" not in logit.text


def test_no_planned_layer_before_or_after_is_said_on_the_page(out, tmp_path):
    page = sections(out, "conv1/0.html")
    assert (
        page.text["Inputs"] == "No planned layer before conv1: plan one to see this unit's inputs."
    )
    make_atlas(tmp_path, {"conv1": 3, "conv2": 3}, analysis=purposes({"conv1": 3, "conv2": 3}))
    render(tmp_path)
    page = sections(tmp_path, "conv2/0.html")
    assert page.text["Outputs"].startswith("No planned layer after conv2: plan one")
    assert page.lists["Inputs / Excited by"]  # conv1 is before it


def test_an_atlas_without_analyses_says_they_were_not_measured(tmp_path):
    make_atlas(tmp_path, {"conv1": 3, "conv2": 3})
    render(tmp_path)
    page = sections(tmp_path, "conv2/0.html")
    assert page.text["Inputs"] == "Not measured for this result."
    assert page.text["Outputs"].startswith("No planned layer after conv2")
    assert page.text["Classes"] == "Not measured for this result."
    assert "--exemplars DIR" in page.text["Trust"]
    assert "Where it fires" not in page.text
    page = sections(tmp_path, "conv1/0.html")
    assert page.text["Outputs"] == "No unit of conv2 has its inputs measured yet."


# ---------------------------------------------------------------------------------------------
# Classes and maps


def test_classes_are_labelled_and_linked_when_the_logit_is_in_the_atlas(out):
    page = sections(out, "conv2/1.html")
    assert page.lists["Classes / Pushes up"] == [
        ("../logits/1.html", "../logits/img/1.thumb.webp", "goldfish", "+2.5"),
        (None, None, "class 42", "+1.25"),  # not planned: no label known, no page
    ]
    assert page.lists["Classes / Pushes down"] == [
        ("../logits/2.html", "../logits/img/2.thumb.webp", "class 2", "-1.5"),  # no label
        ("../logits/8.html", "../logits/img/8.thumb.webp", "hen", "-0.5"),
    ]


def test_classes_the_plan_left_out_take_the_models_labels_from_plan_json(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    plan = json.loads((copy / "plan.json").read_text())
    labels = [f"label {k}" for k in range(50)]
    (copy / "plan.json").write_text(json.dumps({**plan, "labels": labels}))
    Store(copy).write_manifest()
    render(copy)
    page = sections(copy, "conv2/1.html")
    assert (None, None, "label 42", "+1.25") in page.lists["Classes / Pushes up"]  # no page
    assert page.lists["Classes / Pushes down"][0][2] == "label 2"  # its record has none
    assert '"42": "label 42"' in (copy / "site/search-index.js").read_text()


def test_the_activation_maps_are_shown_with_their_scale_and_kept_by_a_rerender(out):
    record = json.loads((out / "units/conv2/1.json").read_text())
    assert record["maps"] == "units/conv2/1.maps.webp"
    low, high = record["map_range"]
    page = html(out, "conv2/1.html")
    shown = out / "site/conv2/img/1.maps.webp"
    with Image.open(shown) as image:
        width, height = image.size
    assert f'<img src="img/1.maps.webp" width="{width}" height="{height}"' in page
    assert "Left: the map of conv2:1 on the starting image of the optimization; right: on its" in (
        page
    )
    assert f"One colour scale for both, from {low:.3f} (dark) to {high:.3f} (bright)" in page
    before = shown.stat().st_mtime_ns
    render(out)
    assert shown.is_file() and shown.stat().st_mtime_ns == before
    assert "Where it fires" not in sections(out, "logits/1.html").text  # logits have no map


def test_maps_a_unit_no_longer_has_leave_the_site(tmp_path):
    make_atlas(tmp_path, {"conv1": 3}, analysis=purposes({"conv1": 3}, trust=False))
    render(tmp_path)
    assert (tmp_path / "site/conv1/img/1.maps.webp").is_file()
    store = Store(tmp_path)
    (record,) = [r for r in store.records() if r.index == 1]
    store.save_unit(dataclasses.replace(record, map_range=None), [webp(5)])  # no maps this time
    store.write_manifest()
    render(tmp_path)
    assert not (tmp_path / "site/conv1/img/1.maps.webp").exists()
    assert "Where it fires" not in sections(tmp_path, "conv1/1.html").text
    assert (tmp_path / "site/conv1/img/2.maps.webp").is_file()


def test_a_damaged_maps_file_shows_its_unit_as_missing(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    maps = copy / "units/conv2/1.maps.webp"
    maps.write_bytes(maps.read_bytes()[:40])
    warnings = []
    render(copy, warnings.append)
    assert warnings == [
        "units/conv2/1.maps.webp is corrupt (truncated); the next atlas run redoes conv2:1"
    ]
    page = sections(copy, "conv2/1.html")
    assert "Missing: planned, not computed yet." in html(copy, "conv2/1.html")
    assert "Inputs" not in page.text and "Trust" not in page.text
    check_links(copy / "site")


# ---------------------------------------------------------------------------------------------
# Trust


def test_the_trust_section_shows_the_score_its_layers_and_how_to_read_it(out):
    page = sections(out, "conv2/1.html")
    trust = page.text["Trust"]
    assert trust.startswith("0.37 Does this picture reach the unit the way natural images do?")
    assert "its naturalness there is the share of them that lie at least as far" in trust
    assert "random images of synthetic" in trust  # the exemplar folder's name
    assert "Naturalness at each layer below it: conv1 0.37" in trust
    assert "Agreement with its exemplars: none to measure" in trust  # purposes(): odd index
    assert "low" not in trust.split("Does")[0]
    assert LOW == [0, 3, 11]
    low = sections(out, "conv2/3.html").text["Trust"]
    assert low.startswith("0.11 low Does this picture")
    assert f"Under {LOW_TRUST} the picture likely drives the unit another way" in low
    assert 'trust</dt><dd><a href="#trust">0.11</a> (low)' in html(out, "conv2/3.html")
    logit = sections(out, "logits/4.html").text["Trust"]
    assert "Naturalness at each layer below it: conv1 0.48 conv2 0.48" in logit
    assert "Agreement with its exemplars: 0.24" in logit and "patterns point where" in logit


def test_trust_says_why_when_there_is_no_score(out):
    def trust(page: str) -> str:
        return sections(out, page).text["Trust"]

    assert trust("conv1/0.html") == (
        "Unavailable for this picture: there is no layer below conv1 to judge it at, or its "
        "image could not be read."
    )
    assert trust("conv2/4.html").startswith("Unavailable for this picture: there is no layer")
    assert trust("conv2/2.html").startswith("Not computed for this picture yet")  # another key
    assert trust("conv2/10.html").startswith("Trust sets this picture among natural images")
    assert "--exemplars DIR" in trust("conv2/10.html")


def test_the_grid_flags_low_trust_and_carries_what_it_sorts_and_filters_by(out):
    grid = html(out, "conv2/index.html")
    assert grid.count('<span class="badge low-trust" title="trust ') == len(LOW)
    for index in LOW:
        cell = grid.split(f'id="c{index}"')[1].split("</a>")[0]
        assert "low trust</span>" in cell, index
        assert f'title="trust {((index * 37) % 100) / 100:.2f}, under {LOW_TRUST}:' in cell
    cell = grid.split('id="c1"')[1].split(">")[0]
    assert 'data-trust="0.3700"' in cell
    assert 'data-ratio="0.5500"' in cell  # activation 1.1 / best exemplar 2.0
    assert 'data-pushes="goldfish|class 42"' in cell
    assert "data-trust" not in grid.split('id="c10"')[1].split(">")[0]  # no exemplars
    assert f"{len(LOW)} of 12 units are marked" in grid
    assert '<option value="trust-low">' in grid and '<option value="ratio-high">' in grid
    assert 'id="pushes"' in grid
    logits = html(out, "logits/index.html")
    assert 'id="pushes"' not in logits  # class logits push no classes
    assert '<option value="trust-low">' in logits


def test_the_search_index_lists_the_classes_each_unit_pushes_up(out):
    lines = (out / "site/search-index.js").read_text().splitlines()
    entries = json.loads(lines[0].removeprefix("window.ATLAS_SEARCH = ").removesuffix(";"))
    labels = json.loads(lines[1].removeprefix("window.ATLAS_LABELS = ").removesuffix(";"))
    assert ["conv2:1", "", "conv2/1.html", [1, 42]] in entries
    assert ["logits:8", "hen", "logits/8.html", []] in entries
    assert labels == {"0": "tench", "1": "goldfish", "8": "hen"}


# ---------------------------------------------------------------------------------------------
# The site as a whole


def test_the_site_reads_unit_records_and_its_views_import_neither_torch_nor_jinja(out):
    manifest = load_manifest(out)
    pages = site_pages(out, out / "site", manifest, print)
    units = [page.context["unit"] for page in pages if page.template == "unit.html"]
    assert len(units) == sum(LAYERS.values())
    assert all(isinstance(unit.record, UnitRecord) for unit in units)
    code = "import sys, atlas.site.units; assert not {'torch', 'jinja2'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rendering_again_rewrites_nothing_and_every_link_resolves(out):
    check_links(out / "site")
    before = {p: p.stat().st_mtime_ns for p in (out / "site").rglob("*") if p.is_file()}
    render(out)
    after = {p: p.stat().st_mtime_ns for p in (out / "site").rglob("*") if p.is_file()}
    assert before == after


def test_a_manifest_entry_that_is_no_readable_record_is_rebuilt_from_the_unit_files(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["units"][1]["inputs"] = "not pairs"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    warnings = []
    render(copy, warnings.append)
    assert warnings == [
        "manifest.json is corrupt (a unit atlas cannot read); rebuilt from the unit files"
    ]
    rebuilt = json.loads((copy / "manifest.json").read_text())
    assert (
        rebuilt["units"][1]["inputs"]
        == json.loads((out / "manifest.json").read_text())["units"][1]["inputs"]
    )
    assert (copy / "site/conv1/1.html").read_text() == (out / "site/conv1/1.html").read_text()


def test_a_unit_file_with_a_damaged_field_shows_its_unit_as_missing(out, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    path = copy / f"units/conv2/{B}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "inputs": "not pairs"}))
    warnings = []
    Store(copy, warnings.append).write_manifest()
    render(copy, warnings.append)
    # named once, by the store (when from_json checks the fields) or by the site
    assert [w for w in warnings if f"units/conv2/{B}.json" in w] == warnings[-1:]
    assert "Missing: planned, not computed yet." in html(copy, f"conv2/{B}.html")
    excites = sections(copy, f"conv1/{A}.html").lists["Outputs / Excites"]
    assert f"../conv2/{B}.html" not in [href for href, *_ in excites]
    check_links(copy / "site")
