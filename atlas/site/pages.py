"""The pages of an atlas as data: index.html (the model and its layers), <layer>/index.html (a
grid of every unit; a layer's concepts are a layer of their own, <layer>~concepts, and its
activation atlas, <layer>~atlas, is laid out on its grid), <layer>/<index>.html (one unit,
concepts and cells too) and search-index.js, each a Page (path, template, context) for the
writer (atlas.site.writer).

A damaged stored file never stops a build: it is named in one `warning:` line and its unit is
shown as missing (the next `atlas run` redoes it); a manifest entry atlas cannot read has the
manifest rebuilt from the unit files, which are the truth.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from atlas.record import (
    LOGITS,
    LOW_TRUST,
    MATCHED,
    RunRecord,
    UnitRecord,
    learned_layer,
    split_layer,
)
from atlas.site import timeline
from atlas.site.linking import linked_frames, unit_page
from atlas.site.units import (
    CURVE_HEIGHT,
    CURVE_WIDTH,
    PLANNED,
    UnitPage,
    as_planned,
    connect,
    grid_order,
    parse_record,
)
from atlas.site.writer import Page
from atlas.store import STATUSES, Store, layer_dirname

PREVIEWS_PER_LAYER = 6


def site_info(manifest: dict, units: list[dict]) -> dict:
    """The facts every page shows, from the run record the manifest carries (with its defaults
    for manifests of interrupted runs)."""
    run = RunRecord.from_json(manifest)
    devices = sorted({u["device"] for u in units if u.get("device")})
    return {
        "spec": run.spec,
        "digest": run.digest,
        "weights": run.weights or "default",
        "input": (run.preprocessing or {}).get("described", "not recorded"),
        "recipe": run.recipe,
        "recipe_hash": run.recipe_hash,
        "steps": run.recipe_settings.get("steps", "?"),
        "size": run.recipe_settings.get("size", "?"),
        "samples": run.samples,
        "seed": run.seed,
        "started": run.started or "?",
        "finished": run.finished,
        "devices": ", ".join(devices) or "?",
        "atlas_version": run.atlas_version,
        "torch_version": run.torch_version,
    }


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
    checkpoints = timeline.timeline(manifest)
    layers = [dict(layer) for layer in manifest.get("layers", [])]
    planned = [layer["name"] for layer in layers]
    units_by_layer: dict[str, list[UnitPage]] = {name: [] for name in planned}
    for record in records:
        if record.layer not in units_by_layer:  # a layer no longer planned: its units are stale
            units_by_layer[record.layer] = []
            layers.append({"name": record.layer, "type": "not planned", "shape": []})
        page = unit_page(out, site, record, warn)
        if checkpoints:
            frames = timeline.filmstrip(page.record, checkpoints)
            page.filmstrip = linked_frames(out, site, page.layer_dir, frames, warn)
        units_by_layer[record.layer].append(page)
    connect(units_by_layer, planned, _labels(manifest))
    for layer in layers:
        layer["dir"] = layer_dirname(layer["name"])
        layer["units"] = len(units_by_layer[layer["name"]])
        layer["title"] = _title(layer)
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
        "matched": MATCHED,
        "timeline": checkpoints,
    }
    pages = []
    search = []
    model_labels = _labels(manifest)
    labels = {}  # class index -> label, of the classes the search can name
    for layer in layers:
        units = units_by_layer[layer["name"]]
        if layer.get("atlas_of"):
            pages.append(_atlas_page(common, layer, units))
        else:
            whole = _whole_layer(out, site, wholes.get(layer["name"]), warn)
            counts = counts_by_layer[layer["name"]]
            pages.append(_layer_page(common, layer, units_by_layer, counts, whole))
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


def _layer_page(
    common: dict,
    layer: dict,
    units_by_layer: dict[str, list[UnitPage]],
    counts: Counter,
    whole: UnitPage | None,
) -> Page:
    """A layer's grid of units; a real layer's also lists its concepts, by share, and links
    to its activation atlas (atlas.learning)."""
    units = units_by_layer[layer["name"]]
    checkpoints = common["timeline"]
    by_default, shown_units = grid_order(units, checkpoints)
    concepts = learned_layer(layer["name"], "concepts")
    atlas = learned_layer(layer["name"], "atlas")
    context = {
        **common,
        "root": "../",
        "layer": layer,
        "units": shown_units,
        "is_logits": layer["name"] == LOGITS,
        "layer_counts": counts,
        "sorts": _sorts(units),
        "default_sort": by_default,
        "last_step": timeline.last_step(checkpoints),
        "push_filter": any(unit.classes.up for unit in units),
        "low_trust_units": sum(unit.low_trust for unit in units),
        "whole": whole,
        "concepts": sorted(
            current(units_by_layer.get(concepts, [])), key=lambda u: -(u.share or 0)
        ),
        "concepts_dir": layer_dirname(concepts),
        "atlas": units_by_layer.get(atlas),
        "atlas_dir": layer_dirname(atlas),
    }
    links = tuple(f"{layer['dir']}/{name}" for name in (whole.files() if whole else ()))
    return Page(f"{layer['dir']}/index.html", "layer.html", context, links=links)


def _atlas_page(common: dict, layer: dict, units: list[UnitPage]) -> Page:
    """A layer's activation atlas: its N x N grid with each cell's picture where UMAP put its
    activations, sized by its count (the square root of its share of the fullest cell's), and
    a panel per cell."""
    placed = current(units)
    places = [
        ((unit.learned or {}).get("row", 0), (unit.learned or {}).get("col", 0)) for unit in placed
    ]
    # a layer no longer planned has no shape in the manifest: its grid is as large as its cells
    size = layer["shape"][0] if layer.get("shape") else 1 + max(max(p) for p in places + [(0, 0)])
    fullest = max([unit.count or 0 for unit in placed] + [1])
    cells = [
        {
            "unit": unit,
            "row": row,
            "col": col,
            "scale": round(0.35 + 0.65 * math.sqrt((unit.count or 0) / fullest), 3),
        }
        for unit, (row, col) in zip(placed, places, strict=True)
    ]
    of = layer.get("atlas_of", "")
    context = {
        **common,
        "root": "../",
        "layer": layer,
        "of": {"name": of, "dir": layer_dirname(of)},
        "size": size,
        "cells": cells,
        "layer_counts": Counter(unit.status for unit in units),
    }
    links = tuple(f"{layer['dir']}/{name}" for unit in units for name in unit.files())
    return Page(f"{layer['dir']}/index.html", "atlas.html", context, links=links)


def current(units: list[UnitPage]) -> list[UnitPage]:
    """The units of a learned layer that its last atlas or dictionary made, without those an
    earlier one (another K, N or checkpoint) left stored: their places and ranks belong to a
    layout that is gone. A layer no longer planned keeps all of its own."""
    made = [unit for unit in units if unit.status != "stale"]
    return made or units


def _title(layer: dict) -> str:
    """How the pages head a layer: the class logits, a learned layer by what it is ("16
    concepts of blocks.8"), any other by its name."""
    if layer["name"] == LOGITS:
        return "Class logits"
    learned = split_layer(layer["name"])[1] and layer["type"] != "not planned"
    return layer["type"] if learned else layer["name"]


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
) -> UnitPage | None:
    """The layer's whole-layer image (`--variants layer`) as its page shows it, if done."""
    if record is None or record.status != "done":
        return None
    page = unit_page(out, site, record, warn)
    return page if page.images else None


def _labels(manifest: dict) -> list[str]:
    """The model's class labels as plan.json records them (none for older atlases)."""
    labels = manifest.get("labels")
    return [str(label) for label in labels] if isinstance(labels, list) else []


def _sorts(units: list[UnitPage]) -> list[tuple[str, str]]:
    """The orders the layer grid offers (value, name): by index, and by change since the
    previous checkpoint, trust and activation ratio when some unit has one."""
    sorts = [("index", "unit index")]
    if any(unit.share is not None for unit in units):
        sorts.append(("share-high", "share of the layer's activations, largest first"))
    if any(unit.change is not None for unit in units):
        sorts.append((timeline.CHANGE_SORT, "change since the previous checkpoint, most first"))
    if any(unit.trust_score is not None for unit in units):
        sorts += [("trust-low", "trust, lowest first"), ("trust-high", "trust, highest first")]
    if any(unit.activation_ratio is not None for unit in units):
        sorts += [
            ("ratio-high", "activation ratio, highest first"),
            ("ratio-low", "activation ratio, lowest first"),
        ]
    return sorts


def _unit_page(common: dict, layer: dict, units: list[UnitPage], position: int) -> Page:
    unit = units[position]
    context = {
        **common,
        "root": "../",
        "layer": layer,
        "unit": unit,
        "curve_size": (CURVE_WIDTH, CURVE_HEIGHT),
        "plot_size": (timeline.PLOT_WIDTH, timeline.PLOT_HEIGHT),
        "change_dots": timeline.change_dots(unit.filmstrip, len(common["timeline"])),
        "previous": units[position - 1] if position > 0 else None,
        "next": units[position + 1] if position + 1 < len(units) else None,
    }
    links = tuple(f"{layer['dir']}/{name}" for name in unit.files())
    return Page(f"{layer['dir']}/{unit.page}", "unit.html", context, unit.record.id, links)
