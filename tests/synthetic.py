"""Synthetic atlases (no torch needed): stored units, plan.json and manifest, built with the
real Store, for tests of the site and for the render benchmark. Units can also get what a
worker measures of them (inputs, classes, activation maps) and dataset exemplars with a trust
score, as `analysis` says (see purposes()), and a history of checkpoints (add_history())."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.record import UnitRecord
from atlas.store import Store, layer_dirname

STATUS_CYCLE = ("done",) * 7 + ("failed",)
PLANNED_FIELDS = ("id", "layer", "kind", "index", "label", "key")  # a unit in plan.json
DIGEST = "0123456789abcdef"
EXEMPLAR_FOLDER = "/photos/synthetic"
PATCH_SIZE = 112  # px, as atlas.exemplars cuts them


def webp(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="WEBP", quality=80)
    return buffer.getvalue()


def make_atlas(
    out: Path,
    layers: dict[str, int],
    *,
    labels: dict[int, str] | None = None,
    image_size: int = 64,
    samples: int = 1,
    stale: dict[str, list[int]] | None = None,
    missing: dict[str, list[int]] | None = None,
    images: list[bytes] | None = None,
    analysis: dict[tuple[str, int], dict] | None = None,
) -> Store:
    """`layers` maps layer name -> unit count, in plan order; every 8th unit is failed;
    `missing` units are planned but not stored; `stale` units are stored with an outdated key.
    `images` (optional) are reused round-robin instead of generating one per unit.

    `analysis` gives done units what the workers measure, by (layer, index): "inputs" and
    "classes" (lists of [index, weight]), "maps" (True: a real WebP of two random maps),
    "activation", and "trust" ({"score", "layers", "agreement"}, as atlas.trust stores it;
    with "exemplars": N patches, 3 by
    default); a unit's inputs are from the layer before it in `layers`."""
    store = Store(out)
    stale, missing, analysis = stale or {}, missing or {}, analysis or {}
    planned = []
    seed = 0
    names = list(layers)
    for position, (layer, count) in enumerate(layers.items()):
        for index in range(count):
            label = (labels or {}).get(index) if layer == "logits" else None
            key = f"key-{layer}-{index}"
            unit = UnitRecord(
                layer,
                index,
                "logit" if layer == "logits" else "channel",
                label=label,
                key=key,
                status="missing",
            )
            planned.append({name: getattr(unit, name) for name in PLANNED_FIELDS})
            if index in missing.get(layer, []):
                continue
            status = STATUS_CYCLE[index % len(STATUS_CYCLE)]
            record = dataclasses.replace(
                unit,
                status=status,
                samples=samples,
                recipe="fourier",
                recipe_hash="abc",
                seconds=0.5,
                steps=8,
                device="cpu:2 threads",
                key="an-old-key" if index in stale.get(layer, []) else key,
            )
            if status == "failed":
                store.save_unit(dataclasses.replace(record, error="objective became NaN"), [])
                continue
            record = dataclasses.replace(
                record,
                objective_start=0.1,
                objective_final=2.0,
                objective_best=2.5,
                best_step=6,
                history=tuple((s, s * 0.3) for s in range(8)),
            )
            seed += 1
            data = [
                images[(seed + k) % len(images)] if images else webp(seed * 10 + k, image_size)
                for k in range(samples)
            ]
            measured = analysis.get((layer, index), {})
            record, files = _measured(record, measured, names[position - 1] if position else None)
            store.save_unit(record, data, files)
            if "trust" in measured:
                _save_exemplars(store, record, measured)
    store.write_plan(
        {
            "atlas_version": "0.1.0",
            "torch_version": "2.x",
            "engine_version": "1",
            "model": {"spec": "synthetic<model>", "digest": DIGEST, "weights": None},
            "recipe": {"name": "fourier", "hash": "abc"},
            "recipe_settings": {"steps": 8, "size": image_size},
            "samples": samples,
            "seed": 0,
            "started": "2026-11-21T00:00:00+00:00",
            "finished": "2026-11-21T00:01:00+00:00",
            "layers": [
                {
                    "name": name,
                    "type": "Conv2d",
                    "shape": [count, 7, 7],
                    "channels": count,
                    "dir": layer_dirname(name),
                }
                for name, count in layers.items()
            ],
            "units": planned,
        }
    )
    if any("trust" in measured for measured in analysis.values()):
        store.write_exemplar_summary({"folder": EXEMPLAR_FOLDER, "images": 40, "unreadable": []})
    store.write_manifest()
    return store


