"""Damaged stored files (unit image and JSON, plan, manifest, exemplar patches and records,
one side of a compare): each is named in one line, the command goes on where it can, and the
next `atlas run` redoes what the file held. Never a traceback."""

import json
from pathlib import Path

import pytest
from clihelpers import assert_bad_input, invoke
from synthetic import make_image_folder

import atlas.optimize
from atlas.store import Store, webp_problem, webp_size

RUN = ["tinymodels:tiny", "--layers", "conv2", "--channels", "0-3", "--classes", "0-1"]
RUN += ["--steps", "2", "--size", "32", "--scheduler", "inline"]


def warnings_in(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def truncate(path: Path, keep: float = 0.5) -> None:
    """Keep that share of the file's bytes (a cut copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def optimized(monkeypatch):
    """The units the engine optimizes, as layer:index."""
    calls = []
    real = atlas.optimize.visualize

    def counting(model, targets, recipe, **kwargs):
        calls.extend(f"{t.layer}:{t.index}" for t in targets)
        return real(model, targets, recipe, **kwargs)

    monkeypatch.setattr(atlas.optimize, "visualize", counting)
    return calls


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", *RUN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("keep", [0, 0.1, 0.9])
def test_a_corrupt_unit_image_is_named_shown_missing_and_redone(out, optimized, keep):
    truncate(out / "units/conv2/1.webp", keep)
    rendered = invoke("render", out)
    assert rendered.exit_code == 0, rendered.output
    assert warnings_in(rendered) == [
        "warning: units/conv2/1.webp is corrupt (truncated); the next atlas run redoes conv2:1"
        if keep
        else "warning: units/conv2/1.webp is corrupt (not a WebP image); "
        "the next atlas run redoes conv2:1"
    ]
    assert "Missing: planned" in (out / "site/conv2/1.html").read_text()
    assert (out / "site/conv2/0.html").is_file() and (out / "site/conv2/img/0.webp").is_file()

    status = invoke("status", out, "--json")
    assert json.loads(status.stdout)["conv2"] == {"done": 3, "missing": 1}
    assert len(warnings_in(status)) == 1

    again = invoke("run", *RUN, "--out", out)
    assert again.exit_code == 0, again.output
    assert optimized == ["conv2:1"]
    assert "1 done, 0 failed, 5 already stored" in again.stdout
    assert len(warnings_in(again)) == 1  # named once, though the store is read twice
    assert webp_problem(out / "units/conv2/1.webp") is None
    assert warnings_in(invoke("render", out)) == []


def test_the_end_of_a_run_renders_around_a_unit_it_did_not_redo(out, optimized):
    """A stale unit (no longer planned) is not redone; its damaged image must not stop the
    render that ends the run."""
    truncate(out / "units/conv2/3.webp")
    again = invoke("run", *RUN[:4], "0-2", *RUN[5:], "--out", out)
    assert again.exit_code == 0, again.output
    assert optimized == []
    assert warnings_in(again) == [
        "warning: units/conv2/3.webp is corrupt (truncated); the next atlas run redoes conv2:3"
    ]
    assert (out / "site/conv2/2.html").is_file()


def test_a_corrupt_unit_json_is_named_and_redone(out, optimized):
    truncate(out / "units/conv2/2.json")
    status = invoke("status", out, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["conv2"] == {"done": 3, "missing": 1}
    assert warnings_in(status) == [
        "warning: units/conv2/2.json is corrupt (not valid JSON); "
        "the next atlas run redoes this unit"
    ]
    again = invoke("run", *RUN, "--out", out)
    assert again.exit_code == 0, again.output
    assert optimized == ["conv2:2"]
    assert json.loads((out / "units/conv2/2.json").read_text())["status"] == "done"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("inputs", [[1]], "not enough values"),
        ("images", [3], "a file name that is not a string"),
        ("images", "1.webp", "field 'images' holds str"),
        ("status", "finished", "status 'finished' is none of"),
        ("status", 1, "status 1 is none of"),
        ("seed", "0", "field 'seed' holds str"),
        ("key", ["k"], "field 'key' holds list"),
    ],
)
def test_a_unit_json_with_a_damaged_field_is_named_and_redone(
    out, optimized, field, value, problem
):
    path = out / "units/conv2/1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    status = invoke("status", out, "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["conv2"] == {"done": 3, "missing": 1}
    (warning,) = warnings_in(status)
    assert warning.startswith("warning: units/conv2/1.json is corrupt (") and problem in warning
    again = invoke("run", *RUN, "--out", out)
    assert again.exit_code == 0 and optimized == ["conv2:1"]


@pytest.mark.parametrize("content", ["[]", '{"status": "done"}', "null", '{"layer": 3}'])
def test_a_unit_json_that_is_no_unit_record_is_named_and_redone(out, optimized, content):
    (out / "units/conv2/3.json").write_text(content)
    status = invoke("status", out, "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["conv2"] == {"done": 3, "missing": 1}
    assert warnings_in(status) == [
        "warning: units/conv2/3.json is corrupt (not a unit record); "
        "the next atlas run redoes this unit"
    ]
    again = invoke("run", *RUN, "--out", out)
    assert again.exit_code == 0 and optimized == ["conv2:3"]
    assert warnings_in(invoke("status", out)) == []


@pytest.mark.parametrize("content", ["{", "[]", '{"units": 3}'])
def test_a_corrupt_plan_stops_status_with_one_line_and_the_next_run_rewrites_it(
    out, optimized, content
):
    (out / "plan.json").write_text(content)
    assert_bad_input(invoke("status", out), str(out / "plan.json"), "is corrupt")
    again = invoke("run", *RUN, "--out", out)
    assert again.exit_code == 0, again.output
    assert optimized == []
    assert invoke("status", out).exit_code == 0


@pytest.mark.parametrize("content", ["{", "null", '{"units": {}}'])
def test_a_corrupt_manifest_is_rebuilt_by_render(out, content):
    good = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(content)
    rendered = invoke("render", out)
    assert rendered.exit_code == 0, rendered.output
    assert warnings_in(rendered) == [
        "warning: manifest.json is corrupt; rebuilt from plan.json and the unit files"
    ]
    assert json.loads((out / "manifest.json").read_text()) == good
    assert (out / "site/conv2/3.html").is_file()


def test_corrupt_exemplar_files_are_named_and_redone(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    make_image_folder(photos)
    out = tmp_path / "out"
    args = ["run", *RUN, "--exemplars", photos, "--exemplars-top", "3", "--out", out]
    assert invoke(*args).exit_code == 0
    record = json.loads((out / "exemplars/conv2/0.json").read_text())
    patch = out / record["items"][0]["image"]
    truncate(patch)
    truncate(out / "exemplars/conv2/1.json")
    truncate(out / "exemplars/summary.json")

    rendered = invoke("render", out)  # the manifest still lists the damaged patch
    assert rendered.exit_code == 0, rendered.output
    assert warnings_in(rendered) == [
        f"warning: {record['items'][0]['image']} is corrupt (truncated); "
        "the next atlas run with --exemplars redoes it"
    ]
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    named = " ".join(warnings_in(again))
    for name in ("exemplars/conv2/1.json", patch.name):  # summary.json: rewritten first
        assert name in named
    store = Store(out, warn=pytest.fail)  # repaired: nothing left to warn about
    assert {("conv2", 0), ("conv2", 1)} <= set(store.exemplars())
    assert store.exemplar_summary()["images"] > 0
    assert webp_problem(patch) is None or not patch.exists()


def test_compare_names_a_corrupt_image_of_one_side_and_goes_on(tmp_path):
    sides = {}
    for name, spec in [("a", "tinymodels:tiny"), ("b", "tinymodels:tiny_retrained")]:
        sides[name] = tmp_path / name
        result = invoke("run", spec, *RUN[1:], "--out", sides[name])
        assert result.exit_code == 0, result.output
    truncate(sides["b"] / "units/conv2/2.webp")
    result = invoke("compare", sides["a"], sides["b"], "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    assert warnings_in(result) == [
        "warning: units/conv2/2.webp is corrupt (truncated); the next atlas run redoes conv2:2"
    ]
    assert "1 only in A" in result.stdout
    compared = json.loads((tmp_path / "cmp/compare.json").read_text())
    ids = {row["id"] for layer in compared["layers"] for row in layer["units"]}
    assert "conv2:2" not in ids and "conv2:1" in ids


def test_checking_images_reads_only_their_header(tmp_path):
    """The check that every run makes of every stored image: a sound file passes, the
    usual kinds of damage do not."""
    out = tmp_path / "img.webp"
    from synthetic import webp

    data = webp(0)
    out.write_bytes(data)
    assert webp_problem(out) is None
    out.write_bytes(data + b"junk")
    assert webp_problem(out) == "is corrupt (wrong length)"
    out.write_bytes(b"\x89PNG" + data[4:])
    assert webp_problem(out) == "is corrupt (not a WebP image)"
    assert webp_problem(tmp_path / "nothing.webp") == "is missing"


@pytest.mark.parametrize(
    ("mode", "size", "options"),
    [
        ("RGB", (64, 48), {"quality": 80}),  # lossy
        ("RGB", (1000, 3), {"lossless": True}),
        ("RGBA", (50, 40), {"quality": 80}),  # extended (alpha)
    ],
)
def test_a_webp_s_size_is_read_from_its_header(tmp_path, mode, size, options):
    from PIL import Image

    path = tmp_path / "img.webp"
    Image.new(mode, size, "red").save(path, format="WEBP", **options)
    assert webp_size(path) == size
    path.write_bytes(path.read_bytes()[:20])
    assert webp_size(path) is None
    assert webp_size(tmp_path / "nothing.webp") is None
