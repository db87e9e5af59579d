"""The static atlas: OUT/manifest.json and the unit images -> OUT/site/.

Pages: index.html (the model and its layers), <layer>/index.html (a grid of every unit),
<layer>/<index>.html (one unit). Everything is relative links to files (no fetch, no network),
so the site works from file:// and from any static host. This module never imports torch.

Pages are data: a build first lists every page it writes as (path, template, context), then one
writer (write_pages, shared with `atlas compare`) renders and writes them; what a rerender keeps
is derived from that list, so a new page kind is one entry and never a forgotten file to keep.

A damaged stored file never stops a render: it is named in one `warning:` line, its unit is
shown as missing (the next `atlas run` redoes it), and a damaged manifest is rebuilt from the
unit files, which are the truth.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image, UnidentifiedImageError

from atlas import history_view
from atlas.errors import AtlasError
from atlas.files import atomic_write_bytes, exclusive_lock, remove_temporaries
from atlas.names import LOGITS
from atlas.record import UnitRecord
from atlas.store import STATUSES, Store, layer_dirname, warn, webp_problem, webp_size
from atlas.views import (
    CURVE_HEIGHT,
    CURVE_WIDTH,
    LOW_TRUST,
    PLANNED,
    UnitView,
    as_planned,
    connect,
    parse_record,
)

THUMB_SIZE = 128  # px; larger unit images get a downscaled WebP thumbnail
PREVIEWS_PER_LAYER = 6
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def environment() -> Environment:
    """Jinja2 with autoescape on and StrictUndefined: a typo in a template is an error."""
    env = Environment(
        loader=PackageLoader("atlas.templates", ""),  # templates/ of the repository
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # one build: no stat of every template for each page
    )
    env.filters["number"] = lambda v: "-" if v is None else f"{v:.3f}"
    env.filters["seconds"] = lambda v: "-" if v is None else f"{v:.2f} s"
    env.filters["change"] = lambda v: "-" if v is None or math.isnan(v) else f"{v:.2f}"
    env.filters["signed"] = lambda v: f"{v:+.3g}"
    env.filters["dash"] = lambda v: "-" if v is None else v
    return env


@dataclass(frozen=True)
class Page:
    """One file a build writes. `unit` is the id of the unit it shows (named when the page
    fails to render); `links` are the unit files it points to, relative to the site root, which
    the sweep of stale files keeps."""

    path: str  # relative to the site root, "/"-separated
    template: str
    context: dict
    unit: str | None = None
    links: tuple[str, ...] = ()


def write_if_changed(path: Path, text: str) -> None:
    """Write a page only when it changed (a nightly rerender touches few files)."""
    data = text.encode()
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data, durable=False)


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


def _unit_view(
    out: Path, site: Path, record: UnitRecord, warn: Callable[[str], None] = warn
) -> UnitView:
    """Link the unit's images into the site (so that it can be published alone), make its
    thumbnail, and describe it for the pages; paths are relative to the layer folder. A unit
    with a damaged image is named in a warning and shown as missing, not a crash."""
    redo = f"the next atlas run redoes {record.id}"
    for name in record.files:
        if problem := webp_problem(out / name):
            warn(f"{name} {problem}; {redo}")
            return _missing_view(record)
    try:
        return _linked_view(out, site, record, warn)
    except DECODE_ERRORS:  # a sound header over damaged pixels: Pillow tells at decode
        warn(f"{record.images[0]} is corrupt (cannot decode); {redo}")
        return _missing_view(record)


def _missing_view(record: UnitRecord) -> UnitView:
    """A unit whose stored images cannot be shown: as planned but not computed."""
    return UnitView(as_planned(record), layer_dirname(record.layer), [], None)


def _linked_view(
    out: Path, site: Path, record: UnitRecord, warn: Callable[[str], None]
) -> UnitView:
    layer_dir = layer_dirname(record.layer)
    view = UnitView(record, layer_dir, [], None)
    for image in record.images:
        source = out / image
        if not source.is_file():
            continue
        name = Path(image).name
        link_or_copy(source, site / layer_dir / "img" / name)
        view.images.append(f"img/{name}")
    for item in record.exemplars:
        source = out / item["image"]
        if problem := webp_problem(source):
            if problem != "is missing":
                warn(f"{item['image']} {problem}; the next atlas run with --exemplars redoes it")
        else:
            link_or_copy(source, site / layer_dir / "ex" / source.name)
            view.exemplars.append({**item, "src": f"ex/{source.name}"})
    view.timelapse = _linked_file(out, site, layer_dir, record.timelapse)
    view.maps = _linked_file(out, site, layer_dir, record.maps)
    for variant, name in sorted(record.variants.items()):
        if src := _linked_file(out, site, layer_dir, name):
            view.variants.append((variant, src))
    if view.maps:
        with Image.open(site / layer_dir / view.maps) as image:
            view.maps_size = image.size
    if view.images:
        first = site / layer_dir / view.images[0]
        with Image.open(first) as image:
            view.size = image.size
        thumb = first.with_name(f"{first.name.split('.')[0]}.thumb.webp")
        view.thumb_size = _thumbnail(first, thumb)
        view.thumb = f"img/{thumb.name}"
    return view


def _linked_frames(
    out: Path,
    site: Path,
    layer_dir: str,
    frames: list[history_view.Frame],
    warn: Callable[[str], None],
) -> list[history_view.Frame]:
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


def site_info(manifest: dict, units: list[dict]) -> dict:
    """The facts every page shows, with defaults for manifests of interrupted runs."""
    model = manifest.get("model") or {}
    recipe = manifest.get("recipe") or {}
    settings = manifest.get("recipe_settings") or {}
    devices = sorted({u["device"] for u in units if u.get("device")})
    return {
        "spec": model.get("spec", "unknown model"),
        "digest": model.get("digest", "?"),
        "weights": model.get("weights") or "default",
        "input": (model.get("preprocessing") or {}).get("described", "not recorded"),
        "recipe": recipe.get("name", "?"),
        "recipe_hash": recipe.get("hash", "?"),
        "steps": settings.get("steps", "?"),
        "size": settings.get("size", "?"),
        "samples": manifest.get("samples", 1),
        "seed": manifest.get("seed", 0),
        "started": manifest.get("started", "?"),
        "finished": manifest.get("finished"),
        "devices": ", ".join(devices) or "?",
        "atlas_version": manifest.get("atlas_version", "?"),
        "torch_version": manifest.get("torch_version", "?"),
    }


def manifest_path(out: Path) -> Path:
    path = out / "manifest.json"
    if not path.is_file():
        raise AtlasError(f"{out} has no manifest.json: run `atlas run ... --out {out}` first")
    return path


def load_manifest(out: Path, warn: Callable[[str], None] = warn) -> dict:
    """OUT/manifest.json; a damaged one is rebuilt from plan.json and the unit JSONs (it only
    gathers them, so nothing is lost), with a warning naming it."""
    path = manifest_path(out)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("units", []), list):
        return manifest
    warn("manifest.json is corrupt; rebuilt from plan.json and the unit files")
    return Store(out, warn).write_manifest()


def render(out: str | Path, warn: Callable[[str], None] = warn) -> Path:
    """Render OUT/site/ from OUT/manifest.json; returns the path of index.html. Renders of one
    OUT take turns (`atlas render` may run beside the render that ends `atlas run`), so the
    last one to finish shows the newest manifest and none deletes what another is writing.
    Damaged files are reported through `warn` (a `warning:` line on stderr by default)."""
    out = Path(out)
    manifest_path(out)  # a clear error before a lock file is left in a folder that is no atlas
    with exclusive_lock(out / ".render.lock") as alone:
        return _render(out, load_manifest(out, warn), sweep=alone, warn=warn)


def _render(out: Path, manifest: dict, sweep: bool, warn: Callable[[str], None] = warn) -> Path:
    site = out / "site"
    write_pages(site, site_pages(out, site, manifest, warn), sweep=sweep)
    return site / "index.html"


def unit_records(
    out: Path, manifest: dict, warn: Callable[[str], None]
) -> tuple[dict, list[UnitRecord], dict[str, UnitRecord]]:
    """The manifest, its unit records and its whole-layer images by layer. A manifest with an
    entry that is no unit record atlas can read is damaged: it is rebuilt from the unit files
    (which are the truth), as load_manifest does with one that is no JSON; a unit whose own
    file is what is damaged is named and shown as missing."""
    entries = manifest.get("units", [])
    records = [parse_record(data) for data in entries]
    if any(record is None for record in records):
        warn("manifest.json is corrupt (a unit atlas cannot read); rebuilt from the unit files")
        manifest = Store(out, warn).write_manifest()
        entries = manifest["units"]
        records = [parse_record(data) for data in entries]
    shown, wholes = [], []
    for record, data in zip(records, entries, strict=True):
        if record is None:  # the unit's own file: the store took it for sound
            record = parse_record({name: data.get(name) for name in PLANNED if name in data})
            if record is None:
                continue
            name = f"units/{layer_dirname(record.layer)}/{record.index}.json"
            warn(f"{name} has fields atlas cannot read; shown as missing (delete it to redo it)")
            record = as_planned(record)
        (shown if record.index is not None else wholes).append(record)
    return manifest, shown, {record.layer: record for record in wholes}


def site_pages(out: Path, site: Path, manifest: dict, warn: Callable[[str], None]) -> list[Page]:
    """Every page of the atlas: the index, a grid per layer, a page per unit and the search
    index. Links the unit images into `site` and makes thumbnails on the way (see _unit_view).
    Each damaged file is named once, though several units' filmstrips share it."""
    warn = _once(warn)
    manifest, records, wholes = unit_records(out, manifest, warn)
    checkpoints = history_view.timeline(manifest)
    layers = [dict(layer) for layer in manifest.get("layers", [])]
    planned = [layer["name"] for layer in layers]
    units_by_layer: dict[str, list[UnitView]] = {name: [] for name in planned}
    for record in records:
        if record.layer not in units_by_layer:  # a layer no longer planned: its units are stale
            units_by_layer[record.layer] = []
            layers.append({"name": record.layer, "type": "not planned", "shape": []})
        view = _unit_view(out, site, record, warn)
        if checkpoints:
            frames = history_view.filmstrip(view.record, checkpoints)
            view.filmstrip = _linked_frames(out, site, view.layer_dir, frames, warn)
        units_by_layer[record.layer].append(view)
    connect(units_by_layer, planned, _labels(manifest))
    for layer in layers:
        layer["dir"] = layer_dirname(layer["name"])
        layer["units"] = len(units_by_layer[layer["name"]])
    counts_by_layer = {
        name: Counter(unit.status for unit in units) for name, units in units_by_layer.items()
    }
    exemplars = manifest.get("exemplars") or {}
    shown = sum(counts_by_layer.values(), Counter())  # a damaged unit counts as missing
    common = {
        "info": site_info(manifest, manifest.get("units", [])),
        "counts": {status: shown.get(status, 0) for status in STATUSES},
        "exemplar_folder": Path(exemplars.get("folder", "the exemplar folder")).name,
        "low_trust": LOW_TRUST,
        "timeline": checkpoints,
    }
    pages = []
    search = []
    model_labels = _labels(manifest)
    labels = {}  # class index -> label, of the classes the search can name
    for layer in layers:
        units = units_by_layer[layer["name"]]
        by_default, shown_units = history_view.grid_order(units, checkpoints)
        context = {
            **common,
            "root": "../",
            "layer": layer,
            "units": shown_units,
            "is_logits": layer["name"] == LOGITS,
            "layer_counts": counts_by_layer[layer["name"]],
            "sorts": _sorts(units),
            "default_sort": by_default,
            "last_step": history_view.last_step(checkpoints),
            "push_filter": any(unit.classes.up for unit in units),
            "low_trust_units": sum(unit.low_trust for unit in units),
            "whole": _whole_layer(out, site, wholes.get(layer["name"]), warn),
        }
        whole_files = tuple(context["whole"].files()) if context["whole"] else ()
        links = tuple(f"{layer['dir']}/{name}" for name in whole_files)
        pages.append(Page(f"{layer['dir']}/index.html", "layer.html", context, links=links))
        for position, unit in enumerate(units):
            pages.append(_unit_page(common, layer, units, position))
            label = unit.record.label or ""
            pushes = [index for index, effect in unit.record.classes if effect > 0]
            search.append([unit.record.id, label, f"{layer['dir']}/{unit.page}", pushes])
            labels.update((str(k), model_labels[k]) for k in pushes if k < len(model_labels))
            if layer["name"] == LOGITS and label:
                labels[str(unit.index)] = label
    previews = {
        name: [unit for unit in units if unit.thumb][:PREVIEWS_PER_LAYER]
        for name, units in units_by_layer.items()
    }
    context = {**common, "root": "", "layers": layers, "previews": previews}
    pages.append(Page("index.html", "index.html", {**context, "status_by_layer": counts_by_layer}))
    search_context = {"search": search, "labels": labels}
    pages.append(Page("search-index.js", "search-index.js", search_context))
    return pages


