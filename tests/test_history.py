"""Nightly history: one OUT keeps every checkpoint, scores each unit's change, prunes, and
survives a run killed during a new checkpoint."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelpers import assert_bad_input, invoke
from test_execute import environment, wait_for

from atlas import models
from atlas.store import Store, webp_problem

RUN = ["tinymodels:tiny", "--layers", "conv2", "--channels", "0-5", "--classes", ""]
RUN += ["--steps", "4", "--size", "32", "--scheduler", "inline"]
CHANGED = "conv2:3"  # the one filter the second checkpoint changes


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two checkpoints of the tiny model as files: the second negates conv2's filter 3."""
    root = tmp_path_factory.mktemp("weights")
    module = models.load("tinymodels:tiny").module
    state = {k: v.clone() for k, v in module.state_dict().items()}
    torch.save(state, root / "day-1.pt")
    state["conv2.weight"][3].neg_()
    state["conv2.bias"][3].neg_()
    torch.save(state, root / "day-2.pt")
    return root


def run(out, weights_file, *extra):
    result = invoke("run", *RUN, "--weights", weights_file, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return result


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def nightly(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("nightly") / "atlas"
    run(out, weights / "day-1.pt", "--label", "day-1")
    run(out, weights / "day-2.pt", "--label", "day-2")
    return out


def test_two_checkpoints_give_two_frames_and_the_changed_unit_ranks_first(nightly):
    found = manifest(nightly)
    timeline = found["checkpoints"]
    assert [c["label"] for c in timeline] == ["day-1", "day-2"]
    assert [c["current"] for c in timeline] == [False, True]
    assert all(c["complete"] and c["units"] == 6 for c in timeline)
    assert timeline[0]["digest"] != timeline[1]["digest"]
    units = {u["id"]: u for u in found["units"]}
    for unit in units.values():
        assert [f["checkpoint"] for f in unit["filmstrip"]] == [c["id"] for c in timeline]
        assert unit["filmstrip"][-1]["image"] == unit["images"][0]
        assert unit["change_from"] == timeline[0]["id"]
        assert all(webp_problem(nightly / f["image"]) is None for f in unit["filmstrip"])
    ranked = sorted(units, key=lambda i: -units[i]["change"])
    assert ranked[0] == CHANGED and units[CHANGED]["change"] > 0.5
    assert all(units[i]["change"] < 0.01 for i in ranked[1:])  # same filters, same images
    mean = timeline[1]["mean_change"]["conv2"]
    assert mean == pytest.approx(sum(u["change"] for u in units.values()) / 6)
    page = (nightly / "site/conv2/3.html").read_text()  # the site the run rendered
    frames = page.split('id="filmstrip"')[1].split("</ol>")[0]
    assert frames.count("<li") == 2 and frames.index("day-1") < frames.index("day-2")
    grid = (nightly / "site/conv2/index.html").read_text()
    assert grid.index('href="3.html"') < min(grid.index(f'href="{i}.html"') for i in (0, 1, 2))


def test_identical_images_are_stored_once(nightly):
    blobs = list((nightly / "blobs").glob("*/*.webp"))
    assert len(blobs) == 7  # six images of day 1, and day 2's one new picture


def test_an_unchanged_checkpoint_does_no_work(nightly, weights):
    result = run(nightly, weights / "day-2.pt")
    assert "0 done, 0 failed, 6 already stored" in result.output
    assert [c["label"] for c in manifest(nightly)["checkpoints"]] == ["day-1", "day-2"]
    history = invoke("history", nightly)
    assert history.exit_code == 0, history.output
    lines = history.output.splitlines()
    assert lines[1].split()[:2] == [manifest(nightly)["checkpoints"][0]["id"], "day-1"]
    assert "day-2" in lines[2] and "current" in lines[2]


def test_keep_prunes_the_older_checkpoints_and_their_images(weights, tmp_path):
    out = tmp_path / "atlas"
    run(out, weights / "day-1.pt", "--label", "day-1")
    run(out, weights / "day-2.pt", "--label", "day-2", "--keep", "1")
    (only,) = manifest(out)["checkpoints"]
    assert only["label"] == "day-2" and only["current"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [only["id"]]
    assert len(list((out / "blobs").glob("*/*.webp"))) == 6
    assert all(len(u["filmstrip"]) == 1 for u in manifest(out)["units"])


def test_compare_accepts_two_checkpoints_of_one_atlas(nightly, tmp_path):
    result = invoke("compare", f"{nightly}@day-1", f"{nightly}@day-2", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert f"most changed: {CHANGED} (" in result.output
    bad = invoke("compare", f"{nightly}@day-9", f"{nightly}@day-2", "--out", tmp_path / "d")
    assert_bad_input(bad, "has no checkpoint 'day-9'", "day-1, day-2")


def test_a_damaged_checkpoint_file_is_named_and_repaired(nightly, weights, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(nightly, out, symlinks=True)
    (first,) = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("001-")]
    (first / "checkpoint.json").write_text("{ garbled")
    result = run(out, weights / "day-2.pt")
    assert [c["label"] for c in manifest(out)["checkpoints"]] == ["day-1", "day-2"]
    assert json.loads((first / "checkpoint.json").read_text())["label"] == "day-1"
    (first / "units.json").write_text("{ garbled")
    (first / "checkpoint.json").unlink()
    result = run(out, weights / "day-2.pt")
    assert f"checkpoints/{first.name}/units.json is corrupt" in result.output
    assert [c["label"] for c in manifest(out)["checkpoints"]] == ["day-2"]


@pytest.mark.slow
def test_a_run_killed_during_a_new_checkpoint_leaves_the_first_whole(weights, tmp_path):
    out = tmp_path / "atlas"
    run(out, weights / "day-1.pt", "--label", "day-1")
    archived = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*.json")}
    blobs = {p: p.read_bytes() for p in (out / "blobs").rglob("*.webp")}
    slow = [*RUN[:-6], "--steps", "400", "--size", "32", "--batch", "1", "--scheduler", "inline"]
    args = [sys.executable, "-m", "atlas", "run", *slow, "--weights", weights / "day-2.pt"]
    args += ["--out", out, "--label", "day-2"]
    first = subprocess.Popen([str(a) for a in args], env=environment(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    plan = out / "plan.json"

    def new_units() -> int:  # units stored for day 2, once its run has written its plan
        planned = json.loads(plan.read_text())
        if planned["checkpoint"]["label"] != "day-2":
            return 0
        keys = {u["key"] for u in planned["units"]}
        stored = [json.loads(p.read_text()) for p in out.glob("units/conv2/*.json")]
        return sum(s["key"] in keys for s in stored)

    try:
        wait_for(lambda: first.poll() is None and new_units() >= 1, 300, "the first new unit")
        first.send_signal(signal.SIGSTOP)
        os.waitpid(first.pid, os.WUNTRACED)
        assert new_units() < 6, "the run finished before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*.json")} == archived
    assert {p: p.read_bytes() for p in (out / "blobs").rglob("*.webp")} == blobs
    Store(out).write_manifest()  # as a run does every minute
    timeline = manifest(out)["checkpoints"]
    assert [(c["label"], c["complete"]) for c in timeline] == [("day-1", True), ("day-2", False)]
    rerun = invoke(
        "run", *slow, "--weights", weights / "day-2.pt", "--out", out, "--label", "day-2"
    )
    assert rerun.exit_code == 0, rerun.output
    timeline = manifest(out)["checkpoints"]
    assert [(c["label"], c["complete"]) for c in timeline] == [("day-1", True), ("day-2", True)]


def planned_pictures(out: Path) -> set[str]:
    """The sha256 of the picture of every unit the last run planned (and so stored)."""
    keys = {unit["key"] for unit in json.loads((out / "plan.json").read_text())["units"]}
    found = set()
    for path in out.glob("units/*/*.json"):
        record = json.loads(path.read_text())
        if record["key"] in keys:
            found.add(hashlib.sha256((out / record["images"][0]).read_bytes()).hexdigest())
    return found


def archived_blobs(out: Path) -> dict[str, set[str]]:
    """Per checkpoint id, the sha256 of every picture its archive lists."""
    found = {}
    for units in (out / "checkpoints").glob("*/units.json"):
        entries = json.loads(units.read_text())["units"]
        names = [e["images"][0] for e in entries if e.get("images")]
        found[units.parent.name] = {Path(name).stem for name in names}
    return found


def test_every_picture_stays_in_its_checkpoint_whatever_each_run_plans(weights, tmp_path):
    out = tmp_path / "atlas"
    base = ["tinymodels:tiny", "--classes", "", "--size", "32", "--scheduler", "inline"]
    ever: dict[str, set[str]] = {"day-1": set(), "day-2": set()}

    def step(day: str, *extra: str) -> None:
        args = [*base, "--steps", "4", *extra, "--weights", weights / f"{day}.pt"]
        result = invoke("run", *args, "--label", day, "--out", out)
        assert result.exit_code == 0, result.output
        ever[day] |= planned_pictures(out)

    step("day-1", "--layers", "conv2", "--channels", "0-5")  # full
    step("day-1", "--layers", "conv3", "--channels", "0-1")  # partial: other units
    step("day-1", "--layers", "conv2", "--channels", "0", "--steps", "2")  # another recipe
    step("day-2", "--layers", "conv2", "--channels", "0-1")  # new weights
    step("day-2", "--layers", "conv2", "--channels", "2-3")  # a subset replaces day-1 pictures
    timeline = manifest(out)["checkpoints"]
    ids = {c["label"]: c["id"] for c in timeline}
    assert [(c["label"], c["units"]) for c in timeline] == [("day-1", 8), ("day-2", 4)]
    archived = archived_blobs(out)
    for day, seen in ever.items():
        assert seen <= archived[ids[day]], f"{day} lost pictures"
    used = set().union(*archived.values())
    on_disk = {p.stem for p in (out / "blobs").glob("*/*.webp")}
    assert on_disk == used, "orphaned blobs"
    units = {u["id"]: u for u in manifest(out)["units"]}
    for index in range(4):  # on both checkpoints
        film = units[f"conv2:{index}"]["filmstrip"]
        assert [f["checkpoint"] for f in film] == [ids["day-1"], ids["day-2"]]
    for index in (4, 5):
        assert [f["checkpoint"] for f in units[f"conv2:{index}"]["filmstrip"]] == [ids["day-1"]]
    for unit in ("conv3:0", "conv3:1"):
        assert [f["checkpoint"] for f in units[unit]["filmstrip"]] == [ids["day-1"]]
    history = invoke("history", out)
    lines = history.output.splitlines()
    assert lines[1].split()[5] == "8" and lines[2].split()[5] == "4"  # after date and time


def test_history_counts_what_a_killed_run_stored(weights, tmp_path):
    out = tmp_path / "atlas"
    run(out, weights / "day-1.pt", "--label", "day-1")
    plan = json.loads((out / "plan.json").read_text())
    store = Store(out)
    day_two = models.load("tinymodels:tiny", str(weights / "day-2.pt"))
    checkpoint = store.history.begin(plan, day_two, "day-2", "2026-12-06T00:00:00+00:00")
    plan["checkpoint"] = dataclasses.asdict(checkpoint)
    store.write_plan(plan)  # as a run with day 2 writes it first
    for path in sorted(out.glob("units/conv2/*.json"))[:4]:  # then stores 4 units and is killed
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "checkpoint": checkpoint.id}))
    history = invoke("history", out)
    assert history.exit_code == 0, history.output
    last = history.output.splitlines()[-1].split()
    assert last[1] == "day-2" and last[5] == "4" and "incomplete" in last[6]


def test_a_damaged_archive_of_the_current_checkpoint_is_named_and_rebuilt(weights, tmp_path):
    out = tmp_path / "atlas"
    run(out, weights / "day-1.pt", "--label", "day-1")
    (current,) = (out / "checkpoints").iterdir()
    (current / "units.json").write_text("{ garbled")
    history = invoke("history", out)
    assert history.exit_code == 0, history.output
    assert f"checkpoints/{current.name}/units.json is corrupt" in history.stderr
    assert history.stdout.splitlines()[-1].split()[6:8] == ["units.json", "damaged,"]
    run(out, weights / "day-1.pt", "--label", "day-1")  # nothing to redo: the archive is rebuilt
    (entry,) = manifest(out)["checkpoints"]
    assert entry["complete"] and entry["units"] == 6 and not entry["damaged"]
    assert len(json.loads((current / "units.json").read_text())["units"]) == 6
