"""Concepts: bounded activation samples of a layer, dictionaries that recover planted
directions, what a concept page shows, and one-sentence errors."""

import sys

import numpy as np
import pytest
import torch
from conceptmodels import noise_folder, planted_directions, planted_model
from PIL import Image
from synthetic import make_image_folder
from test_layout import ChannelsLast, TinyViT, raw_output, wrap

from atlas.concepts.describe import (
    FiringTask,
    best_samples,
    describe,
    firing_task,
    patches,
    top_channels,
)
from atlas.concepts.dictionary import Dictionary, check_concepts, learn, learn_concepts
from atlas.concepts.samples import Collection, Samples, Sampling, collect, sample_task
from atlas.errors import AtlasError
from atlas.exemplars import read_blobs

PLANTED = 4
CHANNELS = 12


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    return noise_folder(tmp_path_factory.mktemp("noise"), 60)


@pytest.fixture(scope="module", params=[False, True], ids=["non-negative", "signed"])
def planted(request, noise):
    directions = planted_directions(PLANTED, CHANNELS, signed=request.param)
    model = planted_model(directions)
    return directions, model, collect(model, "mix", noise, Sampling(per_image=32))


@pytest.fixture(scope="module")
def learned(planted):
    return learn(planted[2].vectors, PLANTED, seed=0, key="k")


def test_samples_keep_where_each_vector_comes_from(planted, noise):
    _, model, samples = planted
    assert samples.vectors.shape == (60 * 32, CHANNELS) and samples.image_count == 60
    pick = 100
    act = raw_output(model, "mix", load(noise / samples.files[samples.images[pick]]))
    expected = act[0, :, samples.rows[pick], samples.cols[pick]].numpy()
    np.testing.assert_allclose(samples.vectors[pick], expected, rtol=1e-4, atol=1e-5)