def _once(warn: Callable[[str], None]) -> Callable[[str], None]:
    """`warn`, saying each message once (archived pictures are stored once by content)."""
    said: set[str] = set()

    def once(message: str) -> None:
        if message not in said:
            said.add(message)
            warn(message)

    return once


def _whole_layer(
    out: Path, site: Path, record: UnitRecord | None, warn: Callable[[str], None]
) -> UnitView | None:
    """The layer's whole-layer image (`--variants layer`) as its page shows it, if done."""
    if record is None or record.status != "done":
        return None
    view = _unit_view(out, site, record, warn)
    return view if view.images else None


def _labels(manifest: dict) -> list[str]:
    """The model's class labels as plan.json records them (none for older atlases)."""
    labels = manifest.get("labels")
    return [str(label) for label in labels] if isinstance(labels, list) else []


def _sorts(units: list[UnitView]) -> list[tuple[str, str]]:
    """The orders the layer grid offers (value, name): by index, and by change since the
    previous checkpoint, trust and activation ratio when some unit has one."""
    sorts = [("index", "unit index")]
    if any(unit.change is not None for unit in units):
        sorts.append((history_view.CHANGE_SORT, "change since the previous checkpoint, most first"))
    if any(unit.trust_score is not None for unit in units):
        sorts += [("trust-low", "trust, lowest first"), ("trust-high", "trust, highest first")]
    if any(unit.activation_ratio is not None for unit in units):
        sorts += [
            ("ratio-high", "activation ratio, highest first"),
            ("ratio-low", "activation ratio, lowest first"),
        ]
    return sorts


