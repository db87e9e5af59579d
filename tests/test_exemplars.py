"""Dataset exemplars: one pass over a folder finds every unit's most exciting images."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from links import check_links
from PIL import Image
from synthetic import make_image_folder
from tinymodels import tiny_model

import atlas.exemplars
from atlas.cli import cli
from atlas.exemplars import TopK, fit, list_images, patch_box, receptive_halfwidth
from atlas.layers import capture, run_forward


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return folder, make_image_folder(folder)


def run(out, photos, *extra, spec="tinymodels:tiny"):
    args = ["run", spec, "--layers", "conv2", "--channels", "0-3"]
    args += ["--classes", "0-1", "--steps", "3", "--size", "32", "--scheduler", "inline"]
    args += ["--exemplars", str(photos), "--exemplars-top", "3", "--out", str(out), *extra]
    return CliRunner().invoke(cli, args)


def brute_force_scores(folder, names):
    """Every image through the model, one at a time: conv2 channel means and the logits."""
    model = tiny_model()
    scores = {}
    for name in names:
        with Image.open(folder / name) as image:
            pixels = np.asarray(fit(image, (32, 32), 3), dtype=np.float32) / 255
        x = model.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
        with torch.no_grad(), capture(model, ["conv2"]) as acts:
            logits = run_forward(model.module, x)
        scores[name] = {
            **{f"conv2:{c}": float(acts["conv2"][0, c].mean()) for c in range(4)},
            **{f"logits:{c}": float(logits[0, c]) for c in range(2)},
        }
    return scores


def test_every_unit_gets_its_top_images_and_the_corrupt_file_is_counted(tmp_path, photos):
    folder, names = photos
    result = run(tmp_path, folder)
    assert result.exit_code == 0, result.output
    assert "exemplars: 41 images (1 unreadable, skipped) for 6 units" in result.output
    assert "41/41 images" in result.output  # the pass reports its progress
    truth = brute_force_scores(folder, names)
    for unit in ["conv2:0", "conv2:3", "logits:1"]:
        layer, index = unit.split(":")
        record = json.loads((tmp_path / f"exemplars/{layer}/{index}.json").read_text())
        expected = sorted(names, key=lambda n: -truth[n][unit])[:3]
        assert [item["source"] for item in record["items"]] == expected
        for item in record["items"]:
            assert item["score"] == pytest.approx(truth[item["source"]][unit], rel=1e-3, abs=1e-4)
            assert 0 <= item["box"][0] < item["box"][2] <= 32
            with Image.open(tmp_path / item["image"]) as patch:
                assert patch.format == "WEBP" and patch.size == (112, 112)
    summary = json.loads((tmp_path / "exemplars/summary.json").read_text())
    assert summary["unreadable"] == ["broken.jpg"] and summary["images"] == 41


def test_the_unit_page_shows_exemplars_and_the_activation_ratio(tmp_path, photos):
    assert run(tmp_path, photos[0]).exit_code == 0
    record = json.loads((tmp_path / "units/conv2/1.json").read_text())
    exemplar = json.loads((tmp_path / "exemplars/conv2/1.json").read_text())["items"][0]
    page = (tmp_path / "site/conv2/1.html").read_text()
    patch = exemplar["image"].split("/")[-1]
    assert patch.startswith("1.") and patch.endswith(".0.webp")  # <index>.<key>.<rank>.webp
    assert "Dataset exemplars" in page and f'src="ex/{patch}"' in page
    assert exemplar["source"] in page
    ratio = record["activation"] / exemplar["score"]
    assert f"{ratio:.2f}x</strong> its best exemplar" in page
    assert (tmp_path / "site/conv2/ex" / patch).is_file()
    check_links(tmp_path / "site")


def test_a_rerun_reuses_them_and_new_images_redo_them(tmp_path, photos, monkeypatch):
    folder, _ = photos
    assert run(tmp_path, folder).exit_code == 0
    before = (tmp_path / "exemplars/conv2/0.json").stat().st_mtime_ns
    calls = []
    real = atlas.exemplars.exemplar_task
    monkeypatch.setattr(
        atlas.exemplars, "exemplar_task", lambda m, t: calls.append(t.first) or real(m, t)
    )
    again = run(tmp_path, folder)
    assert again.exit_code == 0 and "exemplars:" not in again.output and calls == []
    assert (tmp_path / "exemplars/conv2/0.json").stat().st_mtime_ns == before
    more = run(tmp_path, folder, "--exemplars-top", "2")
    assert "for 6 units" in more.output and calls
    items = json.loads((tmp_path / "exemplars/conv2/0.json").read_text())["items"]
    patches = sorted(p.name for p in (tmp_path / "exemplars/conv2").glob("0.*.webp"))
    assert len(items) == 2 and patches == sorted(i["image"].split("/")[-1] for i in items)


class Killed(BaseException):
    """The client process dying mid-pass (not an error the run could report)."""


def counting_task(monkeypatch, fail_at: int | None = None, error=RuntimeError):
    """Replaces the worker function with one that records each chunk's first image and raises
    `error` for the `fail_at`-th chunk it sees."""
    real, seen = atlas.exemplars.exemplar_task, []

    def task(model, chunk):
        seen.append(chunk.first)
        if len(seen) == fail_at:
            raise error("worker lost")
        return real(model, chunk)

    monkeypatch.setattr(atlas.exemplars, "exemplar_task", task)
    return seen


def exemplar_items(out, units=("conv2/0", "conv2/2", "logits/1")):
    return {u: json.loads((out / f"exemplars/{u}.json").read_text())["items"] for u in units}


def assert_as_in_a_clean_run(out, folder, monkeypatch):
    """The exemplars in `out` are those of one uninterrupted run with the real worker."""
    monkeypatch.undo()
    assert run(out / "clean", folder).exit_code == 0
    assert exemplar_items(out) == exemplar_items(out / "clean")


def test_a_killed_pass_resumes_where_it_was(tmp_path, photos, monkeypatch):
    folder, _ = photos
    monkeypatch.setattr(atlas.exemplars, "CHUNK_IMAGES", 8)
    monkeypatch.setattr(atlas.exemplars, "SAVE_EVERY_SECONDS", 0.0)
    counting_task(monkeypatch, fail_at=4, error=Killed)
    with pytest.raises(Killed):
        run(tmp_path, folder)
    assert (tmp_path / "exemplars/progress.json").is_file()
    resumed = counting_task(monkeypatch)
    rerun = run(tmp_path, folder)
    assert rerun.exit_code == 0, rerun.output
    assert resumed == [24, 32, 40]  # chunks 0, 8 and 16 were saved before the kill
    assert "17/17 images" in rerun.output  # progress counts what was left: 8 + 8 + 1
    assert not (tmp_path / "exemplars/progress.json").exists()
    assert_as_in_a_clean_run(tmp_path, folder, monkeypatch)


def test_a_failed_chunk_fails_the_run_but_keeps_the_rest(tmp_path, photos, monkeypatch):
    folder, _ = photos
    monkeypatch.setattr(atlas.exemplars, "CHUNK_IMAGES", 8)
    counting_task(monkeypatch, fail_at=2)
    failed = run(tmp_path, folder)
    assert failed.exit_code == 1 and "failed: exemplars of images 8-15" in failed.output
    assert "worker lost" in failed.output
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["done"] == 6
    assert (tmp_path / "site/index.html").is_file()
    assert not list((tmp_path / "exemplars").glob("*/*.json"))  # incomplete: nothing shown
    retried = counting_task(monkeypatch)
    assert run(tmp_path, folder).exit_code == 0
    assert retried == [8]  # only the failed chunk
    assert_as_in_a_clean_run(tmp_path, folder, monkeypatch)


def test_other_weights_do_not_resume_an_interrupted_pass(tmp_path, photos, monkeypatch):
    folder, _ = photos
    monkeypatch.setattr(atlas.exemplars, "CHUNK_IMAGES", 8)
    counting_task(monkeypatch, fail_at=2)
    assert run(tmp_path, folder).exit_code == 1
    seen = counting_task(monkeypatch)
    assert run(tmp_path, folder, spec="tinymodels:tiny_retrained").exit_code == 0
    assert seen == [0, 8, 16, 24, 32, 40]  # a fresh pass, not the old model's progress


# (width, x, y): an 8 px white square at x, y in a black image 48 px high. The model's input is
# 24x40, so 80 px wide images are shown whole at half size and the 120 px one is cropped to its
# centre 80 px (20 px off each side) first.
DOTS = [(80, 5, 5), (80, 70, 30), (80, 40, 10), (120, 80, 20)]


def test_a_non_square_grey_model_gets_patches_in_the_right_place(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, (width, x, y) in enumerate(DOTS):
        pixels = np.zeros((48, width), np.uint8)
        pixels[y : y + 8, x : x + 8] = 255
        Image.fromarray(pixels).save(folder / f"dot{number}.png")
    args = ["run", "tinymodels:tiny_grey_wide", "--layers", "conv1", "--channels", "0"]
    args += ["--classes", "", "--steps", "2", "--size", "16", "--scheduler", "inline"]
    result = CliRunner().invoke(cli, [*args, "--exemplars", folder, "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    items = json.loads((tmp_path / "out/exemplars/conv1/0.json").read_text())["items"]
    assert sorted(item["source"] for item in items) == [f"dot{i}.png" for i in range(4)]
    for item in items:
        width, x, y = DOTS[int(item["source"][3])]
        x -= (width - 80) / 2  # the centre crop
        left, top, right, bottom = item["box"]  # in the 40x24 input: the image at half size
        assert left < (x + 8) / 2 and right > x / 2 and top < (y + 8) / 2 and bottom > y / 2
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 24
        with Image.open(tmp_path / "out" / item["image"]) as patch:
            assert np.asarray(patch.convert("L")).max() > 200  # the white square is in it


def test_a_missing_folder_is_bad_input(tmp_path):
    result = run(tmp_path / "out", tmp_path / "nowhere")
    assert result.exit_code == 2 and "exemplar folder" in result.output
    assert "Traceback" not in result.output


def test_images_are_listed_recursively_by_suffix(photos):
    folder, names = photos
    listed = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert listed == sorted([*names, "broken.jpg"]) and "sub/img007.png" in listed


def test_merging_does_not_depend_on_the_order_chunks_finish():
    rng = np.random.default_rng(1)
    chunks = []
    for first in range(0, 40, 8):
        scores = rng.integers(0, 5, size=(8, 3)).astype(float)  # many ties
        ids = np.arange(first, first + 8)[:, None].repeat(3, 1)
        chunks.append({"l": {"scores": scores, "ids": ids, "rows": ids * 0, "cols": ids * 0}})
    forward, backward = TopK(4), TopK(4)
    for chunk in chunks:
        forward.merge({"l": chunk["l"]})
    for chunk in reversed(chunks):
        backward.merge({"l": chunk["l"]})
    for field in TopK.FIELDS:
        np.testing.assert_array_equal(forward.best["l"][field], backward.best["l"][field])
    every = np.concatenate([c["l"]["scores"] for c in chunks])
    np.testing.assert_array_equal(forward.best["l"]["scores"], -np.sort(-every, axis=0)[:4])


def test_deeper_layers_get_larger_patches(tiny):
    reach = [receptive_halfwidth(tiny, layer) for layer in ("conv1", "conv2", "conv3")]
    assert reach[0] < reach[1] < reach[2] <= 16
    assert receptive_halfwidth(tiny, "logits") == 16
    left, top, right, bottom = patch_box(0, 0, (8, 8), 6.0, (32, 32))
    assert (left, top) == (0, 0) and right - left == bottom - top == 12  # kept inside
    assert patch_box(7, 9, (8, 10), 6.0, (32, 40))[2] == 40  # non-square, kept inside
