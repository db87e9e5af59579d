"""Concepts and activation-atlas cells through the real `atlas run` (click, the inline
scheduler, the store, the site) on the planted tiny model: their pages and links, an unchanged
rerun that does nothing, channel units that keep their keys, class effects of a direction,
one-line bad input, and (in Chromium) a click on an atlas cell that opens its panel.

PlantedNet's head reads class "up" = +feat.0, "down" = -feat.0, "other" = +feat.2 and "none"
nothing, so a direction's class effects are known up to its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clihelpers import assert_bad_input, invoke
from conceptmodels import noise_folder
from links import check_links, parse
from test_site_browser import browser  # noqa: F401 (a fixture)

from atlas.store import Store

RUN = ["run", "tinymodels:planted", "--layers", "feat", "--classes", "", "--steps", "4"]
RUN += ["--size", "16", "--scheduler", "inline"]
LEARN = ["--concepts", "2", "--activation-atlas", "3", "--concept-steps", "3"]
IMAGES = 40


def stored(out: Path) -> dict[str, int]:
    """Every result file under OUT (units, exemplar records, samples, dictionaries, atlases)
    by its modification time; a run's own records (plan.json, its checkpoint, locks) aside."""
    return {
        str(path.relative_to(out)): path.stat().st_mtime_ns
        for folder in ("units", "exemplars", "concepts")
        for path in (out / folder).rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory) -> dict:
    """Channels of feat first, then the same run with concepts and an atlas, then that again."""
    root = tmp_path_factory.mktemp("concepts-run")
    photos, out = noise_folder(root / "photos", IMAGES), root / "out"
    args = [*RUN, "--exemplars", photos, "--out", out]
    channels = invoke(*args)
    assert channels.exit_code == 0, channels.output
    keys = {record.id: record.key for record in Store(out).records()}
    learned = invoke(*args, *LEARN)
    assert learned.exit_code == 0, learned.output
    before = stored(out)
    again = invoke(*args, *LEARN)
    return {"out": out, "photos": photos, "args": args, "channel_keys": keys,
            "learned": learned, "before": before, "again": again}  # fmt: skip


def records(out: Path) -> dict:
    return {record.id: record for record in Store(out).records()}


def test_adding_concepts_leaves_every_channel_unit_as_it_was(atlas_run):
    out, keys = atlas_run["out"], atlas_run["channel_keys"]
    assert sorted(keys) == ["feat:0", "feat:1", "feat:2", "feat:3"]
    found = records(out)
    assert {name: found[name].key for name in keys} == keys
    concepts = sorted(name for name in found if ":concept" in name)
    cells = sorted(name for name in found if ":cell" in name)
    assert concepts == ["feat:concept0", "feat:concept1"] and 1 <= len(cells) <= 9
    output = atlas_run["learned"].output
    done = len(concepts) + len(cells)
    assert f"{done} units to do, 4 already stored" in output  # the channels are not redone
    steps = {name: 1 + max(step for step, _ in record.history) for name, record in found.items()}
    assert {steps[name] for name in keys} == {4}  # the recipe's
    assert {steps[name] for name in concepts + cells} == {3}  # --concept-steps
    assert "concepts: learned feat;" in output


def test_an_unchanged_rerun_learns_nothing_and_optimizes_nothing(atlas_run):
    again, out = atlas_run["again"], atlas_run["out"]
    assert again.exit_code == 0, again.output
    total = len(records(out))
    assert f"0 done, 0 failed, {total} already stored" in again.output
    assert "concepts:" not in again.output and "images" not in again.output
    assert stored(out) == atlas_run["before"]  # not one file written, none removed


def test_the_layer_page_links_its_concepts_and_atlas_and_every_link_resolves(atlas_run):
    site = atlas_run["out"] / "site"
    assert check_links(site) > 0  # every href and src of every page is a file of the site
    layer = [value for _, _, value in parse(site / "feat" / "index.html").links]
    assert "../feat~concepts/0.html" in layer and "../feat~concepts/1.html" in layer
    assert "../feat~atlas/index.html" in layer
    atlas_page = parse(site / "feat~atlas" / "index.html")
    panels = [i for i in atlas_page.ids if i.startswith("cell")]
    cells = [v for t, n, v in atlas_page.links if t == "a" and v.startswith("#cell")]
    assert panels and sorted(cells) == sorted(f"#{panel}" for panel in panels)
    concept = parse(site / "feat~concepts" / "0.html")
    pictures = [v for t, n, v in concept.links if t == "img" and n == "src"]
    assert any("/ex/" in src or src.startswith("ex/") for src in pictures), pictures
    for src in pictures:
        assert (site / "feat~concepts" / src).is_file(), src