def _unit_page(common: dict, layer: dict, units: list[UnitView], position: int) -> Page:
    unit = units[position]
    context = {
        **common,
        "root": "../",
        "layer": layer,
        "unit": unit,
        "curve_size": (CURVE_WIDTH, CURVE_HEIGHT),
        "plot_size": (history_view.PLOT_WIDTH, history_view.PLOT_HEIGHT),
        "change_dots": history_view.change_dots(unit.filmstrip, len(common["timeline"])),
        "previous": units[position - 1] if position > 0 else None,
        "next": units[position + 1] if position + 1 < len(units) else None,
    }
    links = tuple(f"{layer['dir']}/{name}" for name in unit.files())
    return Page(f"{layer['dir']}/{unit.page}", "unit.html", context, unit.record.id, links)


def write_pages(root: Path, pages: list[Page], *, sweep: bool = True) -> None:
    """The one page writer, of `atlas render` and `atlas compare`: copy the assets, write the
    pages that changed, then delete the pages and images under `root` that are neither a page,
    nor linked by one, nor an asset (see remove_stale). A page that fails to render stops the
    build with an AtlasError naming it and its unit, before anything is deleted."""
    env = environment()
    keep = {root / path for path in copy_static(root)}
    for page in pages:
        write_if_changed(root / page.path, _render_page(env, page))
        keep.add(root / page.path)
        keep.update(root / link for link in page.links)
    remove_stale(root, keep, sweep=sweep)


def _render_page(env: Environment, page: Page) -> str:
    try:
        return env.get_template(page.template).render(page.context)
    except Exception as error:  # a template error or a bad value in a record, of this page
        unit = f" (unit {page.unit})" if page.unit else ""
        raise AtlasError(
            f"page {page.path}{unit} failed: {type(error).__name__}: {error}"
        ) from error


def remove_stale(root: Path, keep: set[Path], sweep: bool = True) -> int:
    """Delete the pages and images under `root` not in `keep` (units pruned since, older
    animations and exemplar patches), then empty folders; any other file stays. With `sweep`
    (only for the folder's one writer), also the temporaries a killed render left. Returns how
    many files went."""
    removed = remove_temporaries(root, below=True) if sweep else 0
    for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
        if path.is_file() and path.suffix in {".html", ".webp"} and path not in keep:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def copy_static(root: Path) -> list[str]:
    """Copy the assets (site/ of the repository) into root/static/; returns their paths
    relative to `root`."""
    copied = []
    for asset in resources.files("atlas.static").iterdir():
        if asset.is_file() and asset.name.endswith((".css", ".js")):
            write_if_changed(root / "static" / asset.name, asset.read_text())
            copied.append(f"static/{asset.name}")
    return copied
