"""Every model zoo through atlas, offline, with random weights.

    nice -n 10 .venv/bin/python bench/models.py [--zoo torchvision|timm|hf] [--only NAME[,NAME]]
        [--force] [--out FILE] [--markdown docs/models.md] [--timeout S]

The zoos: every torchvision classification model (`torchvision.models.list_models`); one model
per timm family, the smallest of each of timm's model modules (`timm.list_modules()`, counted
on the meta device, timm's `test_*` models left out); and a handful of Hugging Face image
classifiers, each built from its architecture's default config (made smaller where that is a
giant) and its default image processor, saved as a folder (`hf:FOLDER`). Each is loaded with
`atlas.models.load(spec, "random")`:

1. the kinds of its layers as atlas reads them (map, channels_last, tokens, cls_token, vector);
2. each layer's channel count against its module's own size (a Conv's out_channels, a
   BatchNorm's num_features, a Linear's out_features, a LayerNorm's normalized_shape[-1], else
   an int attribute hidden_dim, embed_dim or out_channels), for maps, channels-last maps,
   tokens and class tokens (not a Conv1d over tokens, whose out_channels count tokens);
3. its default layers (`atlas.plan.default_layer_patterns`) and their unit count;
4. `atlas visualize SPEC LAYER:0 --weights random --steps 2 --size 64` of the middle default
   layer, through the real CLI: OK when it exits 0 and writes an image.

Each model is inspected in a fresh process and visualized in another, one at a time, so memory
never holds more than one model (ViT-H/14 and RegNet-Y-128GF are ~2.5 GB each). Results go to
the zoo's JSON file (bench/models.json, models-timm.json, models-hf.json) after every model; a
rerun skips the models already there (--force redoes them). `--markdown FILE` writes the zoo's
table between its markers (`<!-- models table -->` and `<!-- end models table -->` for
torchvision, `<!-- timm table -->` ... for timm, `<!-- hf table -->` ... for Hugging Face) of
FILE (the prose around them is kept), or a new file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("map", "channels_last", "tokens", "cls_token", "vector")
CHECKED_KINDS = ("map", "channels_last", "tokens", "cls_token")
IMAGE_SUFFIXES = (".webp", ".png")


@dataclass(frozen=True)
class Zoo:
    """A zoo's results file and the markers of its table in the markdown file."""

    out: str
    marker: str  # the table goes between <!-- marker --> and <!-- end marker -->


ZOOS = {
    "torchvision": Zoo("bench/models.json", "models table"),
    "timm": Zoo("bench/models-timm.json", "timm table"),
    "hf": Zoo("bench/models-hf.json", "hf table"),
}
# Hugging Face architectures, with the config settings that make a giant default a small one
HF_ARCHITECTURES = {
    "beit": {},
    "convnext": {},
    "convnextv2": {},
    "cvt": {},
    "deit": {},
    "dinov2": {},
    "efficientnet": {
        "width_coefficient": 1.0,
        "depth_coefficient": 1.0,
        "hidden_dim": 1280,
        "image_size": 224,
    },
    "focalnet": {},
    "levit": {},
    "mobilenet_v2": {},
    "mobilevit": {},
    "poolformer": {},
    "pvt_v2": {},
    "regnet": {},
    "resnet": {},
    "swin": {},
    "swinv2": {},
    "vit": {},
}
HF_FOLDERS = Path(tempfile.gettempdir()) / "atlas-bench-hf"

# families in the order the table shows them (roughly by year); a model's family is the first
# prefix its name starts with
FAMILIES = (
    "alexnet",
    "vgg",
    "googlenet",
    "inception_v3",
    "resnet",
    "wide_resnet",
    "resnext",
    "squeezenet",
    "densenet",
    "mobilenet_v2",
    "shufflenet_v2",
    "mnasnet",
    "mobilenet_v3",
    "efficientnet",
    "regnet_x",
    "regnet_y",
    "efficientnet_v2",
    "vit",
    "swin",
    "swin_v2",
    "convnext",
    "maxvit",
)


def family_of(name: str) -> str:
    """The longest family name that `name` starts with, followed by nothing, `_` or a digit."""
    matches = [f for f in FAMILIES if re.match(rf"{f}(\Z|_|\d)", name)]
    return max(matches, key=len) if matches else name


