"""A unit's files as the site shows them: its images, animation, maps, exemplar patches and
filmstrip pictures hard-linked (or copied) from OUT into the site, so that OUT/site/ can be
published alone, and a thumbnail for the grids. A damaged file is named in a warning and its
unit shown as missing, never a failed build.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from atlas.files import atomic_write_bytes
from atlas.record import UnitRecord
from atlas.site.timeline import Frame
from atlas.site.units import UnitPage, as_planned
from atlas.store import layer_dirname, warn, webp_problem, webp_size

THUMB_SIZE = 128  # px; larger unit images get a downscaled WebP thumbnail
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def link_or_copy(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own, for renders that cannot take turns (a file system without locks)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copy2(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _thumbnail(source: Path, target: Path) -> tuple[int, int]:
    """A WebP of at most THUMB_SIZE px (the image itself when it is that small already);
    returns its size. Existing thumbnails newer than their image are kept."""
    with Image.open(source) as image:
        if max(image.size) <= THUMB_SIZE:
            link_or_copy(source, target)
            return image.size
        if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            with Image.open(target) as thumb:
                return thumb.size
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        encoded = io.BytesIO()
        image.save(encoded, format="WEBP", quality=85)
        atomic_write_bytes(target, encoded.getvalue(), durable=False)
        return image.size


def unit_page(
    out: Path, site: Path, record: UnitRecord, warn: Callable[[str], None] = warn
) -> UnitPage:
    """Link the unit's images into the site (so that it can be published alone), make its
    thumbnail, and describe it for the pages; paths are relative to the layer folder. A unit
    with a damaged image is named in a warning and shown as missing, not a crash."""
    redo = f"the next atlas run redoes {record.id}"
    for name in record.files:
        if problem := webp_problem(out / name):
            warn(f"{name} {problem}; {redo}")
            return _missing_page(record)
    try:
        return _linked_page(out, site, record, warn)
    except DECODE_ERRORS:  # a sound header over damaged pixels: Pillow tells at decode
        warn(f"{record.images[0]} is corrupt (cannot decode); {redo}")
        return _missing_page(record)


def _missing_page(record: UnitRecord) -> UnitPage:
    """A unit whose stored images cannot be shown: as planned but not computed."""
    return UnitPage(as_planned(record), layer_dirname(record.layer), [], None)


def _linked_page(
    out: Path, site: Path, record: UnitRecord, warn: Callable[[str], None]
) -> UnitPage:
    layer_dir = layer_dirname(record.layer)
    page = UnitPage(record, layer_dir, [], None)
    for image in record.images:
        source = out / image
        if not source.is_file():
            continue
        name = Path(image).name
        link_or_copy(source, site / layer_dir / "img" / name)
        page.images.append(f"img/{name}")
    for item in record.exemplars:
        source = out / item["image"]
        if problem := webp_problem(source):
            if problem != "is missing":
                warn(f"{item['image']} {problem}; the next atlas run with --exemplars redoes it")
        else:
            link_or_copy(source, site / layer_dir / "ex" / source.name)
            page.exemplars.append(
                {**item, "src": f"ex/{source.name}", **_map(out, site, layer_dir, item)}
            )
    page.timelapse = _linked_file(out, site, layer_dir, record.timelapse)
    page.maps = _linked_file(out, site, layer_dir, record.maps)
    for variant, name in sorted(record.variants.items()):
        if src := _linked_file(out, site, layer_dir, name):
            page.variants.append((variant, src))
    if page.maps:
        with Image.open(site / layer_dir / page.maps) as image:
            page.maps_size = image.size
    if page.images:
        first = site / layer_dir / page.images[0]
        with Image.open(first) as image:
            page.size = image.size
        thumb = first.with_name(f"{first.name.split('.')[0]}.thumb.webp")
        page.thumb_size = _thumbnail(first, thumb)
        page.thumb = f"img/{thumb.name}"
    return page


def _map(out: Path, site: Path, layer_dir: str, item: dict) -> dict:
    """Where a concept or a cell fires on an exemplar's image (atlas.learned_exemplars),
    linked beside the patch: {"map_src": ...} (with "map_size"), or {} without a sound one."""
    name, size = item.get("map"), item.get("map_size")
    sized = isinstance(size, list) and len(size) == 2 and all(type(n) is int for n in size)
    if not (isinstance(name, str) and sized) or webp_problem(out / name):
        return {}
    link_or_copy(out / name, site / layer_dir / "ex" / Path(name).name)
    return {"map_src": f"ex/{Path(name).name}", "map_size": size}


def linked_frames(
    out: Path,
    site: Path,
    layer_dir: str,
    frames: list[Frame],
    warn: Callable[[str], None],
) -> list[Frame]:
    """A unit's filmstrip with its pictures linked into the layer's img/ folder (archived ones
    are named by their content's hash, so they never clash with a unit's own files). A frame
    whose file is gone (an older checkpoint pruned) or damaged is a gap, not a broken image;
    a damaged one is named in a warning."""
    linked = []
    for frame in frames:
        problem = webp_problem(out / frame.image) if frame.image else "is missing"
        size = webp_size(out / frame.image) if problem is None else None
        if problem is None and size is None:
            problem = "is corrupt (no size in its header)"
        if problem is None:
            src = _linked_file(out, site, layer_dir, frame.image)
            frame = replace(frame, src=src, size=size)
        if problem not in (None, "is missing"):
            warn(f"{frame.image} {problem}; its filmstrip frame is left as a gap")
        linked.append(frame)
    return linked


def _linked_file(out: Path, site: Path, layer_dir: str, name: str | None) -> str | None:
    """One more file of a unit (its animation, its maps) linked into the layer's img/ folder;
    its path there, or None when the record names none or it is gone."""
    source = out / name if name else None
    if source is None or not source.is_file():
        return None
    link_or_copy(source, site / layer_dir / "img" / source.name)
    return f"img/{source.name}"
