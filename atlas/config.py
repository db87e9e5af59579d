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
    variants = ["neuron", "negative"]     # extra images per unit (neuron, negative), and a
                                          # whole-layer image per layer (layer)
    concepts = 16                         # a dictionary of 16 concepts per concept layer and
    activation_atlas = 8                  # an 8 x 8 activation atlas, learned from the
    concept_layers = ["blocks.8"]         # exemplars (default: every planned layer but logits)
    concept_steps = 64                    # steps of concept and cell units (default: the recipe's)
    colour_from = "photos/"               # decorrelate colour by these images' statistics: the
                                          # recipe's colour becomes their matrix (in the hash)
    out = "atlas-out"
    scheduler = "local"                   # local | inline | tcp://host:port
    scheduler_file = ""
    label = "step-12000"                  # names this run's checkpoint (atlas history)
    keep = 30                             # checkpoints kept in OUT, the newest

    [recipe]
    name = "fourier"
    steps = 512                           # any Recipe field; arrays for tuples
    octaves = [{ share = 1, scale = 0.5, lr = [0.08, 0.05], blur = [1.0, 0.5] }]

    [channels_per_layer]
    "blocks.8" = "0-15"

    [cluster]                             # worker jobs on SLURM, not `scheduler` (atlas.cluster)
    partition = "gpu"
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from atlas.cluster import ClusterConfig, cluster_config
from atlas.errors import AtlasError, did_you_mean
from atlas.history import DEFAULT_KEEP
from atlas.optim.recipes import DEFAULT, DEFAULT_DIVERSITY, Recipe, check_timelapse, get

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
    variants: tuple[str, ...] = ()  # of VARIANTS
    exemplars: str | None = None
    exemplars_top: int = 6
    concepts: int = 0  # K concepts per concept layer (0: none), learned from the exemplars
    activation_atlas: int = 0  # an N x N activation atlas per concept layer (0: none)
    concept_layers: tuple[str, ...] = ()  # names or globs; empty: every planned layer
    concept_steps: int = 0  # steps of concept and cell units (0: the recipe's)
    scheduler: str = "local"
    scheduler_file: str | None = None
    cluster: ClusterConfig | None = None  # worker jobs on a batch scheduler, not `scheduler`
    label: str | None = None  # the checkpoint's name in the history (default: its id)
    keep: int = DEFAULT_KEEP  # checkpoints kept in OUT
    force: bool = False
    prune: bool = False

    def channels_for(self, layer: str) -> str:
        return dict(self.channels_per_layer).get(layer, self.channels)

    def recipe_for(self, learned: bool) -> Recipe:
        """The recipe of a unit: a concept's or a cell's (`learned`) with `concept_steps` steps
        when set, so that many of them stay affordable (the demo's 38) while channels keep
        theirs; a channel's recipe, and so its key, is never changed by it."""
        if learned and self.concept_steps:
            return dataclasses.replace(self.recipe, steps=self.concept_steps)
        return self.recipe


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
    except UnicodeDecodeError as error:
        raise AtlasError(
            f"config file {path} is not UTF-8 text (byte {error.start}): save it as UTF-8"
        ) from None
    except OSError as error:
        raise AtlasError(f"cannot read config file {path}: {error.strerror}") from None


_TYPES = {
    **dict.fromkeys(("model", "out", "weights", "channels", "classes", "scheduler"), str),
    **dict.fromkeys(("samples", "seed", "batch", "timelapse", "exemplars_top", "keep"), int),
    **dict.fromkeys(("concepts", "activation_atlas", "concept_steps"), int),
    **dict.fromkeys(("scheduler_file", "exemplars", "label"), str),
    "layers": tuple,
    "variants": tuple,
    "concept_layers": tuple,
}
VARIANTS = ("neuron", "negative", "layer")  # extra images: centre neuron, negative, whole layer
# colour_from is read into the recipe (its colour matrix), not kept as a setting of its own
_KEYS = {f.name for f in dataclasses.fields(AtlasConfig)} - {"force", "prune"} | {"colour_from"}


def read_settings(config_file: str | None) -> dict:
    """The settings of an atlas.toml (none without one); unknown names raise AtlasError."""
    values: dict = _read_toml(config_file) if config_file else {}
    unknown = set(values) - _KEYS
    if unknown:
        key = sorted(unknown)[0]
        if key in _field_types(Recipe):
            raise AtlasError(
                f"setting {key!r} in {config_file} is a recipe setting: put it under [recipe]"
            )
        raise AtlasError(f"unknown setting {key!r} in {config_file}{did_you_mean(key, _KEYS)}")
    return values


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _arms(kind) -> tuple:
    """The types a field may take: those of a union (less None), or the one type."""
    arms = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return tuple(arm for arm in arms if arm is not type(None))