def tail(text: str, lines: int = 12) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def atlas_edited() -> bool:
    """Whether atlas/ differs from the commit (others may edit it during a long run)."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--", "atlas"], cwd=ROOT, capture_output=True, text=True
    )
    return done.returncode == 0 and bool(done.stdout.strip())


# --- the child process: one model's layers, sizes and defaults ------------------------------


def module_size(module) -> tuple[int, str] | None:
    """The feature count a module says it produces, and where that was read; None if unknown."""
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, "out_channels"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, "num_features"
    if isinstance(module, nn.Linear):
        return module.out_features, "out_features"
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], "normalized_shape[-1]"
    for attribute in ("hidden_dim", "embed_dim", "out_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, attribute
    return None


def versions() -> str:
    """torch and the zoos' packages that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "torchvision", "timm", "transformers"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def inspect(spec: str) -> dict:
    """Steps 1-3 for one model (run in its own process)."""
    from torch import nn

    from atlas import models
    from atlas.plan import default_layer_patterns

    started = time.time()
    loaded = models.load(spec, "random")
    loaded_at = time.time()
    layers = loaded.layers
    modules = dict(loaded.module.named_modules())
    kinds = {kind: sum(layer.kind == kind for layer in layers) for kind in KINDS}
    checked, mismatches = 0, []
    for layer in layers:
        if layer.kind not in CHECKED_KINDS:
            continue
        module = modules[layer.module or layer.name]
        if layer.kind in ("tokens", "cls_token") and isinstance(module, nn.Conv1d):
            continue  # a Conv1d over tokens (CoaT's aggregate): its channels count tokens
        size = module_size(module)
        if size is None:
            continue
        checked += 1
        if layer.channels != size[0]:
            mismatches.append(
                f"{layer.name} ({layer.kind}, {layer.type}): channels {layer.channels}, "
                f"module {size[1]} {size[0]}"
            )
    discovered_at = time.time()
    defaults = list(default_layer_patterns(loaded))
    by_name = {layer.name: layer for layer in layers}
    unknown = [d for d in defaults if d not in by_name]
    logits = by_name.get("logits")
    return {
        "spec": spec,
        "params": sum(p.numel() for p in loaded.module.parameters()),
        "input_size": list(loaded.input_size),
        "preprocessing": loaded.preprocessing.describe(),
        "layers": len(layers),
        "kinds": kinds,
        "checked": checked,
        "mismatches": mismatches,
        "defaults": defaults,
        "default_units": sum(by_name[d].channels for d in defaults if d in by_name),
        "default_kinds": sorted({by_name[d].kind for d in defaults if d in by_name}),
        "unknown_defaults": unknown,
        "logits": logits.channels if logits else None,
        "seconds_load": round(loaded_at - started, 2),
        "seconds_layers": round(discovered_at - loaded_at, 2),
        "seconds_defaults": round(time.time() - discovered_at, 2),
        "versions": versions(),
    }


def child_main(spec: str) -> None:
    try:
        record = inspect(spec)
    except Exception as error:  # the parent needs every failure as a record
        message = str(error).strip().splitlines()
        record = {
            "spec": spec,
            "error": f"{type(error).__name__}: {message[0] if message else ''}",
            "traceback": tail("".join(traceback.format_exception(error))),
        }
    print("\n" + json.dumps(record))


# --- what each zoo holds: (name, spec, family) ---------------------------------------------


def torchvision_models() -> list[tuple[str, str, str]]:
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    return [(name, name, family_of(name)) for name in names]


def timm_models() -> list[tuple[str, str, str]]:
    """The smallest model (parameters counted on the meta device) of each timm module."""
    import timm
    import torch

    chosen = []
    for module in sorted(timm.list_modules()):
        sizes = {}
        for name in timm.list_models(module=module):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"):
                    built = timm.create_model(name)
            except Exception:  # counted among the module's others
                continue
            sizes[name] = sum(p.numel() for p in built.parameters())
        if sizes:
            name = min(sizes, key=lambda n: (sizes[n], n))
            chosen.append((name, f"timm:{name}", module))
    return chosen


