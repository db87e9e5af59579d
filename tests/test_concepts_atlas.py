"""The activation atlas: a layer's sampled activations on a UMAP grid, one direction a cell."""

import sys

import numpy as np
import pytest

from atlas.concepts.dictionary import Dictionary
from atlas.concepts.grid import (
    ActivationAtlas,
    activation_atlas,
    check_atlas,
    grid_cells,
    to_unit_square,
)
from atlas.concepts.samples import Samples
from atlas.errors import AtlasError

CLUSTERS = 4


def clustered(
    per_cluster: int = 100, channels: int = 8, seed: int = 0
) -> tuple[Samples, np.ndarray]:
    """Samples of CLUSTERS tight clusters around orthogonal directions, and each one's cluster."""
    rng = np.random.default_rng(seed)
    centres = np.eye(channels)[:CLUSTERS] * 3 + 0.5
    labels = np.repeat(np.arange(CLUSTERS), per_cluster)
    vectors = centres[labels] + 0.1 * rng.normal(size=(len(labels), channels))
    count = len(labels)
    samples = Samples(
        "mix",
        "key",
        vectors.astype(np.float32),
        np.arange(count, dtype=np.int32),
        np.zeros(count, np.int16),
        np.zeros(count, np.int16),
        (1, 1),
        tuple(f"img{i}.png" for i in range(count)),
    )
    return samples, labels


def test_grid_cells_bin_points_drop_sparse_cells_and_average_their_vectors():
    samples, labels = clustered(per_cluster=10)
    coords = np.zeros((40, 2), np.float32)
    coords[labels == 1] = (0.1, 0.9)  # row 0, column 2 of a 3 x 3 grid
    coords[labels == 2] = (0.99, 0.99)
    coords[labels == 3] = (0.5, 0.5)  # 2 left alone in the middle cell: dropped
    coords[np.flatnonzero(labels == 3)[:8]] = (1.0, 0.0)  # 8 in the corner, 2 left alone
    dictionary = Dictionary("nmf", np.eye(8, dtype=np.float32)[:4], np.zeros(8, np.float32), 4)
    cells = grid_cells(samples, coords, 3, min_count=3, dictionary=dictionary)
    assert [(c.row, c.col, c.count) for c in cells] == [
        (0, 0, 10),
        (0, 2, 10),
        (2, 0, 8),
        (2, 2, 10),
    ]
    corner = cells[1]
    np.testing.assert_allclose(corner.mean, samples.vectors[labels == 1].mean(0), rtol=1e-5)
    assert corner.concepts[0][0] == 1 and corner.channels[0][0] == 1
    assert corner.id == "mix:cell0-2" and corner.target().id == "mix:cell0-2"
    picks = corner.exemplars(samples, count=4)
    assert len(picks) == 4 and all(labels[p.sample] == 1 for p in picks)
    assert picks[0].sample == corner.members[0]


def test_the_layout_is_stretched_to_the_grid_clipping_outliers():
    layout = np.concatenate([np.linspace(0, 1, 1000)[:, None].repeat(2, 1), [[100.0, -100.0]]])
    square = to_unit_square(layout)
    assert square.min() == 0 and square.max() == 1
    assert square[500, 0] == pytest.approx(0.5, abs=0.01)  # not squeezed by the outlier


@pytest.mark.slow  # umap-learn compiles its numba code on first use (~30 s)
def test_separated_clusters_land_in_separate_cells():
    samples, labels = clustered()
    atlas = activation_atlas(samples, 6, min_count=3, seed=0)
    assert atlas.coords.shape == (400, 2) and len(atlas.cells) >= CLUSTERS
    owner = {}
    for cell in atlas.cells:
        found = set(labels[cell.members])
        assert len(found) == 1  # no cell mixes two clusters
        owner[(cell.row, cell.col)] = found.pop()
    assert set(owner.values()) == set(range(CLUSTERS))
    again = activation_atlas(samples, 6, min_count=3, seed=0)
    np.testing.assert_array_equal(again.coords, atlas.coords)  # seeded


def test_an_atlas_is_saved_and_loaded_whole(tmp_path):
    samples, labels = clustered(per_cluster=10)
    coords = np.zeros((40, 2), np.float32)
    coords[labels == 1] = (0.1, 0.9)
    dictionary = Dictionary("nmf", np.eye(8, dtype=np.float32)[:4], np.zeros(8, np.float32), 4)
    cells = grid_cells(samples, coords, 3, dictionary=dictionary)
    saved = ActivationAtlas("mix", 3, 3, coords, cells, "key")
    saved.save(tmp_path / "atlas.npz")
    loaded = ActivationAtlas.load(tmp_path / "atlas.npz")
    assert (loaded.layer, loaded.size, loaded.min_count, loaded.key) == ("mix", 3, 3, "key")
    np.testing.assert_array_equal(loaded.coords, coords)
    for before, after in zip(cells, loaded.cells, strict=True):
        assert (after.row, after.col, after.count) == (before.row, before.col, before.count)
        np.testing.assert_array_equal(after.mean, before.mean)
        np.testing.assert_array_equal(after.members, before.members)
        assert (after.channels, after.concepts) == (before.channels, before.concepts)


def test_a_folder_too_small_for_the_grid_is_one_sentence():
    with pytest.raises(AtlasError, match=r"a 20 x 20 activation atlas of mix needs at least 400"):
        check_atlas(20, "mix", 80, 80)
    with pytest.raises(AtlasError, match="use at least 400 images or a smaller grid"):
        check_atlas(20, "mix", 80, 80)
    with pytest.raises(AtlasError, match="use at least 100 images"):
        check_atlas(20, "mix", 80, 20)  # 4 vectors an image
    with pytest.raises(AtlasError, match="at least 2 x 2"):
        check_atlas(1, "mix", 80, 80)
    check_atlas(8, "mix", 80, 80)  # 80 vectors fill 8 x 8


def test_a_missing_umap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    samples, _ = clustered()
    with pytest.raises(AtlasError, match=r"umap-learn.*pip install 'atlas\[concepts\]'"):
        activation_atlas(samples, 4)
