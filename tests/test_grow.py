"""`atlas visualize --grow`: a channel grown position by position over its map, and ATLAS_DEBUG."""

import json

import click
import numpy as np
import pytest
import torch
from clihelpers import assert_bad_input, make_runner
from PIL import Image
from tinymodels import tiny_small

from atlas.cli import AtlasGroup, cli
from atlas.errors import AtlasError
from atlas.grow import frame_counts, prefix_objective
from atlas.optim import channel, get, visualize
from atlas.optim.loop import image_seed
from atlas.optim.objectives import BatchObjective, as_objective
from atlas.record import RunRecord

MODEL = "tinymodels:tiny_small"  # 12 px input: conv3's map is 3x3
QUICK = ["--steps", "2", "--size", "12", "--format", "png"]


def atlas(*args, env=None):
    return make_runner().invoke(cli, [str(arg) for arg in args], env=env, catch_exceptions=True)


def grow(out, *extra):
    result = atlas("visualize", MODEL, "conv3:3", "--grow", *QUICK, "--out", out, *extra)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    return result


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def animation_ms(path) -> tuple[tuple[int, int], int]:
    """Size and total duration of an animated WebP (libwebp merges identical consecutive
    frames, adding up their durations, so the total is what counts frames reliably)."""
    with Image.open(path) as image:
        assert image.format == "WEBP" and image.is_animated
        total = 0
        for number in range(image.n_frames):
            image.seek(number)
            image.load()  # a frame reports its duration once decoded
            total += image.info["duration"]
        return image.size, total


def prefix_means(path, k: int, index: int = 3) -> float:
    """The mean of conv3's channel `index` over its first k positions (reading order) on the
    stored image, from a forward hook on the plain module: nothing of atlas's engine."""
    model = tiny_small()
    seen = {}
    handle = model.module.conv3.register_forward_hook(lambda m, i, o: seen.update(out=o))
    image = torch.tensor(pixels(path), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    try:
        with torch.no_grad():
            model.module(model.normalize(image))
    finally:
        handle.remove()
    return seen["out"][0, index].flatten()[:k].mean().item()


# --- the objectives ------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(3, 3), (3, 4), (1, 5), (4, 1)])
def test_prefix_objective_is_the_mean_over_the_first_k_positions(height, width):
    acts = torch.randn(1, 5, height, width)
    target = channel("conv3", 2)
    for k in range(1, height * width + 1):
        objective = prefix_objective(target, k, height, width)
        assert {term.kind for _, term in objective.terms} == {"region"}
        assert len(objective.terms) == (2 if k % width and k > width else 1)
        value = BatchObjective([objective])({"conv3": acts})
        expected = acts[0, 2].flatten()[:k].mean()
        assert torch.allclose(value[0], expected, atol=1e-6), (k, value, expected)


def test_a_negative_target_grows_negative_regions():
    objective = prefix_objective(channel("conv3", 1, negative=True), 4, 3, 3)
    assert all(term.negative for _, term in objective.terms)


def test_frame_counts_keep_every_nth_prefix_and_the_whole_map():
    assert frame_counts(9) == list(range(1, 10))
    assert frame_counts(9, 4) == [4, 8, 9]
    assert frame_counts(9, 3) == [3, 6, 9]
    assert frame_counts(9, 9) == frame_counts(9, 20) == [9]


def test_streams_give_every_image_the_same_start(tiny):
    recipe = get("fourier", steps=2, size=32)
    a, b = channel("conv2", 1), channel("conv2", 4)
    stream = image_seed(0, as_objective(a), 0)
    same = visualize(tiny, [a, b], recipe, timelapse=1, streams=[stream, stream])
    assert np.array_equal(same[0].frames[0], same[1].frames[0])
    assert not np.array_equal(same[0].image, same[1].image)  # then they part
    default = visualize(tiny, [a, b], recipe, timelapse=1)
    assert not np.array_equal(default[0].frames[0], default[1].frames[0])
    assert np.array_equal(default[0].frames[0], same[0].frames[0])  # a's own stream
    assert same[0].seed == default[0].seed == stream


# --- the command ---------------------------------------------------------------------------------


def test_grow_writes_every_frame_and_the_animation(tmp_path):
    result = grow(tmp_path)
    frames = [f"conv3_3.grow.{k}.png" for k in range(1, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*frames, "conv3_3.grow.webp", "results.json"]
    )
    size, milliseconds = animation_ms(tmp_path / "conv3_3.grow.webp")
    assert size == (12, 12) and milliseconds == 8 * 80 + 1500  # 9 frames, the last held

    summary = json.loads((tmp_path / "results.json").read_text())
    run = RunRecord.from_json(summary)
    assert run.grow and run.recipe_settings["steps"] == 2
    (unit,) = summary["units"]
    assert unit["id"] == "conv3:3" and unit["map"] == [3, 3] and unit["grow_step"] == 1
    assert unit["animation"] == "conv3_3.grow.webp"
    assert [frame["k"] for frame in unit["frames"]] == list(range(1, 10))
    assert [frame["images"] for frame in unit["frames"]] == [[name] for name in frames]
    assert unit["frames"][3]["position"] == [1, 0]  # the neuron that joined in frame 4
    assert unit["frames"][3]["objective"] == "+0.75*conv3:3@0-1,0-3 +0.25*conv3:3@1-2,0-1"
    assert unit["frames"][-1]["objective"] == "conv3:3@0-3,0-3"
    for frame in unit["frames"]:
        assert frame["objective_best"] >= frame["objective_start"]
        own = prefix_means(tmp_path / frame["images"][0], frame["k"])
        assert frame["activation"] == pytest.approx(own, rel=1e-5, abs=1e-7), frame["k"]
        whole = prefix_means(tmp_path / frame["images"][0], 9)
        if frame["k"] < 9:  # the prefix, not the whole map
            assert abs(frame["activation"] - whole) > 10 * abs(frame["activation"] - own)

    lines = result.stdout.splitlines()
    assert lines[0].startswith("conv3:3: 9 frames over its 3x3 map, objective ")
    assert lines[0].endswith("(k=9), conv3_3.grow.webp")
    assert lines[-1].startswith("9 frames of 1 units in ") and lines[-1].endswith(str(tmp_path))


def test_grow_frames_share_their_start(tmp_path):
    grow(tmp_path / "grow", "--steps", "1", "conv3:4")  # one step: each best image is its start
    starts = [pixels(tmp_path / f"grow/conv3_3.grow.{k}.png") for k in range(1, 10)]
    assert all(np.array_equal(start, starts[0]) for start in starts)
    other = pixels(tmp_path / "grow/conv3_4.grow.1.png")
    assert not np.array_equal(other, starts[0])  # another target, another stream
    plain = atlas("visualize", MODEL, "conv3:3", *QUICK, "--steps", "1", "--out", tmp_path / "p")
    assert plain.exit_code == 0, plain.output
    assert np.array_equal(pixels(tmp_path / "p/conv3_3.png"), starts[0])  # the plain run's start


def test_grow_step_keeps_every_fourth_frame_and_the_whole_map(tmp_path):
    grow(tmp_path, "--grow-step", "4")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "conv3_3.grow.4.png",
        "conv3_3.grow.8.png",
        "conv3_3.grow.9.png",
    ]
    (unit,) = json.loads((tmp_path / "results.json").read_text())["units"]
    assert [frame["k"] for frame in unit["frames"]] == [4, 8, 9]
    assert [frame["position"] for frame in unit["frames"]] == [[1, 0], [2, 1], [2, 2]]
    assert animation_ms(tmp_path / "conv3_3.grow.webp")[1] == 2 * 80 + 1500


