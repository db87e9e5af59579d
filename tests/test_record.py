"""RunRecord: one run's facts as plan.json and results.json hold them, read back from files of
this version and of earlier ones (results.json named the model by a string then)."""

import json

from atlas.record import RunRecord


def test_a_run_record_round_trips_through_its_json():
    run = RunRecord(
        spec="efficientnet_lite0",
        digest="02ca6c7f11777bd1",
        weights="random",
        preprocessing={"mean": [0.5] * 3, "described": "224 px"},
        recipe="fourier",
        recipe_hash="abc",
        recipe_settings={"steps": 8},
        seed=3,
        layers=({"name": "blocks.8", "dir": "blocks.8"},),
        labels=("tench", "goldfish"),
        checkpoint={"id": "001-02ca6c7f"},
    )
    data = json.loads(json.dumps(run.as_json()))
    assert data["model"] == {
        "spec": "efficientnet_lite0",
        "digest": "02ca6c7f11777bd1",
        "weights": "random",
        "preprocessing": {"mean": [0.5] * 3, "described": "224 px"},
    }
    assert data["recipe"] == {"name": "fourier", "hash": "abc"}
    assert RunRecord.from_json(data) == run


def test_a_results_json_of_before_still_reads():
    before = {
        "model": "efficientnet_lite0",
        "weights_digest": "02ca6c7f11777bd1",
        "recipe": "fourier",
        "recipe_hash": "abc",
        "steps": 2,
        "seconds": 1.5,
        "device": "cpu",
        "atlas_version": "0.1.0",
        "torch_version": "2.14.1",
        "units": [],
    }
    run = RunRecord.from_json(before)
    assert (run.spec, run.digest, run.recipe, run.recipe_hash) == (
        "efficientnet_lite0",
        "02ca6c7f11777bd1",
        "fourier",
        "abc",
    )
    assert (run.seconds, run.device, run.preprocessing) == (1.5, "cpu", None)


def test_values_of_the_wrong_type_take_their_defaults():
    run = RunRecord.from_json({"model": {"spec": 3, "digest": None}, "seed": "7", "labels": 5})
    assert (run.spec, run.digest, run.seed, run.labels) == ("unknown model", "?", 0, ())
    assert RunRecord.from_json(None) == RunRecord() == RunRecord.from_json([1, 2])
