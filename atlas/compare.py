"""`atlas compare OUT_A OUT_B --out DIR`: two atlases side by side, the most changed units first.

Two models, two checkpoints of one model, or two recipes: units are matched by layer and index.
Concepts and activation-atlas cells are left out, with a line that says so: each atlas learns
its own directions (atlas.learning), so concept k of one is not concept k of the other.
Each unit's change score is atlas.change's, with both sides measured (each model on both
pictures; activations measured cleanly: the stored image, resized, no transforms). The pages
are a small static site in DIR. A side is an OUT folder or one checkpoint of it (OUT@label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atlas import models
from atlas.activations import activation_grid, clean_activations
from atlas.change import change, cross
from atlas.errors import AtlasError
from atlas.files import atomic_write_json, writable_folder
from atlas.layers import resolve
from atlas.optim.device import resolve_device
from atlas.optim.objectives import unit_target
from atlas.record import LEARNED_KINDS, LOGITS, RunRecord, UnitRecord
from atlas.site import Page, link_or_copy, site_info, write_pages
from atlas.store import Store, layer_dirname

GRID_PREVIEW = 12  # most changed pairs on the index page
CHUNK = 256  # units whose images are in memory at once


@dataclass
class Side:
    """One atlas: its folder, plan and facts, done units by (layer, index), and its model."""

    name: str  # "A" or "B"
    out: Path
    plan: dict
    info: dict
    units: dict[tuple[str, int], UnitRecord]
    model: object = None
    learned: int = 0  # its done concepts and cells, left out

    def image(self, key: tuple[str, int]) -> np.ndarray:
        with Image.open(self.out / self.units[key].images[0]) as image:
            return np.array(image.convert("RGB"))


def read_side(name: str, spec: str | Path) -> Side:
    """An atlas folder, or one checkpoint of it: OUT@label (or OUT@id)."""
    out, at = Path(spec), None
    if not out.is_dir() and "@" in str(spec):
        folder, at = str(spec).rsplit("@", 1)
        out = Path(folder)
    if at is not None:
        return _checkpoint_side(name, out, at)
    units, plan = Store(out).classify()
    if plan is None:
        raise AtlasError(f"{out} is not an atlas (no plan.json): run `atlas run ... --out {out}`")
    done = {
        (u.layer, u.index): u
        for u in units
        if u.status == "done" and u.index is not None and u.images and (out / u.images[0]).is_file()
    }
    info = site_info(plan, [u.as_json() for u in units])
    return Side(name, out, plan, {**info, "out": str(out)}, *_channels(done))


def _channels(done: dict) -> tuple[dict, object, int]:
    """The units to pair (all but concepts and cells), no model yet, and how many were left."""
    kept = {key: unit for key, unit in done.items() if unit.kind not in LEARNED_KINDS.values()}
    return kept, None, len(done) - len(kept)


def _checkpoint_side(name: str, out: Path, at: str) -> Side:
    if not (out / "plan.json").is_file():
        raise AtlasError(f"{out} is not an atlas (no plan.json): run `atlas run ... --out {out}`")
    history = Store(out).history
    checkpoint = history.find(at)
    done = {k: u for k, u in history.units(checkpoint).items() if u.status == "done"}
    done = {k: u for k, u in done.items() if k[1] is not None}
    made = RunRecord.from_json(history.plan(checkpoint))
    run = replace(made, spec=checkpoint.spec, digest=checkpoint.digest, weights=checkpoint.weights)
    plan = run.as_json()
    info = site_info(plan, [u.as_json() for u in done.values()])
    return Side(name, out, plan, {**info, "out": f"{out}@{checkpoint.name}"}, *_channels(done))


def load_model(side: Side, loaded: dict):
    """The model that made the atlas, loaded once per weights digest; its weights must still
    be the ones the atlas was made with."""
    run = RunRecord.from_json(side.plan)
    digest = run.digest
    if digest in loaded:
        return loaded[digest]
    model = models.load(run.spec, run.weights)
    if model.digest != digest:
        raise AtlasError(
            f"atlas {side.name} ({side.out}) was made with weights {digest}, but "
            f"{model.spec} now loads weights {model.digest}: the weights file changed"
        )
    loaded[digest] = model
    return model


def fits(model, layer: str, index: int) -> bool:
    try:
        return index < resolve(model, layer).channels
    except AtlasError:
        return False


def score_pairs(a: Side, b: Side, keys: list[tuple[str, int]], device: torch.device) -> list:
    """Per matched unit: the four clean activations, both cross ratios and the change. Images
    are read CHUNK units at a time (a full atlas's would not fit in memory); each model sees
    the grey image once, for every unit at the same time."""
    if not keys:
        return []
    for side in (a, b):
        side.model.module.to(device)
    targets = [unit_target(*key) for key in keys]
    grey = np.full_like(a.image(keys[0]), 128)
    a_on_grey = activation_grid(a.model, targets, [grey])[0].tolist()
    b_on_grey = activation_grid(b.model, targets, [grey])[0].tolist()
    rows = []
    for first in range(0, len(keys), CHUNK):
        chunk = slice(first, first + CHUNK)
        images_a = [a.image(key) for key in keys[chunk]]
        images_b = [b.image(key) for key in keys[chunk]]
        a_on_a = clean_activations(a.model, targets[chunk], images_a)
        a_on_b = clean_activations(a.model, targets[chunk], images_b)
        b_on_b = clean_activations(b.model, targets[chunk], images_b)
        b_on_a = clean_activations(b.model, targets[chunk], images_a)
        for i, (layer, index) in enumerate(keys[chunk]):
            values = {
                "a_on_a": a_on_a[i],
                "a_on_b": a_on_b[i],
                "a_on_grey": a_on_grey[first + i],
                "b_on_b": b_on_b[i],
                "b_on_a": b_on_a[i],
                "b_on_grey": b_on_grey[first + i],
            }
            rows.append(_row(a, layer, index, values))
    return rows


def _row(a: Side, layer: str, index: int, values: dict[str, float]) -> dict:
    crosses = [
        cross(values["a_on_b"], values["a_on_a"], values["a_on_grey"]),
        cross(values["b_on_a"], values["b_on_b"], values["b_on_grey"]),
    ]
    return {
        "layer": layer,
        "index": index,
        "id": f"{layer}:{index}",
        "label": a.units[(layer, index)].label,
        **values,
        "cross_a": crosses[0],
        "cross_b": crosses[1],
        "change": change(crosses),
    }


def check_destination(dest: Path, atlases: list[Path]) -> None:
    """The pages' folder is cleaned of stale pages on every compare, so it must be compare's
    own: new, empty, or an earlier compare's (it has compare.json), and apart from both
    atlases."""
    target = dest.resolve()
    for atlas in (a.resolve() for a in atlases):
        if target == atlas or atlas in target.parents or target in atlas.parents:
            raise AtlasError(f"--out {dest} overlaps the atlas {atlas}: choose a separate folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "compare.json").is_file():
        raise AtlasError(
            f"--out {dest} holds other files: choose a new folder or an earlier compare's"
        )


def _by_change(row: dict) -> tuple:
    change = row["change"]
    return (math.isnan(change), -change if not math.isnan(change) else 0, row["index"])


@dataclass
class CompareSummary:
    matched: int
    only_a: int
    only_b: int
    layers: list[dict]
    most_changed: list[dict]
    index: Path
    learned: int = 0  # concepts and cells of either atlas, left out


def compare(out_a: str | Path, out_b: str | Path, dest: str | Path, device: str | None = None):
    """Score every unit both atlases have done, write DIR/compare.json and the pages."""
    a, b = read_side("A", out_a), read_side("B", out_b)
    if (a.out.resolve(), a.info["digest"]) == (b.out.resolve(), b.info["digest"]):
        raise AtlasError("compare needs two different atlas folders, or two checkpoints of one")
    check_destination(Path(dest), [a.out, b.out])
    dest = writable_folder(dest)
    loaded: dict = {}
    for side in (a, b):
        side.model = load_model(side, loaded)
    shared = sorted(set(a.units) & set(b.units), key=lambda k: (k[0] == LOGITS, k))
    keys = [k for k in shared if fits(a.model, *k) and fits(b.model, *k)]
    if not keys:
        raise AtlasError(f"{a.out} and {b.out} have no finished unit in common to compare")
    rows = score_pairs(a, b, keys, resolve_device(device))
    layer_order = list(dict.fromkeys(row["layer"] for row in rows))
    layers = []
    for layer in layer_order:
        ranked = sorted((r for r in rows if r["layer"] == layer), key=_by_change)
        changes = [r["change"] for r in ranked if not math.isnan(r["change"])]
        layers.append(
            {
                "name": layer,
                "dir": layer_dirname(layer),
                "units": ranked,
                "mean_change": sum(changes) / len(changes) if changes else math.nan,
                "max_change": max(changes, default=math.nan),
            }
        )
    summary = CompareSummary(
        matched=len(rows),
        only_a=len(set(a.units) - set(keys)),
        only_b=len(set(b.units) - set(keys)),
        layers=layers,
        most_changed=sorted(rows, key=_by_change)[:GRID_PREVIEW],
        index=dest / "index.html",
        learned=a.learned + b.learned,
    )
    atomic_write_json(
        dest / "compare.json",
        {
            "a": a.info,
            "b": b.info,
            "matched": summary.matched,
            "only_a": summary.only_a,
            "only_b": summary.only_b,
            "layers": layers,
        },
    )
    write_pages(dest, compare_pages(a, b, summary, dest))
    return summary


def compare_pages(a: Side, b: Side, summary: CompareSummary, dest: Path) -> list[Page]:
    """Every page of the compare site: the index, a grid per layer and a page per pair. Links
    both sides' images into `dest` on the way and names them in each row."""
    common = {
        "a": a.info,
        "b": b.info,
        "info": {**a.info, "spec": f"{a.info['spec']} vs {b.info['spec']}"},
        "summary": summary,
    }
    pages = [Page("index.html", "compare_index.html", {**common, "root": ""})]
    for layer in summary.layers:
        units = layer["units"]
        context = {**common, "root": "../", "layer": layer}
        pages.append(Page(f"{layer['dir']}/index.html", "compare_layer.html", context))
        for rank, row in enumerate(units):
            images = [_link_image(side, row, dest / layer["dir"]) for side in (a, b)]
            context = {
                **common,
                "root": "../",
                "layer": layer,
                "row": row,
                "rank": rank + 1,
                "previous": units[rank - 1] if rank > 0 else None,
                "next": units[rank + 1] if rank + 1 < len(units) else None,
            }
            path = f"{layer['dir']}/{row['index']}.html"
            links = tuple(f"{layer['dir']}/{image}" for image in images)
            pages.append(Page(path, "compare_unit.html", context, row["id"], links))
    return pages


def _link_image(side: Side, row: dict, folder: Path) -> str:
    """Link one side's image of the pair into `folder`/img/ and note it in the row as
    image_a or image_b; returns its path relative to `folder`."""
    source = side.out / side.units[(row["layer"], row["index"])].images[0]
    name = f"img/{row['index']}.{side.name.lower()}{source.suffix}"
    link_or_copy(source, folder / name)
    row[f"image_{side.name.lower()}"] = name
    return name


def describe(summary: CompareSummary) -> str:
    """The lines `atlas compare` prints."""
    top = ", ".join(
        f"{row['id']} ({row['change']:.2f})"
        for row in summary.most_changed[:5]
        if not math.isnan(row["change"])
    )
    skipped = (
        f"left out {summary.learned} concepts and activation-atlas cells: each atlas learns its "
        "own, so they do not pair by index\n"
        if summary.learned
        else ""
    )
    return (
        f"compared {summary.matched} units in {len(summary.layers)} layers "
        f"({summary.only_a} only in A, {summary.only_b} only in B)\n"
        f"{skipped}most changed: {top or '-'}\n"
        f"compare: {summary.index}"
    )