def test_grow_in_chunks_gives_what_one_batch_gives(tmp_path):
    grow(tmp_path / "one", "--grow-step", "2")
    grow(tmp_path / "chunks", "--grow-step", "2", "--batch", "2")
    for k in (2, 4, 6, 8, 9):
        one = pixels(tmp_path / f"one/conv3_3.grow.{k}.png").astype(int)
        chunked = pixels(tmp_path / f"chunks/conv3_3.grow.{k}.png").astype(int)
        assert np.abs(one - chunked).max() <= 2, k


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("logits:3", "not the logit logits:3"),
        ("conv3", "not the layer conv3"),
        ("conv3:3@1,1", "not the neuron conv3:3@1,1"),
        ("fc:3", "fc has shape 10"),
        ("pool:3", "pool has shape 16"),
    ],
)
def test_grow_refuses_targets_without_a_map(tmp_path, target, fragment):
    out = tmp_path / "out"
    result = atlas("visualize", MODEL, target, "--grow", *QUICK, "--out", out)
    assert_bad_input(result, "--grow", fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--grow-step", "2"],
        ["--batch", "2"],
        ["--grow", "--samples", "2"],
        ["--grow", "--timelapse", "1"],
    ],
)
def test_grow_options_without_grow_or_with_other_modes(tmp_path, extra):
    result = atlas("visualize", MODEL, "conv3:3", *QUICK, "--out", tmp_path / "out", *extra)
    assert_bad_input(result, "--grow")


# --- ATLAS_DEBUG ---------------------------------------------------------------------------------


@click.group(cls=AtlasGroup)
def failing() -> None:
    """A group whose one command fails as a loader does: an AtlasError raised from a cause."""


@failing.command("load")
def load_command() -> None:
    try:
        int("not a number")
    except ValueError as error:
        raise AtlasError("cannot read the weights") from error


def test_atlas_debug_prints_the_traceback_and_its_cause():
    result = make_runner().invoke(failing, ["load"], env={"ATLAS_DEBUG": "1"})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "ValueError: invalid literal for int()" in result.stderr  # the cause, chained
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "AtlasError: cannot read the weights" in result.stderr
    assert result.stderr.splitlines()[-1] == "error: cannot read the weights"


def test_atlas_debug_in_the_atlas_command(tmp_path):
    args = ["visualize", MODEL, "conv3:99", *QUICK, "--out", tmp_path]
    result = atlas(*args, env={"ATLAS_DEBUG": "1"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "in visualize_command" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: channel 99 is out of range")


@pytest.mark.parametrize("value", [None, "0", ""])
def test_without_atlas_debug_an_error_is_one_line(value):
    result = make_runner().invoke(failing, ["load"], env={"ATLAS_DEBUG": value})
    assert_bad_input(result, "cannot read the weights")


def test_help_mentions_atlas_debug():
    result = atlas("--help")
    assert result.exit_code == 0 and "ATLAS_DEBUG=1" in result.stdout
