"""bench/demo_photos.py, the exemplar folder of `make demo`: seeded, decodable, offline."""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage.data")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "demo_photos.py"


@pytest.fixture(scope="module")
def demo_photos():
    spec = importlib.util.spec_from_file_location("demo_photos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writes_n_decodable_jpegs(demo_photos, tmp_path):
    out = tmp_path / "photos"
    demo_photos.main([str(out), "--count", "20", "--seed", "3", "--size", "64"])
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"crop-{i:03d}.jpg" for i in range(20)]
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.size == (64, 64) and image.mode == "RGB"
            image.load()
    assert [p.name for p in tmp_path.iterdir()] == ["photos"], "no partial folder left"


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_crops(demo_photos, tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    demo_photos.write(a, count=8, seed=1, size=48)
    demo_photos.write(b, count=8, seed=1, size=48)
    demo_photos.write(c, count=8, seed=2, size=48)
    assert contents(a) == contents(b)
    assert all(contents(a)[name] != contents(c)[name] for name in contents(a))


def test_crops_take_the_photos_in_turn(demo_photos):
    photos = {
        "red": Image.new("RGB", (100, 80), (255, 0, 0)),
        "blue": Image.new("RGB", (60, 90), (0, 0, 255)),
    }
    crops = list(demo_photos.crops(photos, 4, seed=0, size=16))
    colours = [np.asarray(Image.open(io.BytesIO(data))).mean((0, 1)) for _, data in crops]
    assert [int(np.argmax(c)) for c in colours] == [0, 2, 0, 2]


def test_a_rerun_replaces_the_folder_and_a_missing_photo_is_skipped(
    demo_photos, tmp_path, monkeypatch
):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "stale.jpg").write_bytes(b"old")

    def unavailable():
        raise ModuleNotFoundError("needs pooch")

    monkeypatch.setitem(demo_photos.PHOTOS, "chelsea", unavailable)
    skipped = demo_photos.write(out, count=3, seed=0, size=32)
    assert skipped == ["chelsea"]
    assert sorted(p.name for p in out.iterdir()) == ["crop-000.jpg", "crop-001.jpg", "crop-002.jpg"]
