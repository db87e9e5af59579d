"""What a later run makes of concepts and atlases an earlier one stored: a smaller atlas's page
shows only its own cells, damaged stored files are named and learned again, and layers that
say nothing give a one-line error or no cell; and what `atlas plan` times for learned layers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from clihelpers import invoke
from conceptmodels import noise_folder
from test_concepts_pipeline import IMAGES, RUN

from atlas.concepts.dictionary import learn
from atlas.concepts.grid import grid_cells
from atlas.concepts.samples import Samples
from atlas.errors import AtlasError
from atlas.plan_report import shape_groups


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return noise_folder(tmp_path / "photos", IMAGES)


def run(photos: Path, out: Path, *extra: str):
    result = invoke(*RUN, "--exemplars", photos, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return result


def grid_places(out: Path) -> list[tuple[int, int]]:
    page = (out / "site" / "feat~atlas" / "index.html").read_text()
    rows = re.findall(r"grid-row: (\d+); grid-column: (\d+)", page)
    return [(int(row), int(col)) for row, col in rows]


def test_a_smaller_atlas_shows_only_its_own_cells(tmp_path, photos):
    """A 4 x 4 atlas, then a 2 x 2 one into the same OUT: the 4 x 4's cells stay stored (no
    run removes them) but the page's grid holds only the 2 x 2's, all inside it."""
    out = tmp_path / "out"
    run(photos, out, "--activation-atlas", "4", "--concept-steps", "2")
    assert max(max(place) for place in grid_places(out)) > 2
    run(photos, out, "--activation-atlas", "2", "--concept-steps", "2")
    places = grid_places(out)
    assert places and all(row <= 2 and col <= 2 for row, col in places)
    assert len(places) == len(set(places))
    manifest = json.loads((out / "manifest.json").read_text())
    stale = [u for u in manifest["units"] if u["layer"] == "feat~atlas" and u["status"] == "stale"]
    assert stale, "the earlier atlas's cells are kept"


def test_damaged_learned_files_are_named_and_learned_again(tmp_path, photos):
    """learned.json without its concepts' facts, then an empty dictionary file: each rerun
    names the file, learns the concepts again and ends well."""
    out = tmp_path / "out"
    args = ("--concepts", "2", "--concept-steps", "2")
    run(photos, out, *args)
    learned = out / "concepts" / "feat" / "learned.json"
    state = json.loads(learned.read_text())
    del state["concepts"]["units"]
    learned.write_text(json.dumps(state))
    again = run(photos, out, *args)
    assert "learned.json has a damaged concepts entry" in again.output
    (dictionary,) = (out / "concepts" / "feat").glob("dictionary-*.npz")
    dictionary.write_bytes(b"")
    repaired = run(photos, out, *args)
    assert f"{dictionary.name} is corrupt" in repaired.output
    assert np.load(dictionary)  # stored whole again


def test_silent_activations_are_one_error_and_no_cell():
    """A layer whose sampled activations are all zero has no concepts (an AtlasError, which
    the command line prints as one line) and no cell to draw."""
    with pytest.raises(AtlasError, match="all zero"):
        learn(np.zeros((64, 8), np.float32), 2)
    vectors = np.zeros((40, 4), np.float32)
    vectors[20:] = [1.0, 0.5, 0.0, 0.0]  # half silent, half loud
    zeros = np.zeros(40, np.int32)
    samples = Samples("feat", "key", vectors, zeros, zeros, zeros, (1, 1), ("a.png",))
    coords = np.repeat([[0.1, 0.1], [0.9, 0.9]], 20, axis=0)  # the silent half in one cell
    cells = grid_cells(samples, coords, 2)
    assert [(cell.row, cell.col) for cell in cells] == [(1, 1)]


def test_plan_times_learned_layers_by_their_real_layers_shape():
    """Concepts of two layers of different shapes are timed apart, and apart from their
    channels (another step count); layers of one shape share one timing."""

    class Info:
        def __init__(self, name, shape):
            self.name, self.shape, self.kind = name, shape, "map"

    class Plan:
        layers = [Info("a", (8, 4, 4)), Info("b", (8, 4, 4)), Info("c", (16, 2, 2))]

    names = ["a", "b", "c", "a~concepts", "b~concepts", "c~concepts", "c~atlas"]
    groups = shape_groups(Plan(), names)
    assert sorted(map(sorted, groups.values())) == sorted(
        [["a", "b"], ["c"], ["a~concepts", "b~concepts"], ["c~concepts"], ["c~atlas"]]
    )