def _kind_name(kind) -> str:
    """'a number', 'a list of 2 numbers', 'a string or a list of numbers': for messages."""
    names = []
    for arm in _arms(kind):
        args = typing.get_args(arm)
        if typing.get_origin(arm) is tuple:
            count = "" if args[-1] is Ellipsis else f"{len(args)} "
            items = "tables" if dataclasses.is_dataclass(args[0]) else "numbers"
            names.append(f"a list of {count}{items}")
        else:
            names.append(_KIND_NAMES.get(arm, "a table"))
    return " or ".join(names)


def _coerce(value, kind, name: str):
    """A TOML value as the type `kind` of a Recipe or Octave field: arrays as tuples, tables as
    Octaves, integers where numbers are meant (`lr = 1` and `lr = 1.0` hash alike)."""
    for arm in _arms(kind):
        args = typing.get_args(arm)
        if typing.get_origin(arm) is tuple and isinstance(value, list):
            items = args[:1] * len(value) if args[-1] is Ellipsis else args
            if len(items) == len(value):
                return tuple(
                    _coerce(item, item_kind, f"{name}[{i}]")
                    for i, (item, item_kind) in enumerate(zip(value, items, strict=True))
                )
        elif dataclasses.is_dataclass(arm) and isinstance(value, dict):
            return _from_table(arm, value, name)
        elif arm is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        elif arm in (int, str) and type(value) is arm:
            return value
    raise AtlasError(f"bad recipe setting: {name} must be {_kind_name(kind)}")