def _measured(record: UnitRecord, measured: dict, before: str | None):
    """The record with what `measured` gives it, and the files to store with it."""
    changes: dict = {}
    for name in ("inputs", "classes"):
        if name in measured:
            changes[name] = tuple((int(k), float(w)) for k, w in measured[name])
    if "inputs" in measured:
        changes["inputs_from"] = before
    if "activation" in measured:
        changes["activation"] = measured["activation"]
    files = {}
    if measured.get("maps"):
        files["maps"], changes["map_range"] = map_webp(record.index)
    return dataclasses.replace(record, **changes), files


def _save_exemplars(store: Store, record: UnitRecord, measured: dict) -> None:
    """Exemplar patches of a unit and their record, with a trust score for the unit's key."""
    items = []
    for rank in range(measured.get("exemplars", 3)):
        path = store.exemplar_path(record.layer, record.index, f".{record.key[:8]}.{rank}.webp")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(webp(10_000 + record.index * 10 + rank, PATCH_SIZE))
        items.append(
            {
                "image": path.relative_to(store.out).as_posix(),
                "source": f"photo{record.index}-{rank}.jpg",
                "score": round(2.0 - 0.25 * rank, 5),
                "box": [0.0, 0.0, 16.0, 16.0],
            }
        )
    trust = {"unit_key": record.key, **measured["trust"]}  # "unit_key" there: another key
    store.save_exemplars(
        {
            "layer": record.layer,
            "index": record.index,
            "key": f"exemplar-key-{record.id}",
            "digest": DIGEST,
            "items": items,
            "trust": trust,
        }
    )


def map_webp(seed: int, side: int = 7, scale: int = 8) -> tuple[bytes, tuple[float, float]]:
    """Two random activation maps side by side on one grey scale, as atlas.analysis stores
    them (lossless WebP, one pixel column between them), and their shared range."""
    rng = np.random.default_rng(seed)
    before, after = rng.random((side, side)), rng.random((side, side)) * 3
    low, high = float(min(before.min(), after.min())), float(max(before.max(), after.max()))
    joined = np.concatenate([before, np.full((side, 1), high), after], axis=1)
    level = ((joined - low) / (high - low) * 255).astype(np.uint8)
    size = (joined.shape[1] * scale, side * scale)
    image = Image.fromarray(level).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue(), (round(low, 5), round(high, 5))


def purposes(
    layers: dict[str, int], classes: int = 10, trust: bool = True
) -> dict[tuple[str, int], dict]:
    """An `analysis` for make_atlas where every unit has inputs (but the first layer's),
    classes and maps (but the logits'), and, with `trust`, exemplars and a trust score: unit i
    of a layer is excited most by channel i of the layer before and inhibited most by channel
    i + 1, pushes class i % classes up and (i + 1) % classes down; its trust score is
    ((i * 37) % 100) / 100 (under 0.2 for i = 0, 3, 11), the naturalness at each layer before
    it, and its agreement half the score (None for odd i); the first layer's score is None."""
    found = {}
    names = list(layers)
    for position, (layer, count) in enumerate(layers.items()):
        before = layers[names[position - 1]] if position else 0
        for index in range(count):
            measured: dict = {"activation": round(1.0 + 0.1 * index, 5)}
            if before:
                measured["inputs"] = [
                    [index % before, 0.9],
                    [(index + 2) % before, 0.4],
                    [(index + 1) % before, -0.7],
                ]
            if layer != "logits":
                measured["classes"] = [[index % classes, 2.5], [(index + 1) % classes, -1.5]]
                measured["maps"] = True
            if trust:
                score = ((index * 37) % 100) / 100 if position else None
                natural = {name: score for name in names[:position] if name != "logits"}
                measured["trust"] = {
                    "score": score,
                    "layers": natural if score is not None else {},
                    "agreement": score / 2 if score is not None and index % 2 == 0 else None,
                }
            found[(layer, index)] = measured
    return found


