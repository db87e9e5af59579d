"""The store (unit JSONs, images, plan.json, manifest.json) and `atlas run / plan / status`
end to end, in-process on the tiny model with the inline scheduler."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from clihelpers import assert_bad_input, invoke, make_runner
from tinymodels import tiny_model

import atlas.files
import atlas.optimize
from atlas import pipeline, plan_report
from atlas.cli import cli
from atlas.config import AtlasConfig
from atlas.errors import AtlasError
from atlas.files import atomic_write_bytes
from atlas.optim.recipes import get
from atlas.pipeline import plan_record
from atlas.plan import make_plan
from atlas.record import HISTORY_POINTS, STATUSES, UnitRecord, downsample
from atlas.store import Store, layer_dirname

# --- helpers ----------------------------------------------------------------------------------


def W(payload: bytes) -> bytes:
    """Stand-in image bytes in a sound RIFF/WebP header: the store treats a unit whose image
    header is damaged as not stored (see test_corrupt.py)."""
    return b"RIFF" + (len(payload) + 4).to_bytes(4, "little") + b"WEBP" + payload


@pytest.fixture(scope="module")
def model():
    loaded = tiny_model()
    assert loaded.layers
    return loaded


def make_store_plan(model, channels="0-3", classes="0-1", steps=3):
    config = AtlasConfig(
        model="tinymodels:tiny",
        out="unused",
        layers=("conv2",),
        channels=channels,
        classes=classes,
        recipe=get("fourier", steps=steps, size=32),
    )
    return make_plan(config, model)


def record_for(unit, status="done", key=None, **extra) -> UnitRecord:
    if status == "failed":
        extra.setdefault("error", "objective became NaN")
    return UnitRecord(
        unit.layer, unit.index, unit.kind, label=unit.label, key=key or unit.key, status=status,
        **extra,
    )  # fmt: skip


def raw_record(layer, index, key="old", status="done", **extra) -> UnitRecord:
    return UnitRecord(layer, index, key=key, status=status, **extra)


def unit_of(plan, layer, index):
    return next(u for u in plan.units if (u.layer, u.index) == (layer, index))


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def read_json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "out")


@pytest.fixture
def mixed(model, store):
    """A store holding every status: planned conv2 0-3 and logits 0-1; stored conv2 0 done,
    conv2 1 failed, conv2 2 with an old key, conv2 9 and conv3 0 not planned, logits 0 done."""
    plan = make_store_plan(model)
    store.write_plan(plan_record(plan, model, "2024-01-01T00:00:00+00:00", None))
    store.save_unit(record_for(unit_of(plan, "conv2", 0)), [W(b"conv2-0")])
    store.save_unit(record_for(unit_of(plan, "conv2", 1), "failed"), [])
    store.save_unit(record_for(unit_of(plan, "conv2", 2), key="an-old-key"), [W(b"old-2")])
    store.save_unit(raw_record("conv2", 9), [W(b"nine-a"), W(b"nine-b")])
    store.save_unit(raw_record("conv3", 0), [W(b"conv3-0")])
    store.save_unit(record_for(unit_of(plan, "logits", 0)), [W(b"logit-0")])
    return plan


# --- save_unit --------------------------------------------------------------------------------


SUFFIXES = ("0.webp", "1.webp", "json")


def test_save_unit_with_one_image(store):
    record = raw_record("conv2", 3, key="k1", objective_best=1.5)
    store.save_unit(record, [W(b"first image")])
    folder = store.out / "units" / "conv2"
    assert files_under(folder) == ["3.json", "3.webp"]
    assert (folder / "3.webp").read_bytes() == W(b"first image")
    stored = read_json(folder / "3.json")
    assert stored == {**record.as_json(), "images": ["units/conv2/3.webp"]}
    assert (store.out / stored["images"][0]).read_bytes() == W(b"first image")  # relative to OUT
    assert store.records() == [UnitRecord.from_json(stored)]
    assert store.index() == {("conv2", 3): UnitRecord.from_json(stored)}


def test_save_unit_with_k_images_and_order_of_writes(store, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(source, destination):
        replaced.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(atlas.files.os, "replace", recording_replace)
    store.save_unit(raw_record("logits", 7), [W(b"a"), W(b"b"), W(b"c")])
    assert replaced == ["7.0.webp", "7.1.webp", "7.2.webp", "7.json"]  # the JSON last
    stored = read_json(store.out / "units/logits/7.json")
    assert stored["images"] == [f"units/logits/7.{k}.webp" for k in range(3)]
    assert [(store.out / name).read_bytes() for name in stored["images"]] == [
        W(b"a"),
        W(b"b"),
        W(b"c"),
    ]


def test_files_are_world_readable(store, tmp_path):
    old_umask = os.umask(0o077)  # even under a strict umask
    try:
        store.save_unit(raw_record("conv2", 1), [W(b"x"), W(b"y")])
        store.write_plan({"units": [], "layers": []})
        store.write_manifest()
    finally:
        os.umask(old_umask)
    paths = [p for p in store.out.rglob("*") if p.is_file()]
    assert len(paths) == 5  # 2 images, unit JSON, plan.json, manifest.json
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_resaving_with_fewer_samples_removes_old_images(store):
    neighbours = [raw_record("conv2", 31), raw_record("conv2", 13), raw_record("conv2", 30)]
    for neighbour in neighbours:  # 31 and 13 share digits with 3; 30 starts like 3
        store.save_unit(neighbour, [W(b"n0"), W(b"n1")])
    store.save_unit(raw_record("conv2", 3), [W(b"0"), W(b"1"), W(b"2")])
    folder = store.out / "units" / "conv2"
    assert {"3.0.webp", "3.1.webp", "3.2.webp"} <= set(files_under(folder))

    store.save_unit(raw_record("conv2", 3, key="k2"), [W(b"0"), W(b"1")])
    mine = [name for name in files_under(folder) if name.startswith("3.")]
    assert mine == ["3.0.webp", "3.1.webp", "3.json"]

    store.save_unit(raw_record("conv2", 3, key="k3"), [W(b"only")])
    mine = [name for name in files_under(folder) if name.startswith("3.")]
    assert mine == ["3.json", "3.webp"]
    assert read_json(folder / "3.json")["images"] == ["units/conv2/3.webp"]

    store.save_unit(raw_record("conv2", 3, key="k4", status="failed", error="x"), [])
    mine = [name for name in files_under(folder) if name.startswith("3.")]
    assert mine == ["3.json"]
    assert read_json(folder / "3.json")["images"] == []

    others = [n for n in files_under(folder) if not n.startswith("3.")]
    assert others == sorted(f"{i}.{suffix}" for i in (13, 30, 31) for suffix in SUFFIXES)
    assert (folder / "31.0.webp").read_bytes() == W(b"n0")


def test_remove_unit(store):
    store.save_unit(raw_record("conv2", 1), [W(b"a"), W(b"b")])
    store.save_unit(raw_record("conv2", 10), [W(b"c")])
    store.remove_unit("conv2", 1)
    assert files_under(store.out / "units") == ["conv2/10.json", "conv2/10.webp"]


# --- atomicity --------------------------------------------------------------------------------


def fail_replace_for(monkeypatch, suffix):
    real_replace = os.replace

    def failing_replace(source, destination):
        if str(destination).endswith(suffix):
            raise OSError(28, "No space left on device (simulated)")
        real_replace(source, destination)

    monkeypatch.setattr(atlas.files.os, "replace", failing_replace)


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_crash_writing_the_json_keeps_the_previous_json(store, monkeypatch):
    store.save_unit(raw_record("conv2", 3, key="v1", objective_best=1.0), [W(b"v1")])
    json_path = store.out / "units/conv2/3.json"
    previous = json_path.read_bytes()
    fail_replace_for(monkeypatch, ".json")
    with pytest.raises(OSError, match="simulated"):
        store.save_unit(raw_record("conv2", 3, key="v2", objective_best=2.0), [W(b"v2")])
    assert json_path.read_bytes() == previous
    assert store.index()[("conv2", 3)].key == "v1"
    assert no_temporaries(store.out)


def test_crash_writing_an_image_keeps_the_previous_unit(store, monkeypatch):
    store.save_unit(raw_record("conv2", 3, key="v1"), [W(b"v1-a"), W(b"v1-b")])
    folder = store.out / "units/conv2"
    before = {name: (folder / name).read_bytes() for name in files_under(folder)}
    fail_replace_for(monkeypatch, "3.1.webp")
    with pytest.raises(OSError, match="simulated"):
        store.save_unit(raw_record("conv2", 3, key="v2"), [W(b"v2-a"), W(b"v2-b"), W(b"v2-c")])
    after = {name: (folder / name).read_bytes() for name in files_under(folder)}
    assert after["3.json"] == before["3.json"]
    assert after["3.1.webp"] == W(b"v1-b")  # the image being written when it crashed
    assert "3.2.webp" not in after  # nothing after the crash was written
    assert no_temporaries(store.out)


def test_crash_in_the_middle_of_a_file_write(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"complete old content")

    def crash(_fd):
        raise OSError(5, "I/O error (simulated)")

    monkeypatch.setattr(atlas.files.os, "fsync", crash)  # after the bytes went to the temp file
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(path, b"new content that never lands")
    assert path.read_bytes() == b"complete old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_interrupt_during_a_write_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "data.bin"

    def interrupt(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas.files.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"x")
    assert list(path.parent.iterdir()) == []


def test_stray_temporaries_and_corrupt_json_are_ignored(model, store, mixed):
    expected = store.status()
    manifest = store.write_manifest()
    folder = store.out / "units" / "conv2"
    (folder / ".0.json.abc123.tmp").write_text('{"layer": "conv2", "ind')  # killed mid-write
    (folder / ".5.webp.xyz.tmp").write_bytes(b"\x00" * 10)
    (folder / "12.json").write_text('{"layer": "conv2", "index": 12, "key": "k"')  # truncated
    (folder / "13.json").write_bytes(b"\xff\xfe not utf-8")
    assert len(store.records()) == 6
    assert store.status() == expected
    assert store.write_manifest() == manifest
    assert [u.id for u in store.pending(mixed.units)] == [
        "conv2:1",
        "conv2:2",
        "conv2:3",
        "logits:1",
    ]
    # a corrupt JSON of a planned unit makes it missing (and pending), not a crash
    (folder / "0.json").write_text("{")
    assert store.status()["conv2"]["missing"] == expected["conv2"]["missing"] + 1
    assert "conv2:0" in [u.id for u in store.pending(mixed.units)]


def test_claiming_out_sweeps_what_killed_writers_left_and_keeps_everything_else(store):
    store.save_unit(raw_record("conv2", 1), [W(b"x")])
    leftovers = [
        store.out / ".plan.json.k1ll3d.tmp",
        store.out / "units/conv2/.2.json.abc123.tmp",
        store.out / "exemplars/conv2/.1.0.webp.q.tmp",
    ]
    kept = [store.out / "notes.tmp", store.out / "mine/.draft.tmp", store.out / "units/.keep"]
    kept.append(store.out / "site/conv2/.index.html.x.tmp")  # `atlas render` may be writing it
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    with store.claimed():
        assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in kept)
    assert store.index()[("conv2", 1)].status == "done"


def test_only_one_process_writes_out_at_a_time(store):
    with store.claimed():
        temporary = store.out / "units/conv2/.3.json.inflight.tmp"
        temporary.parent.mkdir(parents=True)
        temporary.write_bytes(b"being written")
        busy = rf"another atlas run is writing .*pid {os.getpid()}"
        with pytest.raises(AtlasError, match=busy), Store(store.out).claimed():
            pass
        assert temporary.exists()  # the second claimant touched nothing
    with store.claimed():  # released with the block (and by the kernel if its holder dies)
        assert not temporary.exists()


def test_a_lock_file_owned_by_another_user_still_locks(store, monkeypatch):
    """In an OUT shared by a group, .atlas.lock belongs to whoever ran first: 0644."""
    with store.claimed():
        pass
    real_open = os.open

    def not_writable(path, flags, *mode):
        if str(path).endswith(".atlas.lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *mode)

    monkeypatch.setattr(atlas.files.os, "open", not_writable)
    second = Store(store.out)
    with store.claimed(), pytest.raises(AtlasError, match="another atlas run"), second.claimed():
        pass  # the first claim locked through a read-only descriptor


def test_a_file_system_without_locks_runs_unprotected_and_sweeps_nothing(store, monkeypatch):
    leftover = store.out / "units/conv2/.3.json.maybe-live.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"?")

    def no_locks(_fd, _operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(atlas.files.fcntl, "flock", no_locks)
    with store.claimed():
        pass
    assert leftover.exists()  # another run might be writing it


def test_an_unusable_lock_file_is_a_one_line_error(store):
    (store.out / ".atlas.lock").mkdir(parents=True)
    unusable = r"cannot open the lock file .*\.atlas\.lock"
    with pytest.raises(AtlasError, match=unusable), store.claimed():
        pass


@pytest.mark.parametrize("content", ['{"note": "left by a user"}', "[1, 2]", "null"])
def test_foreign_json_in_units_is_ignored(store, mixed, content):
    expected = store.status()
    (store.out / "units" / "conv2" / "notes.json").write_text(content)
    assert store.status() == expected
    store.write_manifest()


# --- pending ----------------------------------------------------------------------------------


def test_pending(model, store):
    plan = make_store_plan(model)
    assert store.pending(plan.units) == list(plan.units)  # nothing stored yet
    store.save_unit(record_for(unit_of(plan, "conv2", 0)), [W(b"x")])
    store.save_unit(record_for(unit_of(plan, "conv2", 1), key="another key"), [W(b"x")])
    store.save_unit(record_for(unit_of(plan, "conv2", 2), "failed"), [])
    store.save_unit(record_for(unit_of(plan, "logits", 1)), [W(b"x")])
    assert [u.id for u in store.pending(plan.units)] == [
        "conv2:1",  # stored with another key
        "conv2:2",  # failed: retried
        "conv2:3",  # missing
        "logits:0",  # missing
    ]
    assert store.pending(plan.units, force=True) == list(plan.units)
    # a record of the same layer and index with the planned key is done, nothing else matters
    assert store.pending([unit_of(plan, "conv2", 0), unit_of(plan, "logits", 1)]) == []


def test_pending_follows_a_recipe_change(model, store):
    plan = make_store_plan(model, steps=3)
    for unit in plan.units:
        store.save_unit(record_for(unit), [W(b"x")])
    assert store.pending(plan.units) == []
    changed = make_store_plan(model, steps=4)
    assert store.pending(changed.units) == list(changed.units)
    wider = make_store_plan(model, channels="0-5")
    assert [u.id for u in store.pending(wider.units)] == ["conv2:4", "conv2:5"]


# --- classify, status, manifest, prune --------------------------------------------------------


def test_status_per_layer(store, mixed):
    assert store.status() == {
        "conv2": {"done": 1, "failed": 1, "missing": 1, "stale": 2},
        "logits": {"done": 1, "missing": 1},
        "conv3": {"stale": 1},
    }


def test_classify_order_and_fields(store, mixed):
    units, plan = store.classify()
    assert plan == store.read_plan()
    listed = [(u.layer, u.index, u.status) for u in units]
    assert listed == [
        ("conv2", 0, "done"),
        ("conv2", 1, "failed"),
        ("conv2", 2, "stale"),  # stored with an old key: listed once, shown until replaced
        ("conv2", 3, "missing"),
        ("conv2", 9, "stale"),
        ("logits", 0, "done"),
        ("logits", 1, "missing"),
        ("conv3", 0, "stale"),  # a layer the plan does not have comes last
    ]
    by_status = {(u.layer, u.index, u.status): u for u in units}
    assert by_status[("conv2", 0, "done")].images == ("units/conv2/0.webp",)
    assert by_status[("conv2", 1, "failed")].error == "objective became NaN"
    assert by_status[("conv2", 3, "missing")].images == ()
    assert by_status[("logits", 1, "missing")].label == "class1"
    nine = by_status[("conv2", 9, "stale")].images
    assert nine == ("units/conv2/9.0.webp", "units/conv2/9.1.webp")


def test_status_without_a_plan(store):
    store.save_unit(raw_record("conv2", 0), [W(b"x")])
    assert store.status() == {"conv2": {"stale": 1}}
    assert Store(store.out / "nothing").status() == {}


def test_manifest_is_rebuilt_from_the_unit_jsons(store, mixed):
    manifest = store.write_manifest()
    path = store.out / "manifest.json"
    assert read_json(path) == manifest
    assert manifest["counts"] == {"done": 2, "failed": 1, "missing": 2, "stale": 3}
    assert list(manifest["counts"]) == list(STATUSES)
    assert manifest["model"]["digest"] == mixed.digest
    assert [layer["name"] for layer in manifest["layers"]] == ["conv2", "logits"]
    assert len(manifest["units"]) == 8
    assert len({(u["layer"], u["index"]) for u in manifest["units"]}) == 8  # no duplicates
    assert "key" in manifest["units"][0]

    content = path.read_bytes()
    path.unlink()
    store.write_manifest()
    assert path.read_bytes() == content  # the same file again

    unit_json = store.out / "units" / "conv2" / "0.json"
    edited = {**read_json(unit_json), "status": "failed", "error": "edited by hand"}
    unit_json.write_text(json.dumps(edited))
    rebuilt = store.write_manifest()
    assert rebuilt["counts"] == {"done": 1, "failed": 2, "missing": 2, "stale": 3}
    entry = next(u for u in rebuilt["units"] if (u["layer"], u["index"]) == ("conv2", 0))
    assert (entry["status"], entry["error"]) == ("failed", "edited by hand")
    assert read_json(path) == rebuilt

    unit_json.unlink()
    assert store.write_manifest()["counts"]["missing"] == 3


def test_prune_removes_exactly_the_unplanned_units(store, mixed):
    before = set(files_under(store.out / "units"))
    assert store.prune() == 2
    after = set(files_under(store.out / "units"))
    assert before - after == {
        "conv2/9.json",
        "conv2/9.0.webp",
        "conv2/9.1.webp",
        "conv3/0.json",
        "conv3/0.webp",
    }
    assert store.status() == {
        "conv2": {"done": 1, "failed": 1, "missing": 1, "stale": 1},  # 2 is planned: kept
        "logits": {"done": 1, "missing": 1},
    }
    assert store.prune() == 0


def test_prune_without_a_plan_removes_everything(store):
    store.save_unit(raw_record("conv2", 0), [W(b"x")])
    assert store.prune() == 1
    assert files_under(store.out / "units") == []


# --- layer folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv2", "blocks.8", "features.0.conv-1_x", "logits", "A9"])
def test_safe_layer_names_are_kept(name):
    assert layer_dirname(name) == name


UNSAFE = [
    "../evil",
    "a/b",
    "a:b",
    "a b",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a\\b",
    ".hidden",
    "x" * 300,
]


def test_unsafe_layer_names_stay_inside_units_and_never_collide(store):
    names = [*UNSAFE, "a_b", "evil", "_", "etc_passwd", "hidden", "x" * 150]
    folders = [layer_dirname(name) for name in names]
    assert len(set(folders)) == len(names)
    units = store.units_dir.resolve()
    for name, folder in zip(names, folders, strict=True):
        assert "/" not in folder and "\\" not in folder and folder not in ("", ".", "..")
        assert not folder.startswith(".")
        assert len(folder) <= 200
        assert store.unit_path(name, 0, ".json").resolve().parent.parent == units
    assert layer_dirname("a:b") != layer_dirname("a_b") == "a_b"
    assert layer_dirname("a/b").startswith("a_b-")


def test_unsafe_layer_names_round_trip_through_the_store(store, tmp_path):
    for index, name in enumerate(UNSAFE):
        store.save_unit(raw_record(name, index), [W(b"image")])
    assert sorted(tmp_path.iterdir()) == [store.out]  # nothing escaped OUT
    assert {(r.layer, r.index) for r in store.records()} == {
        (name, index) for index, name in enumerate(UNSAFE)
    }
    for record in store.records():
        image = (store.out / record.images[0]).resolve()
        assert image.is_relative_to(store.units_dir.resolve())


# --- downsample -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 5, 127, 128, 129, 130, 500, 4096])
def test_downsample_keeps_ends_and_at_most_128_points(length):
    history = [0.5 * step + 0.123456789 for step in range(length)]
    points = downsample(history)
    assert HISTORY_POINTS == 128
    assert 0 < len(points) <= 128
    assert points[0] == [0, round(history[0], 5)]
    assert points[-1] == [length - 1, round(history[-1], 5)]
    steps = [step for step, _ in points]
    assert steps == sorted(set(steps))
    assert all(value == round(history[step], 5) for step, value in points)
    if length <= 128:
        assert steps == list(range(length))
    else:
        assert len(points) >= 100  # still a useful curve


def test_downsample_edge_cases():
    assert downsample([]) == []
    assert downsample([1.0, 2.0, 3.0], points=2) == [[0, 1.0], [2, 3.0]]


# --- atlas run / plan / status, end to end -----------------------------------------------------


RUN = ["tinymodels:tiny", "--layers", "conv2", "--steps", "3", "--size", "32"]


@pytest.fixture
def optimized(monkeypatch):
    """Counts the units the engine optimizes (as layer:index) and the steps it is asked for."""
    calls = []
    real_visualize = atlas.optimize.visualize

    def counting(model, targets, recipe, **kwargs):
        calls.append(([f"{t.layer}:{t.index}" for t in targets], recipe.steps))
        return real_visualize(model, targets, recipe, **kwargs)

    monkeypatch.setattr(atlas.optimize, "visualize", counting)
    return calls


def units_in(calls) -> list[str]:
    return sorted(unit for targets, _ in calls for unit in targets)


@pytest.fixture
def atlas_cli(tmp_path):
    runner_ = make_runner()
    out = tmp_path / "out"

    def invoke(command, *args):
        full = [command, *RUN, *args, "--out", out]
        if command == "run":
            full += ["--scheduler", "inline"]
        result = runner_.invoke(cli, [str(arg) for arg in full])
        assert "Traceback" not in result.output, result.output
        return result

    invoke.out = out
    return invoke


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        name: ((out / "units" / name).read_bytes(), (out / "units" / name).stat().st_mtime_ns)
        for name in files_under(out / "units")
    }


def test_run_stores_every_unit_and_an_unchanged_rerun_does_nothing(atlas_cli, optimized):
    result = atlas_cli("run", "--channels", "0-3", "--classes", "0-1")
    assert result.exit_code == 0, result.output
    assert "6 done, 0 failed, 0 already stored of 6 units" in result.stdout
    out = atlas_cli.out
    assert units_in(optimized) == sorted(
        ["conv2:0", "conv2:1", "conv2:2", "conv2:3", "logits:0", "logits:1"]
    )
    assert {steps for _, steps in optimized} == {3}
    assert files_under(out / "units") == sorted(
        [f"conv2/{i}.{s}" for i in range(4) for s in ("json", "webp", "maps.webp")]
        + [f"logits/{i}.{s}" for i in range(2) for s in ("json", "webp")]
    )
    record = read_json(out / "units/conv2/2.json")
    assert record["status"] == "done"
    assert record["steps"] == 3
    assert record["images"] == ["units/conv2/2.webp"]
    assert (out / "units/conv2/2.webp").read_bytes()[8:12] == b"WEBP"
    assert len(record["history"]) == 3
    assert read_json(out / "units/logits/1.json")["label"] == "class1"
    manifest = read_json(out / "manifest.json")
    assert manifest["counts"] == {"done": 6, "failed": 0, "missing": 0, "stale": 0}
    plan = read_json(out / "plan.json")
    assert plan["finished"] is not None
    assert {u["id"]: u["key"] for u in plan["units"]} == {
        u["id"]: u["key"] for u in manifest["units"]
    }

    before = snapshot(out)
    optimized.clear()
    again = atlas_cli("run", "--channels", "0-3", "--classes", "0-1")
    assert again.exit_code == 0, again.output
    assert "0 done, 0 failed, 6 already stored of 6 units" in again.stdout
    assert optimized == []  # not one optimization step
    assert snapshot(out) == before  # every unit file byte-identical, mtime unchanged
    assert read_json(out / "manifest.json")["counts"]["done"] == 6


def test_unchanged_rerun_starts_no_executor(atlas_cli, monkeypatch):
    assert atlas_cli("run", "--channels", "0-1", "--classes", "").exit_code == 0

    def no_executor(*_args, **_kwargs):
        raise AssertionError("an unchanged rerun must not start an executor")

    monkeypatch.setattr(pipeline, "executor", no_executor)
    result = atlas_cli("run", "--channels", "0-1", "--classes", "")
    assert result.exit_code == 0, result.output
    assert "2 already stored of 2 units" in result.stdout


def test_a_second_run_on_the_same_out_stops_with_one_line(atlas_cli, optimized):
    with Store(atlas_cli.out).claimed():
        result = atlas_cli("run", "--channels", "0-1", "--classes", "")
    assert_bad_input(result, "another atlas run is writing", str(atlas_cli.out))
    assert optimized == []


def test_changed_steps_rerun_every_unit(atlas_cli, optimized):
    assert atlas_cli("run", "--channels", "0-2", "--classes", "0").exit_code == 0
    keys = {r.id: r.key for r in Store(atlas_cli.out).records()}
    optimized.clear()
    result = atlas_cli("run", "--channels", "0-2", "--classes", "0", "--steps", "4")
    assert result.exit_code == 0, result.output
    assert "4 done, 0 failed, 0 already stored of 4 units" in result.stdout
    assert units_in(optimized) == ["conv2:0", "conv2:1", "conv2:2", "logits:0"]
    assert {steps for _, steps in optimized} == {4}
    records = Store(atlas_cli.out).records()
    assert all(r.steps == 4 and r.key != keys[r.id] for r in records)
    assert len(records) == 4


def test_more_channels_rerun_only_the_new_units(atlas_cli, optimized):
    assert atlas_cli("run", "--channels", "0-3", "--classes", "0-1").exit_code == 0
    before = snapshot(atlas_cli.out)
    optimized.clear()
    result = atlas_cli("run", "--channels", "0-5", "--classes", "0-1")
    assert result.exit_code == 0, result.output
    assert "2 done, 0 failed, 6 already stored of 8 units" in result.stdout
    assert units_in(optimized) == ["conv2:4", "conv2:5"]
    after = snapshot(atlas_cli.out)
    assert {name: after[name] for name in before} == before  # the old units untouched
    assert sorted(set(after) - set(before)) == [
        f"conv2/{i}.{s}" for i in (4, 5) for s in ("json", "maps.webp", "webp")
    ]


def test_narrowing_leaves_stale_units_and_prune_deletes_them(atlas_cli, optimized):
    assert atlas_cli("run", "--channels", "0-5", "--classes", "0").exit_code == 0
    optimized.clear()
    narrowed = atlas_cli("run", "--channels", "0-3", "--classes", "0")
    assert narrowed.exit_code == 0, narrowed.output
    assert optimized == []
    assert read_json(atlas_cli.out / "manifest.json")["counts"]["stale"] == 2
    assert (atlas_cli.out / "units/conv2/5.json").exists()

    pruned = atlas_cli("run", "--channels", "0-3", "--classes", "0", "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert optimized == []
    assert files_under(atlas_cli.out / "units") == sorted(
        [f"conv2/{i}.{s}" for i in range(4) for s in ("json", "webp", "maps.webp")]
        + ["logits/0.json", "logits/0.webp"]
    )
    assert read_json(atlas_cli.out / "manifest.json")["counts"] == {
        "done": 5,
        "failed": 0,
        "missing": 0,
        "stale": 0,
    }


def test_status_command(atlas_cli):
    assert atlas_cli("run", "--channels", "0-3", "--classes", "0-1").exit_code == 0
    assert atlas_cli("run", "--channels", "0-1", "--classes", "0-2", "--steps", "1").exit_code == 0
    # now: conv2 0-1 done with 1 step, conv2 2-3 stale; logits 0-2 done
    runner_ = make_runner()
    out = str(atlas_cli.out)
    as_json = runner_.invoke(cli, ["status", out, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {
        "conv2": {"done": 2, "stale": 2},
        "logits": {"done": 3},
    }
    table = runner_.invoke(cli, ["status", out])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["layer", *STATUSES]
    assert lines[1].split() == ["conv2", "2", "0", "0", "2"]
    assert lines[2].split() == ["logits", "3", "0", "0", "0"]
    assert len(lines) == 3


def test_status_of_a_folder_without_an_atlas(tmp_path):
    result = make_runner().invoke(cli, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds no atlas results" in result.stderr


NAN_MODEL = '''
import torch
from torch import nn
from tinymodels import TinyNet
from atlas.models import InputNormalization, LoadedModel


class NanConv(nn.Conv2d):
    """A conv whose channel 2 is NaN."""

    def forward(self, x):
        out = super().forward(x).clone()
        out[:, 2] = float("nan")
        return out


def factory():
    net = TinyNet()
    nan = NanConv(8, 12, 3, stride=2, padding=1)
    nan.load_state_dict(net.conv2.state_dict())
    net.conv2 = nan
    return LoadedModel(
        spec="nan", module=net, normalize=InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(32, 32), labels=tuple(f"class{i}" for i in range(10)),
    )
'''


def test_nan_objective_fails_one_unit_and_the_run_exits_1(tmp_path, monkeypatch):
    module_name = f"nanmodel_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{module_name}.py").write_text(NAN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    out = tmp_path / "out"
    args = [f"{module_name}:factory", "--layers", "conv2", "--channels", "0-3", "--classes", ""]
    args += ["--steps", "3", "--size", "32", "--scheduler", "inline", "--out", str(out)]
    result = make_runner().invoke(cli, ["run", *args])
    assert result.exit_code == 1, result.output
    assert "3 done, 1 failed, 0 already stored of 4 units" in result.stdout
    assert "failed: conv2:2: objective became NaN" in result.stderr
    store = Store(out)
    records = {r.index: r for r in store.records()}
    assert records[2].status == "failed"
    assert records[2].error == "objective became NaN"
    assert records[2].images == ()
    assert [records[i].status for i in (0, 1, 3)] == ["done"] * 3
    assert files_under(out / "units") == sorted(
        ["conv2/2.json"]
        + [f"conv2/{i}.{s}" for i in (0, 1, 3) for s in ("json", "webp", "maps.webp")]
    )
    assert store.status() == {"conv2": {"done": 3, "failed": 1}}
    assert read_json(out / "manifest.json")["counts"]["failed"] == 1


def plan_json(atlas_cli, *args) -> dict:
    result = atlas_cli("plan", "--channels", "0-3", "--classes", "0-1", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(plan_report, "visible_gpus", lambda: 0)


def test_plan_lists_units_tasks_and_todo(atlas_cli, optimized, cpu_only):
    summary = plan_json(atlas_cli, "--no-calibrate", "--batch", "3")
    assert optimized == []  # planning optimizes nothing
    assert not (atlas_cli.out / "units").exists()  # and stores nothing
    assert (summary["units"], summary["todo"], summary["tasks"]) == (6, 6, 3)
    assert (summary["steps"], summary["size"], summary["device"]) == (3, 32, "cpu")
    rows = {row["layer"]: row for row in summary["layers"]}
    assert list(rows) == ["conv2", "logits"]
    assert {k: rows["conv2"][k] for k in ("units", "tasks", "todo", "todo_tasks")} == {
        "units": 4,
        "tasks": 2,
        "todo": 4,
        "todo_tasks": 2,
    }
    assert {k: rows["logits"][k] for k in ("units", "tasks", "todo", "todo_tasks")} == {
        "units": 2,
        "tasks": 1,
        "todo": 2,
        "todo_tasks": 1,
    }
    assert rows["conv2"]["estimate_from"] == "unknown"
    assert summary["estimated_seconds"] is None

    assert atlas_cli("run", "--channels", "0-3", "--classes", "0-1").exit_code == 0
    after = plan_json(atlas_cli, "--no-calibrate", "--batch", "3")
    assert (after["units"], after["todo"], after["tasks"]) == (6, 0, 0)
    assert [row["todo"] for row in after["layers"]] == [0, 0]
    assert [row["tasks"] for row in after["layers"]] == [2, 1]
    assert {row["estimate_from"] for row in after["layers"]} == {"nothing to do"}
    assert after["estimated_seconds"] == 0

    wider = atlas_cli("plan", "--channels", "0-5", "--classes", "0-1", "--json", "--no-calibrate")
    rows = {row["layer"]: row for row in json.loads(wider.stdout)["layers"]}
    assert (rows["conv2"]["todo"], rows["logits"]["todo"]) == (2, 0)
    assert rows["conv2"]["estimate_from"] == "earlier runs"  # timings of the stored units
    assert rows["conv2"]["estimated_seconds"] > 0


def test_plan_with_calibration_gives_a_positive_estimate(atlas_cli, cpu_only):
    summary = plan_json(atlas_cli, "--scheduler", "inline")  # timed in this process
    assert summary["todo"] == 6
    assert summary["estimated_seconds"] > 0
    for row in summary["layers"]:
        assert row["estimate_from"] == "calibration"
        assert row["seconds_per_unit"] > 0
        assert row["estimated_seconds"] == pytest.approx(row["seconds_per_unit"] * row["todo"])
    table = atlas_cli("plan", "--channels", "0-3", "--classes", "0-1", "--no-calibrate")
    assert table.exit_code == 0, table.output
    assert "6 of 6 units to do in 2 tasks" in table.stdout


RUN_TINY = ["tinymodels:tiny", "--layers", "conv2", "--channels", "0-5", "--classes", ""]
RUN_TINY += ["--steps", "2", "--size", "32", "--batch", "2", "--scheduler", "inline"]


def test_a_write_that_fails_midway_names_the_folder_and_keeps_what_is_stored(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = atlas.files.atomic_write_bytes, []

    def read_only_after_two_units(path, data, **kwargs):
        calls.append(path)
        if sum(p.suffix == ".json" and p.parent.name == "conv2" for p in calls) > 2:
            raise OSError(errno.EROFS, "Read-only file system", str(path.parent / ".x.tmp"))
        return real(path, data, **kwargs)

    monkeypatch.setattr(atlas.files, "atomic_write_bytes", read_only_after_two_units)
    result = invoke("run", *RUN_TINY, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    *progress, line = result.stderr.splitlines()  # the progress lines, then the error
    assert line.startswith(f"error: cannot write to {out / 'units' / 'conv2'}: Read-only file")
    assert "units stored before are kept" in line and "error" not in "".join(progress)
    assert sorted(p.name for p in (out / "units/conv2").glob("*.json")) == ["0.json", "1.json"]
    monkeypatch.setattr(atlas.files, "atomic_write_bytes", real)
    again = invoke("run", *RUN_TINY, "--out", out)
    assert again.exit_code == 0 and "4 done, 0 failed, 2 already stored" in again.stdout


def test_a_read_only_units_folder_is_refused_before_any_work(tmp_path):
    """A real read-only bind mount of OUT/units, in a user and mount namespace of its own."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    first = subprocess.run([sys.executable, "-m", "atlas", "run", *RUN_TINY, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "site" not in p.parts}
    units = out / "units"
    script = f'mount --bind {units} {units} && mount -o remount,ro,bind {units} && exec "$@"'
    args = [sys.executable, "-m", "atlas", "run", *RUN_TINY, "--steps", "3", "--out", str(out)]
    try:
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args],
                                capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no unshare on this machine")
    if "mount" in result.stderr and "cannot write" not in result.stderr:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot write to {units}: Read-only file system"
    ], result.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "site" not in p.parts}
    assert after == before