def test_a_directions_class_effects_are_measured_and_shown(atlas_run):
    out = atlas_run["out"]
    found = records(out)
    for name in ("feat:concept0", "feat:concept1"):
        record = found[name]
        effects = dict(record.classes)
        weights = dict(map(tuple, record.direction["channels"]))
        assert 3 not in effects or abs(effects[3]) < 1e-3  # "none" reads nothing
        if weights.get(0, 0.0) > 0.1:  # feat.0 is "up" and minus "down"
            assert effects[0] > 0 and effects[1] == pytest.approx(-effects[0], rel=1e-3)
    top = max(("feat:concept0", "feat:concept1"), key=lambda n: found[n].direction["share"])
    assert found[top].classes, "no class effect measured for the largest concept"
    page = (out / "site" / "feat~concepts" / f"{top.split('concept')[1]}.html").read_text()
    label = ("up", "down", "other", "none")[found[top].classes[0][0]]
    assert label in page.split("Pushes up", 1)[1]  # the class it pushes most, listed there


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--concepts", "2"], ["add --exemplars DIR"]),
        (["--concepts", "5", "PHOTOS"], ["5 concepts are more than feat's 4 channels"]),
        (["--concepts", "3", "FEW"], ["need at least 3 images", "add images or ask for fewer"]),
        (["--activation-atlas", "20", "FEW"], ["20 x 20 activation atlas", "at least 400"]),
        (["--concepts", "2", "--concept-layers", "mix", "PHOTOS"], ["'mix' is not planned"]),
        (["--concepts", "0", "PHOTOS"], ["'--concepts'", "x>=1"]),
        (["--concepts", "-3", "PHOTOS"], ["'--concepts'", "x>=1"]),
        (["--activation-atlas", "0", "PHOTOS"], ["'--activation-atlas'", "x>=2"]),
        (["--activation-atlas", "-1", "PHOTOS"], ["'--activation-atlas'", "x>=2"]),
    ],
)
def test_bad_concept_input_is_one_line_and_exit_2(tmp_path, atlas_run, extra, fragments):
    few = noise_folder(tmp_path / "few", 2)
    folders = {"PHOTOS": atlas_run["photos"], "FEW": few}
    args = []
    for word in extra:
        args += ["--exemplars", folders[word]] if word in folders else [word]
    result = invoke(*RUN, "--out", tmp_path / "out", *args)
    assert_bad_input(result, *fragments)
    assert not (tmp_path / "out" / "concepts").exists()  # refused before any work


@pytest.mark.slow  # the browser
def test_clicking_an_atlas_cell_opens_its_panel_with_exemplars_and_top_channels(
    atlas_run,
    browser,  # noqa: F811
):
    page_path = atlas_run["out"] / "site" / "feat~atlas" / "index.html"
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(5000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(page_path.as_uri())
    first = page.locator("a.atlas-cell").first
    panel_id = first.get_attribute("href").lstrip("#")
    panel = page.locator(f"section#{panel_id}")
    assert not panel.is_visible()
    first.click()
    panel.wait_for(state="visible")
    assert page.url.endswith(f"#{panel_id}")
    assert panel.get_by_role("heading", name="Top channels of feat").is_visible()
    assert panel.get_by_role("heading", name="Exemplars").is_visible()
    assert panel.locator(".exemplars img").count() > 0
    loaded = f"Array.from(document.querySelectorAll('#{panel_id} img'))"
    loaded += ".every(img => img.complete && img.naturalWidth > 0)"
    page.wait_for_function(loaded, timeout=5000)  # the panel's pictures (lazy) load once shown
    panel.get_by_role("link", name="close").click()
    panel.wait_for(state="hidden")
    assert not errors, errors
    context.close()


def test_a_second_checkpoint_keeps_the_firsts_concept_pictures_and_matches_concepts(tmp_path):
    """Nightly: day-2 changes feat's filters; each concept's filmstrip holds a picture of each
    checkpoint (day-1's still on disk), with the cosine it was matched at; cells get none."""
    import torch

    from atlas import models

    module = models.load("tinymodels:planted").module
    state = {name: value.clone() for name, value in module.state_dict().items()}
    torch.save(state, tmp_path / "day-1.pt")
    state["feat.0.weight"][2] *= 1.5
    torch.save(state, tmp_path / "day-2.pt")
    photos, out = noise_folder(tmp_path / "photos", IMAGES), tmp_path / "out"
    for day in ("day-1", "day-2"):
        args = [*RUN, *LEARN, "--exemplars", photos, "--out", out, "--label", day]
        result = invoke(*args, "--weights", tmp_path / f"{day}.pt")
        assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["label"] for c in manifest["checkpoints"]] == ["day-1", "day-2"]
    units = {unit["id"]: unit for unit in manifest["units"]}
    for name in ("feat:concept0", "feat:concept1"):
        frames = units[name]["filmstrip"]
        assert [frame["checkpoint"] for frame in frames] == [
            c["id"] for c in manifest["checkpoints"]
        ]
        assert all((out / frame["image"]).is_file() for frame in frames)
        assert isinstance(units[name]["direction"]["matched"], float)  # matched to day-1's
    assert len(list((out / "concepts" / "feat").glob("samples-*.npz"))) == 2  # none removed
    cell = next(name for name in units if ":cell" in name)
    page = (out / "site" / "feat~atlas" / f"{units[cell]['index']}.html").read_text()
    assert 'id="filmstrip"' not in page and "a cell has no history" in page
