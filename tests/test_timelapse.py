"""--timelapse: frames of the optimization, kept on the device and saved as an animated WebP."""

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from atlas.cli import cli
from atlas.files import encode_animation
from atlas.optim import channel, get, logit, visualize

QUICK = get("fourier", steps=12, size=32)


def animation_facts(path) -> tuple[int, tuple[int, int], list[int]]:
    """Frames, size and frame durations (libwebp merges identical consecutive frames, adding
    up their durations, so the total duration is what counts frames reliably)."""
    with Image.open(path) as image:
        assert image.format == "WEBP" and image.is_animated
        durations = []
        for number in range(image.n_frames):
            image.seek(number)
            image.load()  # WebP frames report their duration once decoded
            durations.append(image.info["duration"])
        return image.n_frames, image.size, durations


def test_frames_at_step_zero_every_n_steps_and_the_last(tiny):
    results = visualize(tiny, [channel("conv2", 1), logit(3)], QUICK, seed=1, timelapse=5)
    for result in results:
        assert len(result.frames) == 4  # steps 0, 5, 10 and 11
        assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in result.frames)
        assert not np.array_equal(result.frames[0], result.frames[-1])  # it changed
    (alone,) = visualize(tiny, [channel("conv2", 1)], QUICK, seed=1)
    assert alone.frames == []
    assert np.abs(alone.image.astype(int) - results[0].image.astype(int)).max() <= 2


def test_octave_frames_grow_and_the_animation_has_the_final_size(tiny, tmp_path):
    recipe = get("octaves", steps=12, size=32)
    (result,) = visualize(tiny, [channel("conv2", 0)], recipe, timelapse=3)
    sizes = {frame.shape[0] for frame in result.frames}
    assert len(sizes) > 1 and max(sizes) == 32
    path = tmp_path / "a.webp"
    path.write_bytes(encode_animation(result.frames, frame_ms=50, hold_ms=700))
    frames, size, durations = animation_facts(path)
    assert 2 <= frames <= len(result.frames) and size == (32, 32)
    assert sum(durations) == 50 * (len(result.frames) - 1) + 700
    assert durations[-1] >= 700  # the final image is held


def run(tmp_path, *extra):
    args = ["run", "tinymodels:tiny", "--layers", "conv2", "--channels", "0-1", "--classes", ""]
    args += ["--steps", "6", "--size", "32", "--scheduler", "inline", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result


def test_run_stores_shows_and_drops_timelapses(tmp_path):
    run(tmp_path, "--timelapse", "2")
    record = json.loads((tmp_path / "units/conv2/1.json").read_text())
    assert record["timelapse"] == "units/conv2/1.timelapse.webp"
    assert record["frames_every"] == 2
    _, size, durations = animation_facts(tmp_path / record["timelapse"])
    assert sum(durations) == 3 * 80 + 1500 and size == (32, 32)  # steps 0, 2, 4, 5
    page = (tmp_path / "site/conv2/1.html").read_text()
    assert 'src="img/1.timelapse.webp"' in page and "a frame every 2 steps of 6" in page
    assert (tmp_path / "site/conv2/img/1.timelapse.webp").is_file()

    assert "2 done" in run(tmp_path).output  # another key: recomputed without the animation
    record = json.loads((tmp_path / "units/conv2/1.json").read_text())
    assert record["timelapse"] is None
    assert not (tmp_path / "units/conv2/1.timelapse.webp").exists()
    assert "timelapse" not in (tmp_path / "site/conv2/1.html").read_text()
    assert not (tmp_path / "site/conv2/img/1.timelapse.webp").exists()  # gone from the site


def test_a_negative_timelapse_is_bad_input(tmp_path):
    result = CliRunner().invoke(cli, ["run", "tinymodels:tiny", "--timelapse", "-1"])
    assert result.exit_code == 2 and "timelapse" in result.output


def test_visualize_command_writes_the_animation(tmp_path):
    args = ["visualize", "tinymodels:tiny", "conv2:1", "--steps", "5", "--size", "32"]
    result = CliRunner().invoke(cli, [*args, "--timelapse", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sum(animation_facts(tmp_path / "conv2_1.timelapse.webp")[2]) == 2 * 80 + 1500  # 0, 2, 4
    (unit,) = json.loads((tmp_path / "results.json").read_text())["units"]
    assert unit["timelapse"] == "conv2_1.timelapse.webp" and unit["frames_every"] == 2
    assert unit["images"] == ["conv2_1.webp"]


def test_a_timelapse_with_too_many_frames_is_bad_input(tmp_path):
    args = ["run", "tinymodels:tiny", "--steps", "512", "--timelapse", "3", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "keeps 172 frames of each image over 512 steps; at most 130: choose 4 or more" in (
        result.output
    )