def load(path) -> torch.Tensor:
    """A 16 px image as the model sees it: [1, 3, 16, 16] in [0, 1]."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def test_samples_do_not_depend_on_the_chunks_or_their_order(planted, noise):
    _, model, samples = planted
    collection = Collection(model, "mix", noise, Sampling(per_image=32))
    for task in reversed(list(collection.tasks(chunk=7))):
        collection.add(sample_task(model, task))
    again = collection.samples()
    assert again.key == samples.key
    for name in ("vectors", "images", "rows", "cols"):
        np.testing.assert_array_equal(getattr(again, name), getattr(samples, name))


def test_the_key_changes_with_the_sampling_the_folder_and_the_layer(planted, noise, tmp_path):
    _, model, samples = planted
    keys = {
        samples.key,
        Collection(model, "mix", noise, Sampling(per_image=32, seed=1)).key,
        Collection(model, "presence", noise, Sampling(per_image=32)).key,
        Collection(model, "mix", noise_folder(tmp_path / "other", 3), Sampling(32)).key,
    }
    assert len(keys) == 4


def test_samples_are_saved_and_loaded_whole(planted, tmp_path):
    _, _, samples = planted
    samples.save(tmp_path / "s.npz")
    loaded = Samples.load(tmp_path / "s.npz")
    assert (loaded.layer, loaded.key, loaded.map_size, loaded.files) == (
        samples.layer,
        samples.key,
        samples.map_size,
        samples.files,
    )
    np.testing.assert_array_equal(loaded.vectors, samples.vectors)


def test_the_memory_cap_holds_on_2000_small_crops(tmp_path):
    """2,000 images of a 16 x 16 map at 16 positions each would be 32,000 vectors: the cap
    of 1,000 vectors (and of 24 KiB) holds, with the images spread over the whole folder."""
    folder = noise_folder(tmp_path / "crops", 2000, size=12)
    model = planted_model(planted_directions(PLANTED, CHANNELS, signed=False))
    sampling = Sampling(per_image=16, max_vectors=1000, max_bytes=24 * 1024)
    collection = Collection(model, "mix", folder, sampling)
    cap = 24 * 1024 // (4 * CHANNELS)  # 512 vectors: the byte cap is the tighter
    assert collection.vectors.nbytes <= 24 * 1024 and collection.capacity <= cap
    samples = collect(model, "mix", folder, sampling, chunk=64)
    assert len(samples.vectors) == collection.capacity == 512
    assert samples.vectors.nbytes <= 24 * 1024
    assert samples.images.min() < 100 and samples.images.max() > 1900
    assert len(np.unique(samples.images)) == 512  # one position each, from 512 images


def test_fewer_images_than_the_cap_give_fewer_positions_each(noise):
    model = planted_model(planted_directions(PLANTED, CHANNELS, signed=False))
    samples = collect(model, "mix", noise, Sampling(per_image=16, max_vectors=300))
    assert len(samples.vectors) == 60 * 5  # 300 // 60 positions from every image


def test_token_layers_give_patch_tokens_without_the_class_token(tmp_path):
    vit = wrap(TinyViT(), 16)
    folder = noise_folder(tmp_path / "vit", 5)
    samples = collect(vit, "block", folder, Sampling(per_image=16))
    assert samples.map_size == (4, 4) and len(samples.vectors) == 5 * 16  # 16 patches each
    tokens = raw_output(vit, "block", load(folder / samples.files[0]))[0]  # [1 + 16, 6]
    expected = tokens[1 + samples.rows[:16].astype(int) * 4 + samples.cols[:16].astype(int)]
    np.testing.assert_allclose(samples.vectors[:16], expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True], ids=["nmf", "sae"])
def test_planted_directions_are_recovered(signed, noise):
    """The layer is a non-negative sum of known directions: the dictionary finds each one
    (cosine > 0.9), by NMF where they are non-negative, else by the sparse autoencoder."""
    directions = planted_directions(PLANTED, CHANNELS, signed=signed)
    samples = collect(planted_model(directions), "mix", noise, Sampling(per_image=32))
    assert (samples.vectors < 0).any() == signed
    dictionary = learn(samples.vectors, PLANTED, seed=0)
    assert dictionary.method == ("sae" if signed else "nmf")
    cosine = dictionary.directions @ directions.T
    assert cosine.max(0).min() > 0.9
    assert dictionary.explained(samples.vectors) > 0.9
    np.testing.assert_allclose(np.linalg.norm(dictionary.directions, axis=1), 1, rtol=1e-5)


def test_shares_measure_what_each_concept_adds(planted, learned):
    _, _, samples = planted
    dictionary = learned
    shares = dictionary.shares(samples.vectors)
    assert list(shares) == sorted(shares, reverse=True)  # concept0 explains the most
    assert (shares > 0).all() and shares.sum() <= 1.5
    one_less = learn(samples.vectors, PLANTED - 1, seed=0)
    assert one_less.explained(samples.vectors) < dictionary.explained(samples.vectors) - 0.02


def test_a_dictionary_is_saved_and_encodes_the_same_after_loading(planted, learned, tmp_path):
    _, _, samples = planted
    dictionary = learned
    dictionary.save(tmp_path / "d.npz")
    loaded = Dictionary.load(tmp_path / "d.npz")
    assert (loaded.method, loaded.key, loaded.active) == (dictionary.method, "k", dictionary.active)
    torch.testing.assert_close(loaded.encode(samples.vectors), dictionary.encode(samples.vectors))


def test_nmf_refuses_signed_activations():
    vectors = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(AtlasError, match="non-negative"):
        learn(vectors, 2, method="nmf")


def test_channels_last_maps_are_sampled_by_channel(tmp_path):
    model = wrap(ChannelsLast(), 16)
    folder = noise_folder(tmp_path / "last", 3)
    samples = collect(model, "mix", folder, Sampling(per_image=8))
    assert samples.map_size == (8, 8) and samples.channels == 6
    raw = raw_output(model, "mix", load(folder / samples.files[0]))[0]  # [8, 8, 6]
    expected = raw[samples.rows[:8].astype(int), samples.cols[:8].astype(int)]
    np.testing.assert_allclose(samples.vectors[:8], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_a_concept_shows_its_share_channels_exemplars_and_where_it_fires(planted, learned, noise):
    _, model, samples = planted
    dictionary = learned
    concepts = describe(samples, dictionary)
    assert [c.id for c in concepts] == [f"mix:concept{k}" for k in range(PLANTED)]
    first = concepts[0]
    assert first.channels[0][0] == int(np.argmax(np.abs(first.direction)))
    assert 1 <= len(first.exemplars) <= 9
    images = [pick.image for pick in first.exemplars]
    assert len(set(images)) == len(images)  # one patch per image
    scores = [pick.score for pick in first.exemplars]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # where it fires: its coefficient map on the exemplar images peaks at least as high as
    # the sampled position's coefficient, and is that coefficient there
    blobs = read_blobs(noise / samples.files[image] for image in images)
    asked = ((0, 1),) * len(blobs)
    task = FiringTask("mix", tuple(images), blobs, asked, dictionary=dictionary)
    maps = firing_task(model, task)["maps"]
    assert all(found.shape == (2, 16, 16) for found in maps)
    for pick, found in zip(first.exemplars, maps, strict=True):
        assert found[0, pick.row, pick.col] == pytest.approx(pick.score, rel=2e-3, abs=1e-3)
        assert found[0].max() >= pick.score - 1e-3
    cut = patches(model, samples, noise, first.exemplars[:2])
    assert all(patch.shape == (112, 112, 3) and patch.dtype == np.uint8 for _, patch in cut)
    assert all(0 <= box[0] < box[2] <= 16 for box, _ in cut)


def test_top_channels_and_best_samples():
    assert top_channels(np.array([0.1, -0.7, 0.5, 0.0]), 2) == [(1, -0.7), (2, 0.5)]
    samples = Samples(
        "l",
        "k",
        np.zeros((5, 2), np.float32),
        np.array([0, 0, 1, 2, 2], np.int32),
        np.zeros(5, np.int16),
        np.arange(5, dtype=np.int16),
        (1, 5),
        ("a", "b", "c"),
    )
    picks = best_samples(np.array([0.2, 0.9, 0.5, -1.0, 0.0]), samples, count=9)
    assert [(p.sample, p.image) for p in picks] == [(1, 0), (2, 1)]  # image 2 never fires


def test_learn_concepts_checks_the_folder_and_keys_the_dictionary(planted, tmp_path):
    _, model, samples = planted
    dictionary = learn_concepts(samples, 2, seed=0)
    assert dictionary.size == 2 and dictionary.key
    assert learn_concepts(samples, 2, seed=1).key != dictionary.key
    few = collect(model, "mix", noise_folder(tmp_path / "few", 3), Sampling(per_image=4))
    with pytest.raises(AtlasError, match="need at least 4 images and 40 sampled activations"):
        learn_concepts(few, 4)


def test_images_that_do_not_decode_leave_no_gap(tmp_path):
    names = make_image_folder(tmp_path)  # 40 images, a corrupt JPEG and a text file
    model = planted_model(planted_directions(PLANTED, CHANNELS, signed=False))
    samples = collect(model, "mix", tmp_path, Sampling(per_image=4))
    broken = samples.files.index("broken.jpg")
    assert samples.unreadable == (broken,) and broken not in samples.images
    assert len(samples.vectors) == 4 * len(names)
    counts = np.bincount(samples.images, minlength=len(samples.files))
    assert counts[broken] == 0 and (np.delete(counts, broken) == 4).all()


def test_bad_numbers_of_concepts_are_one_sentence():
    with pytest.raises(AtlasError, match="more than mix's 12 channels: ask for at most 12"):
        check_concepts(16, 12, images=100, vectors=1000, layer="mix")
    with pytest.raises(AtlasError, match=r"need at least 8 images and 80 .* gave 5 images"):
        check_concepts(8, 12, images=5, vectors=500, layer="mix")
    with pytest.raises(AtlasError, match="at least 1"):
        check_concepts(0, 12, images=5, vectors=500, layer="mix")
    with pytest.raises(AtlasError, match="unknown concept method"):
        learn(np.ones((40, 3), np.float32), 2, method="pca")


def test_a_missing_extra_is_named(planted, monkeypatch):
    _, _, samples = planted
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)
    with pytest.raises(AtlasError, match=r"scikit-learn.*pip install 'atlas\[concepts\]'"):
        learn(np.abs(samples.vectors), PLANTED, method="nmf")
