"""How long `atlas render` takes for a large atlas: 20,000 synthetic units by default.

    .venv/bin/python bench/render_speed.py [--units 20000] [--keep DIR]

Builds the atlas with the real Store (a few distinct WebP images reused, 128 px), then times
a first render and an unchanged rerender, and prints both.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from synthetic import make_atlas, webp  # noqa: E402

from atlas.site import render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, help="build the atlas here and keep it")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="atlas-render-bench-"))
    per_layer = 2_000  # a wide layer, as the issue asks: 2,000 channels must stay quick
    layers = {f"blocks.{i}": per_layer for i in range(args.units // per_layer - 1)}
    layers["logits"] = args.units - sum(layers.values())
    images = [webp(seed, 128) for seed in range(16)]
    started = time.perf_counter()
    make_atlas(out, layers, labels={i: f"class {i}" for i in range(1000)}, images=images)
    built = time.perf_counter() - started
    started = time.perf_counter()
    render(out)
    first = time.perf_counter() - started
    started = time.perf_counter()
    render(out)
    again = time.perf_counter() - started
    pages = sum(1 for _ in (out / "site").rglob("*.html"))
    print(f"units {args.units}, layers {len(layers)}, pages {pages}")
    print(f"build synthetic atlas: {built:.1f} s")
    print(f"first render:          {first:.1f} s ({first / args.units * 1000:.2f} ms per unit)")
    print(f"unchanged rerender:    {again:.1f} s")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
