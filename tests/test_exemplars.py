"""Dataset exemplars: one pass over a folder finds every unit's most exciting images."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
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


def run(out, photos, *extra):
    args = ["run", "tinymodels:tiny", "--layers", "conv2", "--channels", "0-3"]
    args += ["--classes", "0-1", "--steps", "3", "--size", "32", "--scheduler", "inline"]
    args += ["--exemplars", str(photos), "--exemplars-top", "3", "--out", str(out), *extra]
    return CliRunner().invoke(cli, args)


def brute_force_scores(folder, names):
    """Every image through the model, one at a time: conv2 channel means and the logits."""
    model = tiny_model()
    scores = {}
    for name in names:
        with Image.open(folder / name) as image:
            pixels = np.asarray(fit(image, 32, 3), dtype=np.float32) / 255
        x = model.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
        with torch.no_grad(), capture(model.module, ["conv2"]) as acts:
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
    assert "Dataset exemplars" in page and 'src="ex/1.0.webp"' in page
    assert exemplar["source"] in page
    ratio = record["activation"] / exemplar["score"]
    assert f"{ratio:.2f}x</strong> its best exemplar" in page
    assert (tmp_path / "site/conv2/ex/1.0.webp").is_file()


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
    assert len(items) == 2 and not (tmp_path / "exemplars/conv2/0.2.webp").exists()


def test_a_killed_pass_resumes_where_it_was(tmp_path, photos, monkeypatch):
    folder, _ = photos
    monkeypatch.setattr(atlas.exemplars, "CHUNK_IMAGES", 8)
    monkeypatch.setattr(atlas.exemplars, "SAVE_EVERY_SECONDS", 0.0)
    real = atlas.exemplars.exemplar_task
    seen = []

    def dies_at_the_fourth_chunk(model, task):
        seen.append(task.first)
        if len(seen) == 4:
            raise RuntimeError("worker lost")
        return real(model, task)

    monkeypatch.setattr(atlas.exemplars, "exemplar_task", dies_at_the_fourth_chunk)
    crashed = run(tmp_path, folder)
    assert crashed.exit_code == 2 and "worker lost" in crashed.output
    assert (tmp_path / "exemplars/progress.json").is_file()
    seen.clear()
    monkeypatch.setattr(atlas.exemplars, "exemplar_task", real)
    resumed_calls = []
    monkeypatch.setattr(
        atlas.exemplars, "exemplar_task", lambda m, t: resumed_calls.append(t.first) or real(m, t)
    )
    assert run(tmp_path, folder).exit_code == 0
    assert resumed_calls == [24, 32, 40]  # chunks 0, 8 and 16 were saved before the crash
    assert not (tmp_path / "exemplars/progress.json").exists()
    clean = tmp_path / "clean"
    monkeypatch.setattr(atlas.exemplars, "exemplar_task", real)
    assert run(clean, folder).exit_code == 0
    for unit in ["conv2/0", "conv2/2", "logits/1"]:
        resumed = json.loads((tmp_path / f"exemplars/{unit}.json").read_text())["items"]
        fresh = json.loads((clean / f"exemplars/{unit}.json").read_text())["items"]
        assert resumed == fresh


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
    left, top, right, bottom = patch_box(0, 0, (8, 8), 6.0, 32)
    assert (left, top) == (0, 0) and right - left == bottom - top == 12  # kept inside
