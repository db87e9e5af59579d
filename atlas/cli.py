"""The `atlas` command: parse, call one function, print, exit code (2 for bad input)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import click

from atlas.cluster import KINDS as CLUSTER_KINDS
from atlas.errors import AtlasError
from atlas.optim.recipes import DEFAULT as DEFAULT_RECIPE
from atlas.optim.recipes import PRESETS

DEVICE_HELP = "cpu, cuda, cuda:N (default: cuda when available)"
WEIGHTS_HELP = (
    "random (untrained, seeded), a state-dict FILE, or a weights NAME (a torchvision weights "
    "member, a timm tag); default: the model's own pretrained weights, from local files only."
)


def checked_device(_context, _parameter, value: str | None) -> str | None:
    """--device, refused in one line when this machine cannot compute on it."""
    if value is None:
        return None
    from atlas.optim.device import check_device

    return check_device(value)


class StepProgress:
    """A progress bar on a terminal, opened at the first step (so that errors found before any
    work print alone); silent when stderr is not a terminal."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def update(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


class AtlasGroup(click.Group):
    """Bad input of any kind (AtlasError, a bad flag or value) ends in one line on stderr and
    exit code 2, never a traceback or a usage screen. With ATLAS_DEBUG=1 an AtlasError's
    traceback (and those of its causes) comes first, to find where a message came from."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except (AtlasError, click.UsageError) as error:
            if isinstance(error, AtlasError) and os.environ.get("ATLAS_DEBUG") == "1":
                click.echo("".join(traceback.format_exception(error)), err=True, nl=False)
            message = error.format_message() if isinstance(error, click.UsageError) else error
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=AtlasGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Set ATLAS_DEBUG=1 to print the traceback behind an error message.",
)
@click.version_option(package_name="atlas")
def cli() -> None:
    """Feature atlases of image CNNs."""


@cli.command("models")
def models_command() -> None:
    """List the kinds of model spec (one per model source) and where their weights come from."""
    from atlas.models import describe_sources

    click.echo("\n".join(describe_sources()))


@cli.command("layers")
@click.argument("model")
@click.option("--weights", metavar="random|FILE|NAME", help=WEIGHTS_HELP)
@click.option("--match", "patterns", multiple=True, metavar="GLOB", help="Only matching layers.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def layers_command(model: str, weights: str | None, patterns: tuple[str, ...], as_json: bool):
    """List the visualizable layers of MODEL with their output shapes."""
    from atlas import models as model_registry
    from atlas.layers import select
    from atlas.plan import default_layer_patterns

    loaded = model_registry.load(model, weights)
    layers = select(loaded, patterns) if patterns else loaded.layers
    if not layers:
        raise AtlasError(f"{model} has no layer with a feature map or vector output")
    defaults = set(default_layer_patterns(loaded))
    if as_json:
        rows = [{**layer.as_dict(), "default": layer.name in defaults} for layer in layers]
        click.echo(json.dumps(rows, indent=2))
        return
    origin = loaded.preprocessing_from or "as given"
    click.echo(f"input: {loaded.preprocessing.describe()} ({origin})")
    width = max(len(layer.name) for layer in layers)
    click.echo(f"  {'layer':<{width}}  {'type':<24} {'kind':<13} {'shape':<14} channels")
    for layer in layers:
        mark = "*" if layer.name in defaults else " "
        shape = "x".join(str(n) for n in layer.shape)
        kind = layer.kind.replace("_", "-") + (f" +{layer.prefix}" if layer.prefix else "")
        line = f"{mark} {layer.name:<{width}}  {layer.type:<24} {kind:<13} {shape:<14} "
        reads = f"read before {layer.pre_activation}" if layer.pre_activation else ""
        click.echo(f"{line}{layer.channels:<8} {reads}".rstrip())
    click.echo("* an atlas's default layers (its main path); shapes as read: channels x grid")


@cli.command("visualize")
@click.argument("model")
@click.argument("targets", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", metavar="random|FILE|NAME", help=WEIGHTS_HELP)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Take the recipe ([recipe] and colour_from) from this atlas.toml; flags override it.",
)
@click.option(
    "--recipe",
    "recipe_name",
    type=click.Choice(sorted(PRESETS)),
    help=f"Recipe preset (default: the config's, else {DEFAULT_RECIPE}).",
)
@click.option("--steps", type=click.IntRange(min=1))
@click.option("--size", type=click.IntRange(min=8), help="Optimized image size in px.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True))
@click.option("--samples", default=1, type=click.IntRange(min=1), help="Diverse images per unit.")
@click.option("--diversity", type=click.FloatRange(min=0), help="Weight of the diversity term.")
@click.option(
    "--colour-from",
    type=click.Path(exists=True, file_okay=False),
    help="Decorrelate colour with the statistics of this folder of images.",
)
@click.option("--negative", is_flag=True, help="Minimize instead of maximize.")
@click.option(
    "--timelapse",
    default=0,
    type=click.IntRange(min=0),
    metavar="N",
    help="Also save the optimization as an animated WebP, a frame every N steps.",
)
@click.option(
    "--grow",
    is_flag=True,
    help="Grow each channel target over its map in reading order: frame k maximizes the "
    "channel's mean over the first k positions; frames and an animated WebP.",
)
@click.option(
    "--grow-step",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --grow: keep every N-th prefix (and always the whole map). Default 1.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=0),
    metavar="N",
    help="With --grow: at most N images per optimization batch (0, default: all in one).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help=DEVICE_HELP, callback=checked_device)
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["webp", "png"]),
    default=("webp",),
    show_default=True,
)
def visualize_command(
    model,
    targets,
    out,
    weights,
    config_file,
    recipe_name,
    steps,
    size,
    lr,
    samples,
    diversity,
    colour_from,
    negative,
    timelapse,
    grow,
    grow_step,
    batch,
    seed,
    device,
    formats,
):
    """Visualize a few TARGETS of MODEL: blocks.8:3 (channel), blocks.8:3@3,3 (neuron),
    blocks.8:3@centre, blocks.8:3@0-2,0-7 (region), blocks.8 (whole layer), logits:8 or
    logits:hen (class). With --grow, channel targets only, grown neuron by neuron."""
    from atlas import config, results
    from atlas import models as model_registry
    from atlas.files import writable_folder
    from atlas.optim.loop import check_targets
    from atlas.targets import parse_target

    if not grow and (grow_step is not None or batch is not None):
        raise AtlasError("--grow-step and --batch apply only with --grow")
    if grow and (samples > 1 or timelapse):
        raise AtlasError("--grow makes one image per prefix of the map: drop --samples/--timelapse")
    recipe = config.load_recipe(
        config_file,
        recipe_name,
        colour_from=colour_from,
        steps=steps,
        size=size,
        lr=lr,
        diversity=diversity,
        samples=samples,
    )
    loaded = model_registry.load(model, weights)
    parsed = [parse_target(text, loaded, negative=negative) for text in targets]
    if grow:
        from atlas import grow as growth

        growth.check(loaded, parsed)
        out_path = writable_folder(out)
        with StepProgress("growing") as on_step:
            summary = growth.write_growth(
                loaded,
                parsed,
                recipe,
                out_path,
                every=grow_step or 1,
                batch=batch or 0,
                seed=seed,
                device=device,
                formats=formats,
                on_step=on_step,
            )
        lines = growth.describe(summary)
        lines[-1] += f"; wrote {out_path}"
        click.echo("\n".join(lines))
        return
    check_targets(loaded, parsed)
    out_path = writable_folder(out)
    with StepProgress("optimizing") as on_step:
        summary = results.write_results(
            loaded,
            parsed,
            recipe,
            out_path,
            samples=samples,
            seed=seed,
            device=device,
            formats=formats,
            on_step=on_step,
            timelapse=timelapse,
        )
    for unit in summary["units"]:
        label = f" ({unit['label']})" if unit["label"] else ""
        click.echo(
            f"{unit['id']}{label}: objective {unit['objective_start']:.3f} -> "
            f"{unit['objective_best']:.3f} (best at step {unit['best_step']}), "
            f"{', '.join(unit['images'])}"
        )
    click.echo(f"{len(summary['units'])} units in {summary['seconds']:.1f} s; wrote {out_path}")


def run_options(function: Callable) -> Callable:
    """The options shared by `atlas run` and `atlas plan`; None means 'not given'."""
    options = [
        click.argument("model", required=False),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="atlas.toml; flags override it.",
        ),
        click.option("--weights", metavar="random|FILE|NAME", help=WEIGHTS_HELP),
        click.option(
            "--layers",
            multiple=True,
            metavar="GLOB",
            help="Layer names or globs (repeat); default: the model's main layers.",
        ),
        click.option("--channels", help="Channels per layer: all, 0-63, 3,5,9 (default all)."),
        click.option("--classes", help="Class logits: all, ranges, lists, labels ('' for none)."),
        click.option(
            "--recipe",
            type=click.Choice(sorted(PRESETS)),
            help=f"Recipe preset (default {DEFAULT_RECIPE}).",
        ),
        click.option("--steps", type=click.IntRange(min=1)),
        click.option("--size", type=click.IntRange(min=8), help="Optimized image size in px."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True)),
        click.option("--samples", type=click.IntRange(min=1), help="Diverse images per unit."),
        click.option("--seed", type=click.IntRange(min=0)),
        click.option("--batch", type=click.IntRange(min=0), help="Units per task (0: auto)."),
        click.option(
            "--timelapse",
            type=click.IntRange(min=0),
            metavar="N",
            help="Keep a frame every N steps: an animated WebP per unit (0: off).",
        ),
        click.option(
            "--colour-from",
            type=click.Path(exists=True, file_okay=False),
            help="Decorrelate colour with the statistics of this folder of images.",
        ),
        click.option(
            "--variants",
            multiple=True,
            metavar="LIST",
            help="Extra images: neuron (the centre neuron), negative (what turns the unit "
            "off), layer (a whole-layer image per layer), e.g. --variants neuron,negative.",
        ),
        click.option(
            "--exemplars",
            metavar="DIR",
            help="A folder of images: show each unit's most exciting ones next to it.",
        ),
        click.option(
            "--exemplars-top",
            type=click.IntRange(min=1),
            metavar="K",
            help="Exemplars per unit (default 6).",
        ),
        click.option(
            "--concepts",
            type=click.IntRange(min=1),
            metavar="K",
            help="Learn K concepts (directions over the channels) of each concept layer from "
            "the exemplars' activations; each is a unit (needs --exemplars).",
        ),
        click.option(
            "--activation-atlas",
            type=click.IntRange(min=2),
            metavar="N",
            help="An N x N activation atlas of each concept layer from the exemplars' "
            "activations; each cell is a unit (needs --exemplars).",
        ),
        click.option(
            "--concept-steps",
            type=click.IntRange(min=1),
            metavar="N",
            help="Optimization steps of concept and cell units (default: the recipe's).",
        ),
        click.option(
            "--concept-layers",
            multiple=True,
            metavar="GLOB",
            help="Layers that get concepts and atlases (repeat); default: every planned layer.",
        ),
        click.option("--scheduler", help="local (default), inline, or tcp://host:port."),
        click.option(
            "--cluster",
            type=click.Choice(CLUSTER_KINDS),
            help="Run the workers as batch jobs: slurm (settings: [cluster] in atlas.toml).",
        ),
        click.option(
            "--scheduler-file",
            type=click.Path(dir_okay=False),
            help="A Dask scheduler file (dask-jobqueue, `dask scheduler`).",
        ),
        click.option("--out", help="Output folder."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def build_config(config_file, recipe, steps, size, lr, samples, **flags):
    from atlas import config

    overrides = {"steps": steps, "size": size, "lr": lr}
    built = config.build(
        config_file,
        recipe=recipe,
        recipe_overrides={k: v for k, v in overrides.items() if v is not None},
        samples=samples,
        **flags,
    )
    return built


@cli.command("run")
@run_options
@click.option("--force", is_flag=True, help="Rerun every unit, stored or not.")
@click.option("--prune", is_flag=True, help="Delete stored units that are no longer planned.")
@click.option("--label", help="Name this run's checkpoint in the history, e.g. step-12000.")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    help="Checkpoints kept in OUT, the newest (default 30).",
)
def run_command(force: bool, prune: bool, **options) -> None:
    """Visualize every planned unit of MODEL on Dask and store the results in OUT."""
    from atlas.pipeline import run_atlas
    from atlas.progress import RunProgress

    config = dataclasses.replace(build_config(**options), force=force, prune=prune)
    progress = RunProgress()
    summary = run_atlas(
        config, on_start=progress.start, on_progress=progress.update, on_cluster=progress.cluster
    )
    progress.finish()
    if summary.rekeyed:
        click.echo(
            f"kept {summary.rekeyed} units stored before preprocessing was part of unit keys, "
            "as made with the preprocessing of now (`atlas run --force` redoes them)"
        )
    click.echo(
        f"{summary.done} done, {summary.failed} failed, {summary.skipped} already stored "
        f"of {summary.planned} units in {summary.seconds:.1f} s; results in {summary.out}"
    )
    for outcome in summary.passes:
        line, problem = outcome.report()
        if line:
            click.echo(line)
        if problem:
            click.echo(problem, err=True)
    click.echo(f"atlas: {summary.site}")
    for failure in summary.failures[:10]:
        click.echo(f"failed: {failure}", err=True)
    if summary.failures:
        sys.exit(1)


@cli.command("compare")
@click.argument("out_a", type=click.Path(file_okay=False))
@click.argument("out_b", type=click.Path(file_okay=False))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the pages."
)
@click.option("--device", help=DEVICE_HELP, callback=checked_device)
def compare_command(out_a: str, out_b: str, out: str, device: str | None) -> None:
    """Pair the units of two atlases (models, checkpoints or recipes) and rank them by how much
    they changed: how well each atlas's image drives the other model's unit."""
    from atlas.compare import compare, describe

    click.echo(describe(compare(out_a, out_b, out, device)))


@cli.command("plan")
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="Time a few steps per layer shape, where the run would compute, for the layers no "
    "earlier run has timings of.",
)
def plan_command(as_json: bool, calibrate: bool, **options) -> None:
    """Show what `atlas run` would do: units and tasks per layer and an estimated time."""
    from atlas.plan_report import plan_summary, plan_table
    from atlas.progress import RunProgress

    progress = RunProgress()
    summary = plan_summary(
        build_config(**options),
        calibrate_layers=calibrate,
        on_progress=progress.update,
        on_cluster=progress.cluster,
    )
    progress.finish()
    click.echo(json.dumps(summary, indent=2) if as_json else plan_table(summary))


@cli.command("status")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_command(out: str, as_json: bool) -> None:
    """Done / failed / missing / stale units per layer of the atlas in OUT."""
    from atlas.store import STATUSES, Store

    table = Store(out).status()
    if not table:
        raise AtlasError(f"{out} holds no atlas results (no units/ folder or plan.json)")
    if as_json:
        click.echo(json.dumps({layer: dict(counts) for layer, counts in table.items()}, indent=2))
        return
    width = max(len(layer) for layer in table)
    click.echo(f"{'layer':<{width}}  " + "  ".join(f"{s:>7}" for s in STATUSES))
    for layer, counts in table.items():
        click.echo(f"{layer:<{width}}  " + "  ".join(f"{counts[s]:>7}" for s in STATUSES))


@cli.command("history")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def history_command(out: str) -> None:
    """Print the checkpoints OUT holds, oldest first, with each layer's mean change."""
    from atlas.history_timeline import describe, timeline
    from atlas.store import Store

    store = Store(out)
    units, plan = store.classify()
    if plan is None:
        raise AtlasError(f"{out} is not an atlas (no plan.json): run `atlas run ... --out {out}`")
    checkpoints, _ = timeline(store.history, plan, units)
    click.echo(describe(checkpoints))


@cli.command("render")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def render_command(out: str) -> None:
    """Render the static atlas OUT/site/ from OUT/manifest.json."""
    from atlas.site import render

    started = time.monotonic()
    index = render(out)
    click.echo(f"rendered in {time.monotonic() - started:.1f} s: {index}")


@cli.command("serve")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
def serve_command(out: str, port: int) -> None:
    """Serve OUT/site/ on 127.0.0.1 for a preview."""
    from atlas.serve import serve

    serve(out, port, on_ready=lambda url: click.echo(f"serving {url} (Ctrl-C to stop)"))


def main() -> None:
    cli(prog_name="atlas")
