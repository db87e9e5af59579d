"""atlas compare: two atlases side by side, the most changed units first."""

import json
import re

import pytest
from click.testing import CliRunner
from links import check_links

import atlas.compare
from atlas.cli import cli

RUN = ["--layers", "conv2", "--channels", "0-5", "--classes", "", "--steps", "4", "--size", "32"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlases")
    for name, spec in [("a", "tinymodels:tiny"), ("b", "tinymodels:tiny_retrained")]:
        result = invoke("run", spec, *RUN, "--scheduler", "inline", "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_the_deliberately_changed_unit_is_found_first(atlases):
    result = invoke("compare", atlases / "a", atlases / "b", "--out", atlases / "cmp")
    assert result.exit_code == 0, result.output
    assert "compared 6 units in 1 layers (0 only in A, 0 only in B)" in result.output
    assert "most changed: conv2:3 (" in result.output
    report = json.loads((atlases / "cmp/compare.json").read_text())
    (layer,) = report["layers"]
    ranked = [unit["id"] for unit in layer["units"]]
    assert ranked[0] == "conv2:3"
    changes = {unit["id"]: unit["change"] for unit in layer["units"]}
    assert changes["conv2:3"] > 0.5
    assert all(changes[f"conv2:{i}"] < 0.01 for i in (0, 1, 2, 4, 5))  # same filters, same images
    assert report["a"]["spec"] == "tinymodels:tiny"
    assert report["b"]["spec"] == "tinymodels:tiny_retrained"

    grid = (atlases / "cmp/conv2/index.html").read_text()
    assert grid.index('id="c3"') < min(grid.index(f'id="c{i}"') for i in (0, 1, 2, 4, 5))
    page = (atlases / "cmp/conv2/3.html").read_text()
    assert 'src="img/3.a.webp"' in page and 'src="img/3.b.webp"' in page
    assert "rank 1 of 6" in page
    index = (atlases / "cmp/index.html").read_text()
    assert 'href="conv2/3.html"' in index
    assert (atlases / "cmp/conv2/img/3.b.webp").is_file()


def test_scoring_in_chunks_gives_what_one_pass_gives(atlases, tmp_path, monkeypatch):
    def scores(dest):
        result = invoke("compare", atlases / "a", atlases / "b", "--out", dest)
        assert result.exit_code == 0, result.output
        (layer,) = json.loads((dest / "compare.json").read_text())["layers"]
        return layer["units"]

    whole = scores(tmp_path / "whole")
    monkeypatch.setattr(atlas.compare, "CHUNK", 4)  # 6 units: a full chunk and a partial one
    chunked = scores(tmp_path / "chunked")
    assert len(chunked) == len(whole)
    for split, one_pass in zip(chunked, whole, strict=True):
        assert split == pytest.approx(one_pass, nan_ok=True)


def test_two_recipes_of_one_model(atlases, tmp_path):
    other = tmp_path / "plain"
    run = invoke(
        "run", "tinymodels:tiny", *RUN, "--recipe", "plain", "--scheduler", "inline", "--out", other
    )
    assert run.exit_code == 0, run.output
    result = invoke("compare", atlases / "a", other, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert report["a"]["recipe"] == "fourier" and report["b"]["recipe"] == "plain"
    assert report["matched"] == 6


@pytest.mark.parametrize("where", ["a", ".", "a/pages"])
def test_pages_never_go_inside_or_around_an_atlas(atlases, where):
    """The pages' folder is cleaned of stale pages: it must not hold an atlas's images."""
    images = sorted((atlases / "a/units").rglob("*.webp"))
    result = invoke("compare", atlases / "a", atlases / "b", "--out", atlases / where)
    assert result.exit_code == 2 and "overlaps the atlas" in result.output
    assert sorted((atlases / "a/units").rglob("*.webp")) == images


def test_pages_never_go_into_a_folder_of_other_files(atlases, tmp_path):
    (tmp_path / "mine.html").write_text("mine")
    result = invoke("compare", atlases / "a", atlases / "b", "--out", tmp_path)
    assert result.exit_code == 2 and "holds other files" in result.output
    assert (tmp_path / "mine.html").read_text() == "mine"


def test_comparing_again_into_the_same_folder_drops_stale_pages(atlases, tmp_path):
    out = tmp_path / "cmp"
    assert invoke("compare", atlases / "a", atlases / "b", "--out", out).exit_code == 0
    (out / "conv2/99.html").write_text("a pair page from an earlier, larger compare")
    (out / "conv2/img/99.a.webp").write_bytes(b"old")
    assert invoke("compare", atlases / "a", atlases / "b", "--out", out).exit_code == 0
    assert not (out / "conv2/99.html").exists() and not (out / "conv2/img/99.a.webp").exists()
    assert (out / "conv2/3.html").is_file() and (out / "compare.json").is_file()


@pytest.mark.parametrize(
    "which, message",
    [("missing", "is not an atlas"), ("same", "two different atlas folders")],
)
def test_bad_input_is_one_line(atlases, tmp_path, which, message):
    b = tmp_path / "nothing" if which == "missing" else atlases / "a"
    result = invoke("compare", atlases / "a", b, "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and message in result.output


def test_every_compare_link_resolves(atlases):
    result = invoke("compare", atlases / "a", atlases / "b", "--out", atlases / "links")
    assert result.exit_code == 0, result.output
    assert check_links(atlases / "links") > 6 * 4  # per pair page: css, js, home, pager, images


def test_a_pair_page_that_fails_to_render_is_named_with_its_unit(atlases, tmp_path, monkeypatch):
    def with_a_bad_value(*args):
        pages = build(*args)
        pages[-1].context["row"]["a_on_a"] = "not a number"  # only the pair page shows it
        return pages

    build = atlas.compare.compare_pages
    monkeypatch.setattr(atlas.compare, "compare_pages", with_a_bad_value)
    result = invoke("compare", atlases / "a", atlases / "b", "--out", tmp_path / "cmp")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(
        r"error: page conv2/(\d)\.html \(unit conv2:\1\) failed: ValueError: .*", line
    )
