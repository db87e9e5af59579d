"""The contact sheet: grid() lays many results out in one PIL image, for notebooks and quick
looks. (The module is not called `grid`: a submodule named like the function it exports would
replace that function as an attribute of atlas.optim once it is imported.)"""

from __future__ import annotations

import math
from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont

GAP = 4  # pixels between tiles
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)


def grid(results: Iterable, columns: int | None = None, labels: bool = True) -> Image.Image:
    """The results' images in rows of `columns` (default: a roughly square grid), `GAP` pixels
    apart, each with its id (e.g. 'blocks.8:3') under it unless `labels` is False. Takes
    anything with `.image` (uint8 [H, W, 3]) and `.id`, such as `visualize`'s UnitResults.
    A PIL image shows itself in Jupyter."""
    results = list(results)
    if not results:
        raise ValueError("grid() needs at least one result")
    columns = columns or math.ceil(math.sqrt(len(results)))
    if columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")
    columns = min(columns, len(results))
    rows = math.ceil(len(results) / columns)
    height = max(r.image.shape[0] for r in results)
    width = max(r.image.shape[1] for r in results)
    font = ImageFont.load_default()
    caption = font.getbbox("Ag")[3] + 2 if labels else 0
    cell_w, cell_h = width + GAP, height + caption + GAP
    sheet = Image.new("RGB", (columns * cell_w - GAP, rows * cell_h - GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, result in enumerate(results):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(Image.fromarray(result.image).convert("RGB"), (x, y))
        if labels:
            draw.text((x, y + height + 1), _fit(str(result.id), font, width), fill=INK, font=font)
    return sheet


def _fit(text: str, font, width: int) -> str:
    """The text, cut short with '…' where it is wider than the tile."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