def _is_matrix(value: object) -> bool:
    """Whether a TOML value is a 3x3 array of arrays."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(row, list) and len(row) == 3 for row in value)
    )


def _from_table(cls: type, table: dict, name: str):
    """A dataclass (an Octave) from a TOML table, every value coerced to its field's type."""
    kinds = _field_types(cls)
    unknown = sorted(set(table) - set(kinds))
    if unknown:
        hint = did_you_mean(unknown[0], kinds)
        raise AtlasError(f"bad recipe setting: {name} has no setting {unknown[0]!r}{hint}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [key for key in required if key not in table]
    if missing:
        raise AtlasError(f"bad recipe setting: {name} needs {', '.join(missing)}")
    return cls(**{key: _coerce(value, kinds[key], f"{name}.{key}") for key, value in table.items()})


def _recipe(
    values: dict, config_file, name, overrides: dict, colour_from, samples: int = 1
) -> Recipe:
    """The recipe of atlas.toml settings (popped from `values`): the [recipe] table, a preset
    name and Recipe fields, and colour_from; the flags' name, overrides and colour_from win.
    A colour folder becomes its matrix, so the recipe hash follows the images, not the path.
    K > 1 samples get DEFAULT_DIVERSITY unless a diversity was set (0 included) or the preset
    has one: K images of one unit should differ."""
    table = values.pop("recipe", {})
    table = {"name": table} if isinstance(table, str) else table
    if not isinstance(table, dict):
        raise AtlasError("[recipe] must be a table or a preset name")
    table = dict(table)
    file_name = table.pop("name", DEFAULT)
    preset = name or file_name  # a --recipe flag wins over the file's name
    if not isinstance(preset, str):
        raise AtlasError("the recipe name must be a preset name")
    file_folder = values.pop("colour_from", None)
    if file_folder is not None and not isinstance(file_folder, str):
        raise AtlasError("colour_from must be str")
    if file_folder and "colour" in table:
        raise AtlasError(
            f"{config_file} sets both colour_from and [recipe] colour: keep one of them"
        )
    kinds = _field_types(Recipe)
    colour = table.get("colour")
    if isinstance(colour, list) and any(isinstance(row, list) for row in colour):
        if not _is_matrix(colour):
            raise AtlasError("bad recipe setting: colour must be 3 rows of 3 numbers, or 9 numbers")
        table["colour"] = [number for row in colour for number in row]  # the 3x3 matrix it is
    table = {k: _coerce(v, kinds[k], k) if k in kinds else v for k, v in table.items()}
    settings = {**table, **overrides}
    if samples > 1 and "diversity" not in settings and get(preset).diversity == 0:
        settings["diversity"] = DEFAULT_DIVERSITY
    try:
        recipe = get(preset, **settings)
    except TypeError as error:
        raise AtlasError(f"bad recipe setting: {error}") from None
    folder = colour_from or file_folder
    if not folder:
        return recipe
    from atlas.optim.param import colour_matrix_from_folder

    if not Path(folder).is_dir():
        raise AtlasError(f"colour_from folder {folder} does not exist")
    return recipe.replace(colour=colour_matrix_from_folder(folder))


def load_recipe(
    config_file: str | None,
    name: str | None = None,
    *,
    colour_from=None,
    samples: int = 1,
    **overrides,
) -> Recipe:
    """The recipe an atlas.toml describes ([recipe] and colour_from; every other setting is
    checked but unused), or the preset `name` (default fourier) without one; flags on top:
    `name`, `colour_from` and Recipe fields (None: not given). For `atlas visualize`."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return _recipe(read_settings(config_file), config_file, name, given, colour_from, samples)


def _variants(given) -> tuple[str, ...]:
    """Variant names from a list or comma-separated strings, checked, in VARIANTS order."""
    if not isinstance(given, list | tuple):
        raise AtlasError("variants must be a list of names: " + ", ".join(VARIANTS))
    names = {part.strip() for item in given for part in str(item).split(",") if part.strip()}
    if unknown := sorted(names - set(VARIANTS)):
        hint = did_you_mean(unknown[0], VARIANTS)
        raise AtlasError(f"unknown variant {unknown[0]!r}{hint}; variants: {', '.join(VARIANTS)}")
    return tuple(name for name in VARIANTS if name in names)


def build(config_file: str | None = None, **flags) -> AtlasConfig:
    """Merge atlas.toml (if any) with flags (None means 'not given') into one AtlasConfig."""
    values = read_settings(config_file)
    per_layer = values.pop("channels_per_layer", {})
    if not isinstance(per_layer, dict):
        raise AtlasError("[channels_per_layer] must be a table")
    cluster_table, cluster_kind = values.pop("cluster", None), flags.pop("cluster", None)
    samples = flags.get("samples") or values.get("samples", 1)
    recipe = _recipe(
        values,
        config_file,
        flags.pop("recipe", None),
        flags.pop("recipe_overrides", {}) or {},
        flags.pop("colour_from", None),
        samples if isinstance(samples, int) else 1,  # a wrong type is reported below
    )
    for key, value in flags.items():
        if value is not None and value != ():
            values[key] = value
    if not values.get("model"):
        raise AtlasError("no model given: pass MODEL or set `model` in atlas.toml")
    if not values.get("out"):
        raise AtlasError("no output folder given: pass --out or set `out` in atlas.toml")
    for key in ("layers", "variants", "concept_layers"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    values["variants"] = _variants(values.get("variants", ()))
    for key in ("channels", "classes"):  # TOML lists and bare numbers read as specs too
        values[key] = _as_spec(values[key]) if key in values else values.get(key)
        if values[key] is None:
            del values[key]
    per_layer = {layer: _as_spec(spec) for layer, spec in per_layer.items()}
    cluster = cluster_config(cluster_table, cluster_kind, str(values["out"]))
    if cluster and (values.get("scheduler", "local") != "local" or values.get("scheduler_file")):
        raise AtlasError("both a cluster and a scheduler are given: keep one of them")
    config = AtlasConfig(
        recipe=recipe,
        cluster=cluster,
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
        (config.keep >= 1, "keep must be at least 1 (the checkpoint being run)"),
        (config.label != "", "label must not be empty"),
        (config.concepts >= 0, "concepts must be 0 (none) or a number of concepts"),
        (
            config.activation_atlas != 1 and config.activation_atlas >= 0,
            "activation_atlas must be 0 (none) or a grid size of at least 2",
        ),
        (config.concept_steps >= 0, "concept_steps must be 0 (the recipe's) or a number of steps"),
        (
            bool(config.exemplars) or not (config.concepts or config.activation_atlas),
            "concepts and activation atlases are learned from exemplars: add --exemplars DIR",
        ),
        (
            not config.concept_layers or bool(config.concepts or config.activation_atlas),
            "concept_layers needs --concepts K or --activation-atlas N",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise AtlasError(message)
    check_timelapse(config.recipe, config.timelapse)
    if config.concept_steps:
        check_timelapse(config.recipe_for(True), config.timelapse)
    return config
