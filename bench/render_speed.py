"""How long `atlas render` takes for a large atlas: 20,000 synthetic units by default, and
with `--checkpoints N` a nightly atlas of N checkpoints (issue 14).

    .venv/bin/python bench/render_speed.py [--units 20000] [--keep DIR]
    .venv/bin/python bench/render_speed.py --units 4120 --checkpoints 30 [--changed 0.3]

Builds the atlas with the real Store (a few distinct WebP images reused, 128 px), then times
a first render and an unchanged rerender, and prints both. With checkpoints, each earlier
checkpoint is archived by the real atlas.history (as a run with new weights does), a share
`--changed` of the units getting a new picture and a change score at each; the manifest
rebuild (what ends a run), the render and the disk use are measured, and one unit page's size
after 1, N/2 and N checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from synthetic import make_atlas, webp  # noqa: E402

from atlas.files import atomic_write_bytes  # noqa: E402
from atlas.record import UnitRecord  # noqa: E402
from atlas.site import render  # noqa: E402
from atlas.store import Store  # noqa: E402


@dataclasses.dataclass
class FakeWeights:
    """What History.begin reads of a loaded model."""

    digest: str
    spec: str = "synthetic<model>"
    weights: str | None = "checkpoint.pt"


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def next_checkpoint(store: Store, number: int, changed: float, rng) -> None:
    """Archive what units/ holds and make checkpoint `number` (from 2): a share `changed` of
    the done units get a new picture of their own and a high change score, the others a low
    one (their picture stays, byte for byte, as it does for a unit the new weights left)."""
    plan = store.read_plan()
    digest = hashlib.sha256(f"weights {number}".encode()).hexdigest()
    started = f"2026-11-{number:02d}T02:00:00+00:00" if number <= 30 else "2026-12-01T02:00:00"
    history = store.history
    checkpoint = history.begin(plan, FakeWeights(digest), f"night-{number}", started)
    previous = history.previous(checkpoint)
    for path in sorted(store.units_dir.glob("*/*.json")):
        record = UnitRecord.from_json(json.loads(path.read_text()))
        if record is None or record.status != "done":
            continue
        new = rng.random() < changed
        if new:
            image = webp(int(rng.integers(2**31)), 128)
            atomic_write_bytes(store.out / record.images[0], image, durable=False)
        score = float(rng.uniform(0.4, 0.9) if new else rng.uniform(0.0, 0.05))
        record = dataclasses.replace(record, change=round(score, 5), change_from=previous.id)
        atomic_write_bytes(path, json.dumps(record.as_json()).encode(), durable=False)
    plan["checkpoint"] = dataclasses.asdict(checkpoint)
    plan["model"] = {**plan["model"], "digest": digest}
    store.write_plan(plan)
    facts = history.archive(dataclasses.replace(checkpoint, finished=started), plan)
    store.write_plan({**plan, "checkpoint": dataclasses.asdict(facts)})


def disk(path: Path) -> str:
    """Disk use as du counts it: hard links once."""
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[
        0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, help="build the atlas here and keep it")
    parser.add_argument("--checkpoints", type=int, default=1, help="a nightly atlas of N")
    parser.add_argument("--changed", type=float, default=0.3, help="share of new pictures")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="atlas-render-bench-"))
    per_layer = 2_000 if args.checkpoints == 1 else 412  # issue 4: 2,000 channels stay quick
    layers = {f"blocks.{i}": per_layer for i in range(max(args.units // per_layer - 1, 1))}
    layers["logits"] = args.units - sum(layers.values())
    images = [webp(seed, 128) for seed in range(16)]
    started = time.perf_counter()
    store = make_atlas(out, layers, labels={i: f"class {i}" for i in range(1000)}, images=images)
    built = time.perf_counter() - started
    print(f"units {args.units}, layers {len(layers)}, built in {built:.1f} s", flush=True)
    if args.checkpoints > 1:
        rng = np.random.default_rng(0)
        sizes = {}
        page = out / "site" / "blocks.0" / "3.html"
        started = time.perf_counter()
        for number in range(2, args.checkpoints + 1):
            next_checkpoint(store, number, args.changed, rng)
            if number in (2, args.checkpoints // 2, args.checkpoints):
                store.write_manifest()
                render(out)
                sizes[number] = page.stat().st_size
        print(
            f"archived {args.checkpoints - 1} checkpoints in {time.perf_counter() - started:.1f} s"
        )
        manifest = timed(store.write_manifest)
        print(f"manifest rebuild:      {manifest:.1f} s ({disk(out / 'manifest.json')})")
        print("unit page blocks.0/3.html: " + ", ".join(
            f"{size / 1024:.1f} KiB at {n} checkpoints" for n, size in sizes.items()))  # fmt: skip
    first = timed(lambda: render(out))
    again = timed(lambda: render(out))
    pages = sum(1 for _ in (out / "site").rglob("*.html"))
    print(f"pages {pages}")
    print(f"first render:          {first:.1f} s ({first / args.units * 1000:.2f} ms per unit)")
    print(f"unchanged rerender:    {again:.1f} s")
    if args.checkpoints > 1:
        for part in ("units", "checkpoints", "blobs", "site", "."):
            print(f"disk {part + '/':<13} {disk(out / part)}")
        blobs = sum(1 for _ in (out / "blobs").glob("*/*.webp"))
        print(f"blobs: {blobs} images for {args.checkpoints} checkpoints of {args.units} units")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
