"""AtlasConfig: what an atlas run does, from atlas.toml and flags (flags win), validated.

atlas.toml, every key optional except `model` (or the MODEL argument):

    model = "efficientnet_lite0"
    weights = "checkpoints/last.pth"
    layers = ["blocks.*", "head"]        # names or globs (`*` stays within a name part)
    channels = "all"                      # or "0-63", "3,5,9"
    classes = "hen,pelican,0-9"           # "all", ranges, lists, labels; "" for none
    samples = 1
    seed = 0
    batch = 0                             # units per task; 0 = chosen per layer and device
    timelapse = 0                         # keep a frame every N steps: an animated WebP per unit
    exemplars = "photos/"                 # a folder of images: each unit's top ones are shown
    exemplars_top = 6
    out = "atlas-out"
    scheduler = "local"                   # local | inline | tcp://host:port
    scheduler_file = ""

    [recipe]
    name = "fourier"
    steps = 512                           # any Recipe field

    [channels_per_layer]
    "blocks.8" = "0-15"
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from atlas.errors import AtlasError, did_you_mean
from atlas.optim.recipes import DEFAULT, Recipe, check_timelapse, get

_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class AtlasConfig:
    model: str
    out: str
    weights: str | None = None
    layers: tuple[str, ...] = ()  # empty: the model's default layers
    channels: str = "all"
    channels_per_layer: tuple[tuple[str, str], ...] = ()
    classes: str = "all"
    recipe: Recipe = field(default_factory=lambda: get(DEFAULT))
    samples: int = 1
    seed: int = 0
    batch: int = 0
    timelapse: int = 0
    exemplars: str | None = None
    exemplars_top: int = 6
    scheduler: str = "local"
    scheduler_file: str | None = None
    force: bool = False
    prune: bool = False

    def channels_for(self, layer: str) -> str:
        return dict(self.channels_per_layer).get(layer, self.channels)


def parse_indices(
    spec: str,
    count: int,
    what: str,
    names: tuple[str, ...] | None = None,
    *,
    owner: str | None = None,
):
    """'all', '0-63', '3,5,9', label names (when `names` is given), or '' -> sorted indices.
    Out-of-range numbers and unknown names raise AtlasError."""
    spec = spec.strip()
    if spec.lower() == "all":
        return list(range(count))
    indices: set[int] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.isdigit():
            first = last = int(item)
        elif match := _RANGE.match(item):
            first, last = int(match[1]), int(match[2])
            if first > last:
                raise AtlasError(f"{what} range {item} is backwards")
        elif names:
            lowered = [name.lower() for name in names]
            if item.lower() not in lowered:
                raise AtlasError(f"no {what} named {item!r}{did_you_mean(item, names)}")
            first = last = lowered.index(item.lower())
        else:
            raise AtlasError(f"{what}s must be 'all', ranges like 0-63 or lists like 3,5,9")
        if last >= count:
            raise AtlasError(
                f"{what} {last} is out of range: "
                f"{f'{owner} has' if owner else 'there are'} {count} ({what} 0-{count - 1})"
            )
        indices.update(range(first, last + 1))
    return sorted(indices)


def _as_spec(value):
    """TOML lists and bare numbers of channels or classes, as the string form ('3,5,9')."""
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise AtlasError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise AtlasError(f"config file {path} is not valid TOML: {error}") from None


_TYPES = {
    **dict.fromkeys(("model", "out", "weights", "channels", "classes", "scheduler"), str),
    **dict.fromkeys(("samples", "seed", "batch", "timelapse", "exemplars_top"), int),
    **dict.fromkeys(("scheduler_file", "exemplars"), str),
    "layers": tuple,
}
_KEYS = {f.name for f in dataclasses.fields(AtlasConfig)} - {"force", "prune"}


def build(config_file: str | None = None, **flags) -> AtlasConfig:
    """Merge atlas.toml (if any) with flags (None means 'not given') into one AtlasConfig."""
    values: dict = _read_toml(config_file) if config_file else {}
    unknown = set(values) - _KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise AtlasError(f"unknown setting {key!r} in {config_file}{did_you_mean(key, _KEYS)}")
    recipe_table = values.pop("recipe", {})
    if isinstance(recipe_table, str):
        recipe_table = {"name": recipe_table}
    per_layer = values.pop("channels_per_layer", {})
    if not isinstance(recipe_table, dict) or not isinstance(per_layer, dict):
        raise AtlasError(
            "[recipe] and [channels_per_layer] must be tables (recipe may also be a preset name)"
        )
    recipe_flags = flags.pop("recipe_overrides", {}) or {}
    table_name = recipe_table.pop("name", DEFAULT)
    recipe_name = flags.pop("recipe", None) or table_name
    try:
        recipe = get(recipe_name, **{**recipe_table, **recipe_flags})
    except TypeError as error:
        raise AtlasError(f"bad recipe setting: {error}") from None
    for key, value in flags.items():
        if value is not None and value != ():
            values[key] = value
    if not values.get("model"):
        raise AtlasError("no model given: pass MODEL or set `model` in atlas.toml")
    if not values.get("out"):
        raise AtlasError("no output folder given: pass --out or set `out` in atlas.toml")
    if isinstance(values.get("layers"), str):
        values["layers"] = [values["layers"]]
    for key in ("channels", "classes"):  # TOML lists and bare numbers read as specs too
        values[key] = _as_spec(values[key]) if key in values else values.get(key)
        if values[key] is None:
            del values[key]
    per_layer = {layer: _as_spec(spec) for layer, spec in per_layer.items()}
    config = AtlasConfig(
        recipe=recipe,
        channels_per_layer=tuple(sorted((str(k), str(v)) for k, v in per_layer.items())),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()},
    )
    for key, kind in _TYPES.items():
        value = getattr(config, key)
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if value is not None and wrong_type:
            raise AtlasError(f"{key} must be {kind.__name__ if kind is not tuple else 'a list'}")
    checks = [
        (config.samples >= 1, "samples must be at least 1"),
        (config.batch >= 0, "batch must be 0 (automatic) or more"),
        (config.seed >= 0, "seed must be 0 or more"),
        (config.timelapse >= 0, "timelapse must be 0 (off) or a number of steps"),
        (config.exemplars_top >= 1, "exemplars_top must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise AtlasError(message)
    check_timelapse(config.recipe, config.timelapse)
    return config
