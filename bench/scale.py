"""Scale, simulated: what a run costs besides the engine, per unit of a 20,000-unit plan on many
local Dask workers (issue 25). Each worker loads a wide model of 5 layers x 4,000 channels
through atlas's plugin, and its task returns at once what a real one returns (each unit done, a
plausible record and a 192 px WebP picture, no optimization); everything else is `atlas run`:
plan, bounded submission, retries, results back to the client, the store's atomic writes, the
manifest, the history and the site.

    .venv/bin/python bench/scale.py [--units 20000] [--workers 16] [--batch 4]

Prints the units stage per unit (scheduler, transfer and the client's store writes), the store
writes alone (the same records through Store.save_unit, no Dask), and the whole run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from atlas.files import encode_image
from atlas.models import InputNormalization, LoadedModel
from atlas.optimize import unit_record

LAYERS = 5
CHANNELS = 4000
SIZE = 192  # px: the default canvas, the size of the pictures a run stores
HISTORY = tuple((step, round(1 - 0.9**step, 5)) for step in range(0, 512, 4))


class Wide(nn.Module):
    """stem (1x1 conv to CHANNELS) -> 4 depthwise 1x1 convs -> pool -> fc: 20,000 channels in
    five layers for a few thousand weights, so sixteen workers can hold it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, CHANNELS, 1)
        depthwise = [nn.Conv2d(CHANNELS, CHANNELS, 1, groups=CHANNELS) for _ in range(LAYERS - 1)]
        self.blocks = nn.Sequential(*depthwise)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(CHANNELS, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def wide() -> LoadedModel:
    """The factory behind the spec `scale:wide` (bench/ on the workers' path)."""
    return LoadedModel(
        spec="scale:wide",
        module=Wide(),
        normalize=InputNormalization((0.5,) * 3, (0.5,) * 3),
        input_size=(8, 8),
        labels=tuple(f"class{i}" for i in range(10)),
    )


def picture() -> bytes:
    """A smooth random picture as a unit's WebP would be (about a 192 px feature picture)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    return encode_image(np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC)))


PICTURE = picture()


def noop_task(model, task) -> dict:
    """What a worker returns for a task, at once: every unit done, with its picture."""
    facts = {"steps": task.recipe.steps, "seconds": 0.0, "device": "cpu:0 threads",
             "objective_start": 0.01, "objective_final": 0.9, "objective_best": 0.91,
             "best_step": 500, "activation": 0.88, "history": HISTORY}  # fmt: skip
    units = [{"record": unit_record(unit, task, status="done", **facts), "images": [PICTURE]}
             for unit in task.units]  # fmt: skip
    return {"units": units, "seconds": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="units per task (4: CPU default)")
    args = parser.parse_args()

    import scale  # this file as a module: workers unpickle its task function by name
    from distributed import LocalCluster

    from atlas import pipeline
    from atlas.config import AtlasConfig
    from atlas.optim.recipes import get
    from atlas.store import Store

    per_layer = args.units // LAYERS
    layers = ("stem", *(f"blocks.{i}" for i in range(LAYERS - 1)))
    pipeline.optimize_task = scale.noop_task  # the engine step is what this bench leaves out
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)  # fmt: skip
        up = time.monotonic() - started
        config = AtlasConfig(
            model="scale:wide", out=str(Path(folder) / "out"), layers=layers,
            channels=f"0-{per_layer - 1}", classes="", recipe=get("fourier", steps=512),
            batch=args.batch, scheduler=cluster.scheduler_address,
        )  # fmt: skip
        stamps: dict[str, float] = {}

        def on_start(todo, skipped, link) -> None:
            stamps["start"] = time.monotonic()

        def on_progress(progress) -> None:
            stamps["last"] = time.monotonic()

        started = time.monotonic()
        summary = pipeline.run_atlas(config, on_start=on_start, on_progress=on_progress)
        whole = time.monotonic() - started
        cluster.close()
        units = summary.done
        stage = stamps["last"] - stamps["start"]
        store = Store(Path(folder) / "store-only")
        records = [r for r in Store(config.out).records() if r.status == "done"]
        started = time.monotonic()
        for record in records:
            store.save_unit(record, [PICTURE])
        writes = time.monotonic() - started
    tasks = -(-units // args.batch)
    print(f"{units} units ({summary.failed} failed) in {tasks} tasks of {args.batch}, "
          f"{args.workers} workers (up in {up:.1f} s); picture {len(PICTURE)} bytes")  # fmt: skip
    print(f"units stage: {stage:.1f} s, {1000 * stage / units:.2f} ms per unit "
          f"({1000 * stage / tasks:.2f} ms per task)")  # fmt: skip
    print(f"store writes alone: {writes:.1f} s, {1000 * writes / len(records):.2f} ms per unit")
    print(f"so scheduler and transfer: {1000 * (stage - writes) / units:.2f} ms per unit")
    print(f"whole run (plan, units, manifest, history, site): {whole:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
