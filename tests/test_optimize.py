"""One task on one device: out-of-memory splitting, NaN units, result records."""

import pytest
import torch
from tinymodels import tiny_model

from atlas import optimize
from atlas.config import AtlasConfig
from atlas.optim import get
from atlas.plan import make_plan, make_tasks

RECIPE = get("fourier", steps=4, size=32)


def one_task(model, channels: str, samples: int = 1):
    config = AtlasConfig(
        model="tiny",
        out="unused",
        layers=("conv2",),
        channels=channels,
        classes="",
        recipe=RECIPE,
        samples=samples,
        batch=64,
    )
    plan = make_plan(config, model)
    (task,) = make_tasks(plan, list(plan.units), "cpu")
    return task


@pytest.mark.parametrize("samples", [1, 2])
def test_a_batch_that_runs_out_of_memory_is_split_and_gives_the_same_images(monkeypatch, samples):
    model = tiny_model()
    task = one_task(model, "0-4", samples)
    whole = optimize.optimize_task(model, task)
    real = optimize.visualize
    sizes, fitted = [], []

    def small_memory(model, targets, recipe, **options):
        sizes.append(len(targets))
        if len(targets) > 2 * samples:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        fitted.append(len(targets))
        return real(model, targets, recipe, **options)

    monkeypatch.setattr(optimize, "visualize", small_memory)
    split = optimize.optimize_task(model, task)
    assert sizes[:3] == [5 * samples, 2 * samples, 3 * samples]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    assert sum(fitted) == 5 * samples and max(fitted) <= 2 * samples
    assert all(size % samples == 0 for size in sizes)  # K images of a unit stay together
    assert [u["images"] for u in split["units"]] == [u["images"] for u in whole["units"]]
    assert [u["record"].status for u in split["units"]] == ["done"] * 5


def test_a_single_unit_that_does_not_fit_fails_with_the_error(monkeypatch):
    model = tiny_model()

    def no_memory(*args, **options):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(optimize, "visualize", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        optimize.optimize_task(model, one_task(model, "0"))


def test_records_carry_what_the_store_and_site_need():
    model = tiny_model()
    result = optimize.optimize_task(model, one_task(model, "0-1", samples=2))
    record = result["units"][0]["record"]
    assert record.status == "done" and record.samples == 2
    assert len(result["units"][0]["images"]) == 2 and len(record.image_seeds) == 2
    assert record.history[0][0] == 0 and record.history[-1][0] == RECIPE.steps - 1
    assert record.steps == RECIPE.steps and record.seconds > 0
    assert record.device.startswith("cpu")