def hf_models() -> list[tuple[str, str, str]]:
    """HF_ARCHITECTURES, each saved as a folder: its default config (with the overrides) and
    its default image processor."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    chosen = []
    for model_type, overrides in HF_ARCHITECTURES.items():
        folder = HF_FOLDERS / model_type
        config = transformers.AutoConfig.for_model(model_type, **overrides)
        config.save_pretrained(folder)
        named = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or ()
        if isinstance(named, dict):  # transformers 5: by backend
            named = (named.get("torchvision"), named.get("pil"))
        processor = next((name for name in named if name), None)
        if processor:
            getattr(transformers, processor)().save_pretrained(folder)
        chosen.append((model_type, f"hf:{folder}", model_type))
    return chosen


ZOO_MODELS = {"torchvision": torchvision_models, "timm": timm_models, "hf": hf_models}


def names_main(zoo: str) -> None:
    print(json.dumps(ZOO_MODELS[zoo]()))


# --- the parent: one model at a time, each in fresh processes -------------------------------


def run_child(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess | None, float]:
    started = time.time()
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, time.time() - started
    return done, time.time() - started


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


UNIT_LINE = re.compile(r"objective (\S+) -> (\S+) \(best at step (\d+)\)")
TOTAL_LINE = re.compile(r"units in ([\d.]+) s")


def visualize(spec: str, layer: str, timeout: float) -> dict:
    """Step 4: the real CLI in a subprocess."""
    atlas = Path(sys.executable).parent / "atlas"
    with tempfile.TemporaryDirectory(prefix="atlas-models-") as out:
        command = [
            str(atlas),
            "visualize",
            spec,
            f"{layer}:0",
            "--weights",
            "random",
            "--steps",
            "2",
            "--size",
            "64",
            "--out",
            out,
        ]
        started = time.time()
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, "ATLAS_DEBUG": "1"},
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": f"visualize timed out after {timeout:.0f} s"}
        seconds = time.time() - started
        images = sorted(p.name for p in Path(out).iterdir() if p.suffix in IMAGE_SUFFIXES)
    record = {
        "target": f"{layer}:0",
        "rc": done.returncode,
        "seconds": round(seconds, 2),
        "images": images,
        "stdout": tail(done.stdout, 4),
    }
    if unit := UNIT_LINE.search(done.stdout):
        record["objective_start"], record["objective_best"] = unit.group(1), unit.group(2)
    if total := TOTAL_LINE.search(done.stdout):
        record["seconds_optimizing"] = float(total.group(1))
    if done.returncode != 0:
        record["stderr"] = tail(done.stderr)
        last = record["stderr"][-1] if record["stderr"] else "(no output)"
        record["why"] = f"visualize exit {done.returncode}: {last}"
    elif not images:
        record["why"] = "visualize wrote no image"
    record["ok"] = "why" not in record
    return record


def status_of(record: dict) -> str:
    if "error" in record:
        return f"inspect failed: {record['error']}"
    if record.get("unknown_defaults"):
        return f"default layers not among the layers: {', '.join(record['unknown_defaults'])}"
    if record["mismatches"]:
        first = record["mismatches"][0]
        more = len(record["mismatches"]) - 1
        return f"channel mismatch: {first}" + (f" (+{more} more)" if more else "")
    if not record["defaults"]:
        return "no default layers"
    visual = record.get("visualize", {})
    return "OK" if visual.get("ok") else visual.get("why", "not visualized")


def measure(name: str, spec: str, family: str, timeout: float) -> dict:
    started = time.time()
    done, seconds = run_child(["--inspect", spec], timeout)
    if done is None:
        record = {"error": f"inspection timed out after {timeout:.0f} s"}
    else:
        record = last_json(done.stdout) or {
            "error": f"inspection exit {done.returncode} without a result",
            "traceback": tail(done.stderr),
        }
    record.update(name=name, spec=spec, family=family, seconds_inspect=round(seconds, 2))
    if "error" not in record and record["defaults"]:
        defaults = record["defaults"]
        record["visualize"] = visualize(spec, defaults[(len(defaults) - 1) // 2], timeout)
    record["status"] = status_of(record)
    record["seconds_total"] = round(time.time() - started, 2)
    record["commit"] = git_commit()
    record["atlas_edited"] = atlas_edited()  # uncommitted changes under atlas/ at the end
    record["date"] = datetime.date.today().isoformat()
    return record


def save(path: Path, results: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


# --- the table -------------------------------------------------------------------------------


def abbreviated(names: list[str]) -> str:
    if not names:
        return ""
    if len(names) == 1:
        return f"`{names[0]}` (1)"
    if len(names) == 2:
        return f"`{names[0]}`, `{names[1]}` (2)"
    return f"`{names[0]}` … `{names[-1]}` ({len(names)})"


def kinds_text(kinds: dict) -> str:
    return ", ".join(f"{kinds[k]} {k.replace('_', '-')}" for k in KINDS if kinds.get(k))


def table(models: dict, zoo: str) -> str:
    """The zoo's table: torchvision's families by year, the others by name; torchvision's
    input is its size (read as before), the others' their whole preprocessing."""
    order = {family: i for i, family in enumerate(FAMILIES if zoo == "torchvision" else ())}
    rows = sorted(
        models.values(),
        key=lambda r: (
            order.get(r["family"], len(order)),
            r["family"],
            r.get("params", 0),
            r["name"],
        ),
    )
    lines = [
        "| family | model | layers by kind | checked | default layers | units | input "
        "| 2-step visualize | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    previous = None
    for r in rows:
        family = r["family"] if r["family"] != previous else ""
        previous = r["family"]
        if "error" in r:
            lines.append(f"| {family} | {r['name']} | | | | | | | {r['status']} |")
            continue
        visual = r.get("visualize", {})
        seconds = f"{visual['seconds']:.0f} s" if "seconds" in visual else ""
        checked = f"{r['checked']}" + (f" ({len(r['mismatches'])} off)" if r["mismatches"] else "")
        size = "x".join(str(n) for n in r["input_size"])
        if zoo != "torchvision":
            size = r["preprocessing"].split("x", 1)[1].replace(" std", ", std")  # no channels
        status = r["status"].replace("|", "\\|")
        lines.append(
            f"| {family} | {r['name']} | {kinds_text(r['kinds'])} | {checked} "
            f"| {abbreviated(r['defaults'])} | {r['default_units']:,} | {size} | {seconds} "
            f"| {status} |"
        )
    return "\n".join(lines)


def commit_order(commits: set[str]) -> list[str]:
    """The commits oldest first, as this repository's history orders them."""
    history = subprocess.run(
        ["git", "rev-list", "--abbrev-commit", "--reverse", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    position = {commit[:7]: i for i, commit in enumerate(history)}
    return sorted(commits, key=lambda c: (position.get(c[:7], len(position)), c))


def summary(models: dict) -> list[str]:
    ok = [r for r in models.values() if r["status"] == "OK"]
    total = sum(r.get("seconds_total", 0) for r in models.values())
    slowest = max(models.values(), key=lambda r: r.get("seconds_total", 0))
    counts: dict[str, int] = {}
    for r in models.values():
        counts[r.get("commit", "?")] = counts.get(r.get("commit", "?"), 0) + 1
    commits = ", ".join(f"{c} ({counts[c]})" for c in commit_order(set(counts)))
    edited = sum(bool(r.get("atlas_edited")) for r in models.values())
    dates = sorted({r.get("date", "?") for r in models.values()})
    versions = sorted(
        {r.get("versions") or f"torch {r['torch']}, torchvision {r['torchvision']}" for r in ok}
    )
    return [
        f"{len(ok)} of {len(models)} models OK; {total / 60:.0f} min in all "
        f"(inspection and visualize, one model at a time); slowest: {slowest['name']} "
        f"({slowest.get('seconds_total', 0):.0f} s). Run {', '.join(dates)}; commit at each "
        f"model's end (models): {commits}"
        + (f"; {edited} with uncommitted edits under atlas/" if edited else "")
        + f"; {'; '.join(versions)}.",
    ]


def write_markdown(path: Path, models: dict, zoo: str) -> None:
    begin, end = f"<!-- {ZOOS[zoo].marker} -->", f"<!-- end {ZOOS[zoo].marker} -->"
    block = f"{begin}\n{table(models, zoo)}\n\n{' '.join(summary(models))}\n{end}"
    if path.exists() and begin in (text := path.read_text()) and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        path.write_text(before + block + after)
    else:
        path.write_text(f"# {zoo} models\n\n{block}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="torchvision")
    parser.add_argument("--only", help="Comma-separated model names (default: all).")
    parser.add_argument("--out", type=Path, help="Results file (default: the zoo's).")
    parser.add_argument("--markdown", type=Path, help="Write the table into this file.")
    parser.add_argument("--force", action="store_true", help="Redo models already in --out.")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="Seconds per subprocess (default 1800)."
    )
    parser.add_argument("--inspect", help=argparse.SUPPRESS)
    parser.add_argument("--names", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inspect:
        return child_main(args.inspect)
    if args.names:
        return names_main(args.zoo)

    out = args.out or Path(ZOOS[args.zoo].out)
    out = out if out.is_absolute() else ROOT / out
    results = json.loads(out.read_text()) if out.exists() else {}
    listed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--names", "--zoo", args.zoo],
        capture_output=True,
        text=True,
        check=True,
    )
    zoo = {name: (spec, family) for name, spec, family in json.loads(listed.stdout)}
    names = list(zoo)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := [n for n in wanted if n not in zoo]:
            parser.error(f"not among the {args.zoo} models measured: {', '.join(unknown)}")
        names = wanted
    todo = [n for n in names if args.force or n not in results]
    print(f"{len(todo)} models to do, {len(names) - len(todo)} already in {out}", flush=True)
    for i, name in enumerate(todo, 1):
        record = measure(name, *zoo[name], args.timeout)
        results[name] = record
        save(out, dict(sorted(results.items())))
        print(
            f"[{i}/{len(todo)}] {name}: {record['status']} ({record['seconds_total']:.0f} s)",
            flush=True,
        )
    if args.markdown:
        markdown = args.markdown if args.markdown.is_absolute() else ROOT / args.markdown
        write_markdown(markdown, results, args.zoo)
    if results:
        print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
