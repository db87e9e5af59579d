"""The `atlas` command: parse, call one function, print, exit code (2 for bad input)."""

from __future__ import annotations

import json
import sys

import click

from atlas import models as model_registry
from atlas.errors import AtlasError

DEVICE_HELP = "cpu, cuda, cuda:N (default: cuda when available)"


class AtlasGroup(click.Group):
    """Turns AtlasError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtlasError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atlas")
def cli() -> None:
    """Feature atlases of image CNNs."""


@cli.command("models")
def models_command() -> None:
    """List the built-in model specs and where their weights come from."""
    for row in model_registry.describe_builtins():
        click.echo(f"{row['name']:<22} {row['input']:<10} {row['weights']}")
    names = model_registry.torchvision_names()
    click.echo(
        f"\nAlso any of {len(names)} torchvision classification models by name "
        f"({', '.join(names[:4])}, ...), with weights from the local torch hub cache or "
        "--weights FILE; `package.module:factory`; or a TorchScript file."
    )


@cli.command("layers")
@click.argument("model")
@click.option("--weights", help="State-dict file (or torchvision weights name).")
@click.option("--match", "patterns", multiple=True, metavar="GLOB", help="Only matching layers.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def layers_command(model: str, weights: str | None, patterns: tuple[str, ...], as_json: bool):
    """List the visualizable layers of MODEL with their output shapes."""
    from atlas.layers import select

    loaded = model_registry.load(model, weights)
    layers = select(loaded, patterns) if patterns else loaded.layers
    if as_json:
        click.echo(json.dumps([layer.as_dict() for layer in layers], indent=2))
        return
    width = max(len(layer.name) for layer in layers)
    for layer in layers:
        shape = "x".join(str(n) for n in layer.shape)
        click.echo(f"{layer.name:<{width}}  {layer.type:<24} {shape:<14} {layer.channels}")


@cli.command("visualize")
@click.argument("model")
@click.argument("targets", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", help="State-dict file (or torchvision weights name).")
@click.option("--recipe", "recipe_name", default="fourier", show_default=True)
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
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help=DEVICE_HELP)
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
    recipe_name,
    steps,
    size,
    lr,
    samples,
    diversity,
    colour_from,
    negative,
    seed,
    device,
    formats,
):
    """Visualize a few TARGETS of MODEL: blocks.8:3 (channel), blocks.8:3@3,3 (neuron),
    blocks.8:3@centre, blocks.8:3@0-2,0-7 (region), blocks.8 (whole layer), logits:8 or
    logits:hen (class)."""
    from atlas import quick
    from atlas.files import writable_folder
    from atlas.optim import get
    from atlas.optim.param import colour_matrix_from_folder
    from atlas.optim.recipes import DEFAULT_DIVERSITY
    from atlas.targets import parse_target

    out_path = writable_folder(out)
    if diversity is None and samples > 1:
        diversity = DEFAULT_DIVERSITY
    colour = colour_matrix_from_folder(colour_from) if colour_from else None
    recipe = get(recipe_name, steps=steps, size=size, lr=lr, diversity=diversity, colour=colour)
    loaded = model_registry.load(model, weights)
    parsed = [parse_target(text, loaded, negative=negative) for text in targets]
    with click.progressbar(length=1, label="optimizing", file=sys.stderr) as bar:

        def on_step(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        summary = quick.run(
            loaded,
            parsed,
            recipe,
            out_path,
            samples=samples,
            seed=seed,
            device=device,
            formats=formats,
            on_step=on_step,
        )
    for unit in summary["units"]:
        label = f" ({unit['label']})" if unit["label"] else ""
        click.echo(
            f"{unit['id']}{label}: objective {unit['objective_start']:.3f} -> "
            f"{unit['objective_best']:.3f} (best at step {unit['best_step']}), "
            f"{', '.join(unit['images'])}"
        )
    click.echo(f"{len(summary['units'])} units in {summary['seconds']:.1f} s; wrote {out_path}")


def main() -> None:
    cli(prog_name="atlas")