def make_image_folder(folder: Path, count: int = 40) -> list[str]:
    """`count` varied photos-to-be (noise, stripes, blobs; PNG and JPEG, several sizes, one in
    a subfolder), a corrupt JPEG and a text file; returns the readable images' names."""
    rng = np.random.default_rng(0)
    names = []
    for number in range(count):
        height, width = int(rng.integers(24, 80)), int(rng.integers(24, 80))
        y, x = np.mgrid[0:height, 0:width]
        kind = number % 3
        if kind == 0:
            pixels = rng.random((height, width, 3)) * 255
        elif kind == 1:
            period = rng.uniform(3, 20)
            stripes = 127.5 + 127.5 * np.sin(2 * np.pi * (x + y * rng.uniform(-1, 1)) / period)
            pixels = stripes[..., None] * rng.random(3)
        else:
            blob = np.exp(-((y - height / 2) ** 2 + (x - width / 2) ** 2) / (width * 2.0))
            pixels = 255 * blob[..., None] * rng.random(3)
        suffix = ".png" if number % 2 else ".jpg"
        name = f"{'sub/' if number == 7 else ''}img{number:03d}{suffix}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (folder / "notes.txt").write_text("not an image")
    return sorted(names)


def history_change(index: int, position: int) -> float | None:
    """add_history()'s change score of unit `index` at checkpoint `position` (from 0): none at
    the first, then ((37 index + 23 position) % 100) / 100."""
    return round(((index * 37 + position * 23) % 100) / 100, 2) if position else None


def add_history(
    out: Path,
    labels: Sequence[str | None],
    *,
    incomplete: Sequence[int] = (),
    absent: dict[tuple[str, int], Sequence[int]] | None = None,
) -> dict:
    """Give a make_atlas() OUT the history of len(labels) checkpoints that the store writes
    into manifest.json: manifest["checkpoints"] (checkpoint p from 0 run on 2026-11-28 + p
    days, labelled labels[p]; the last is current; those in `incomplete` are not complete) and
    each done or stale unit's "filmstrip", "change" and "change_from". The current frame is
    the unit's own image; earlier ones get a picture of their own in
    OUT/blobs/<hh>/<sha256>.webp. Change scores are history_change()'s; `absent` leaves units
    out of checkpoints, by (layer, index), and a frame after a gap has no score. Returns the
    manifest written."""
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    absent = absent or {}
    digests = [hashlib.sha256(f"weights {p}".encode()).hexdigest() for p in range(len(labels))]
    ids = [f"{p + 1:03d}-{digest[:8]}" for p, digest in enumerate(digests)]
    last = len(ids) - 1
    counts = [0] * len(ids)
    changes: list[dict[str, list[float]]] = [{} for _ in ids]
    for unit in manifest["units"]:
        if unit["status"] not in ("done", "stale") or not unit["images"]:
            continue
        own, frames = unit["images"][0], []
        for position, checkpoint in enumerate(ids):
            if position in absent.get((unit["layer"], unit["index"]), ()):
                continue
            follows = bool(frames) and frames[-1]["checkpoint"] == ids[position - 1]
            change = history_change(unit["index"], position) if follows else None
            image = own if position == last else _blob(out, own, position * 1000 + unit["index"])
            frames.append({"checkpoint": checkpoint, "image": image, "change": change})
            counts[position] += 1
            if change is not None:
                changes[position].setdefault(unit["layer"], []).append(change)
        unit["filmstrip"] = frames
        if frames and frames[-1]["checkpoint"] == ids[last]:
            unit["change"] = frames[-1]["change"]
            unit["change_from"] = ids[last - 1] if unit["change"] is not None else None
    manifest["checkpoints"] = []
    for position, (checkpoint, digest) in enumerate(zip(ids, digests, strict=True)):
        started = datetime(2026, 11, 28, 2, 0) + timedelta(days=position)
        complete = position not in incomplete
        means = {
            layer["name"]: _mean(changes[position].get(layer["name"], []))
            for layer in manifest["layers"]
        }
        finished = f"{started + timedelta(hours=1):%Y-%m-%dT%H:%M:%S}+00:00"
        manifest["checkpoints"].append(
            {
                "id": checkpoint,
                "label": labels[position],
                "digest": digest,
                "started": f"{started:%Y-%m-%dT%H:%M:%S}+00:00",
                "finished": finished if complete else None,
                "complete": complete,
                "current": position == last,
                "units": counts[position],
                "mean_change": means,
            }
        )
    path.write_text(json.dumps(manifest, indent=1))
    return manifest


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def _blob(out: Path, like: str, seed: int) -> str:
    """A picture of an earlier checkpoint, the size of the unit's image `like`, stored by its
    content's hash as atlas.history stores them; its OUT-relative path."""
    with Image.open(out / like) as image:
        data = webp(seed, image.size[0])
    digest = hashlib.sha256(data).hexdigest()
    path = out / "blobs" / digest[:2] / f"{digest}.webp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.relative_to(out).as_posix()
