"""Notebook habits: a result shows itself as its image, grid() puts many on one picture."""

import io

import numpy as np
import pytest
from PIL import Image
from tinymodels import tiny_model

from atlas.optim import channel, get, grid, logit, visualize
from atlas.optim.contact_sheet import GAP

PLAIN = get("plain", steps=4, size=32)


@pytest.fixture(scope="module")
def results():
    targets = [channel("conv1", 0), channel("conv2", 3), logit(2)]
    return visualize(tiny_model(), targets, PLAIN, seed=0)


def many(results, n):
    """n results, cycling through the three (distinct images enough for placement checks)."""
    return [results[i % len(results)] for i in range(n)]


def test_result_repr_png_decodes_to_its_image(results):
    for result in results:
        png = result._repr_png_()
        assert png.startswith(b"\x89PNG")
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, result.image)


@pytest.mark.parametrize(("n", "columns", "rows"), [(1, 1, 1), (3, 2, 2), (7, 3, 3)])
def test_grid_is_roughly_square_by_default(results, n, columns, rows):
    sheet = grid(many(results, n), labels=False)
    assert sheet.mode == "RGB"
    assert sheet.size == (columns * 32 + (columns - 1) * GAP, rows * 32 + (rows - 1) * GAP)


@pytest.mark.parametrize(("n", "columns", "rows"), [(7, 7, 1), (7, 1, 7), (7, 4, 2), (3, 9, 1)])
def test_grid_takes_custom_columns(results, n, columns, rows):
    sheet = grid(many(results, n), columns=columns, labels=False)
    used = min(columns, n)  # more columns than results: no empty columns
    assert sheet.size == (used * 32 + (used - 1) * GAP, rows * 32 + (rows - 1) * GAP)


@pytest.mark.parametrize("labels", [False, True])
def test_grid_tiles_hold_the_images_pixels_in_reading_order(results, labels):
    items = many(results, 7)
    sheet = np.asarray(grid(items, columns=3, labels=labels))
    rows = 3
    caption = (sheet.shape[0] + GAP) // rows - 32 - GAP
    assert (caption > 0) == labels
    for i, result in enumerate(items):
        x, y = (i % 3) * (32 + GAP), (i // 3) * (32 + caption + GAP)
        np.testing.assert_array_equal(sheet[y : y + 32, x : x + 32], result.image)
    assert (sheet[:, 32 : GAP + 32] == 255).all()  # the gap between the first two columns


def test_grid_captions_are_drawn_under_each_tile_only_when_asked(results):
    sheet = np.asarray(grid(results, labels=True))  # 2 x 2, the last cell empty
    caption = (sheet.shape[0] + GAP) // 2 - 32 - GAP
    under = [sheet[32 : 32 + caption, x : x + 32] for x in (0, 32 + GAP)]
    assert all((strip < 128).any() for strip in under), "every tile has dark caption ink"
    empty = sheet[-caption:, 32 + GAP :]
    assert (empty == 255).all(), "an empty cell has no caption"


def test_grid_of_nothing_says_so():
    with pytest.raises(ValueError, match="at least one"):
        grid([])


def test_grid_is_a_pil_image_that_jupyter_shows(results):
    sheet = grid(results)
    assert isinstance(sheet, Image.Image)
    assert sheet._repr_png_().startswith(b"\x89PNG")
