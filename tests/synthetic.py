"""Synthetic atlases (no torch needed): stored units, plan.json and manifest, built with the
real Store, for tests of the site and for the render benchmark."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.record import UnitRecord
from atlas.store import Store, layer_dirname

STATUS_CYCLE = ("done",) * 7 + ("failed",)
PLANNED_FIELDS = ("id", "layer", "kind", "index", "label", "key")  # a unit in plan.json


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
) -> Store:
    """`layers` maps layer name -> unit count; every 8th unit is failed; `missing` units are
    planned but not stored; `stale` units are stored with an outdated key. `images` (optional)
    are reused round-robin instead of generating one per unit."""
    store = Store(out)
    stale, missing = stale or {}, missing or {}
    planned = []
    seed = 0
    for layer, count in layers.items():
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
            store.save_unit(record, data)
    store.write_plan(
        {
            "atlas_version": "0.1.0",
            "torch_version": "2.x",
            "engine_version": "1",
            "model": {"spec": "synthetic<model>", "digest": "0123456789abcdef", "weights": None},
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
    store.write_manifest()
    return store


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
