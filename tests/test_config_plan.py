"""atlas.toml + flags -> AtlasConfig, index specs, and the plan: units, keys and tasks.

Everything here runs on the tiny model with no optimization at all: planning is pure."""

import dataclasses
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tinymodels import tiny_model

from atlas import config as config_module
from atlas.config import AtlasConfig, parse_indices
from atlas.errors import AtlasError
from atlas.models import state_digest
from atlas.optim.param import colour_matrix_from_folder
from atlas.optim.recipes import DEFAULT, DEFAULT_DIVERSITY, Octave, get
from atlas.plan import (
    ENGINE_VERSION,
    Task,
    default_layer_patterns,
    make_plan,
    make_tasks,
    unit_key,
)

TOML = """\
model = "tinymodels:tiny"
out = "from-toml"
layers = ["conv1", "conv2"]
channels = "0-3"
classes = "class1,0"
samples = 2
seed = 7
batch = 3

[recipe]
name = "plain"
steps = 17
size = 40

[channels_per_layer]
"conv2" = "5-6"
"""


def write(tmp_path, text, name="atlas.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def build(tmp_path=None, text=None, **flags):
    path = write(tmp_path, text) if text is not None else None
    return config_module.build(path, **flags)


def plan_config(**overrides) -> AtlasConfig:
    values = {"model": "tinymodels:tiny", "out": "unused", "recipe": get(DEFAULT, steps=3)}
    return AtlasConfig(**{**values, **overrides})


def keys(plan) -> dict[tuple[str, int], str]:
    return {(unit.layer, unit.index): unit.key for unit in plan.units}


@pytest.fixture(scope="module")
def model():
    loaded = tiny_model()
    assert loaded.layers  # measured once for the module
    return loaded


# --- config.build -----------------------------------------------------------------------------


def test_toml_values_are_read(tmp_path):
    config = build(tmp_path, TOML)
    assert config.model == "tinymodels:tiny"
    assert config.out == "from-toml"
    assert config.layers == ("conv1", "conv2")
    assert config.channels == "0-3"
    assert config.classes == "class1,0"
    assert (config.samples, config.seed, config.batch) == (2, 7, 3)
    assert config.channels_per_layer == (("conv2", "5-6"),)
    assert config.channels_for("conv2") == "5-6"
    assert config.channels_for("conv1") == "0-3"
    assert config.recipe.name == "plain"
    assert (config.recipe.steps, config.recipe.size) == (17, 40)
    # the rest of the recipe is the preset's
    assert config.recipe.param == get("plain").param == "pixel"
    assert (config.force, config.prune) == (False, False)


def test_flags_override_toml(tmp_path):
    config = build(
        tmp_path,
        TOML,
        model="other:model",
        out="from-flag",
        layers=("conv3",),
        channels="1",
        classes="",
        samples=1,
        seed=0,
        batch=0,
        recipe_overrides={"steps": 5},
    )
    assert config.model == "other:model"
    assert config.out == "from-flag"
    assert config.layers == ("conv3",)
    assert config.channels == "1"
    assert config.classes == ""  # '' means "no classes", and it is a given value
    assert (config.samples, config.seed, config.batch) == (1, 0, 0)
    assert config.recipe.name == "plain"
    assert config.recipe.steps == 5  # the flag wins over [recipe] steps
    assert config.recipe.size == 40  # [recipe] settings the flags leave alone still apply
    assert config.channels_per_layer == (("conv2", "5-6"),)  # no flag for it


def test_recipe_flag_overrides_toml_recipe_name(tmp_path):
    config = build(tmp_path, TOML, recipe="fourier", recipe_overrides={"steps": 5})
    assert config.recipe.name == "fourier"
    assert config.recipe.param == "fourier"
    assert (config.recipe.steps, config.recipe.size) == (5, 40)


def test_flags_that_are_not_given_keep_toml_values(tmp_path):
    config = build(
        tmp_path, TOML, model=None, layers=(), channels=None, recipe=None, recipe_overrides={}
    )
    assert config.model == "tinymodels:tiny"
    assert config.layers == ("conv1", "conv2")
    assert config.channels == "0-3"
    assert config.recipe.name == "plain"
    assert config.recipe.steps == 17


def test_recipe_overrides_without_toml_reach_the_recipe():
    config = build(model="m", out="o", recipe_overrides={"steps": 3, "size": 32, "lr": 0.2})
    assert config.recipe.name == DEFAULT
    assert (config.recipe.steps, config.recipe.size, config.recipe.lr) == (3, 32, 0.2)
    assert config.recipe.hash != get(DEFAULT).hash
    assert config.recipe.hash == get(DEFAULT, steps=3, size=32, lr=0.2).hash


def test_defaults_without_toml():
    config = build(model="m", out="o")
    assert config.layers == ()
    assert (config.channels, config.classes) == ("all", "all")
    assert (config.samples, config.seed, config.batch) == (1, 0, 0)
    assert config.scheduler == "local"
    assert config.recipe == get(DEFAULT)


def test_recipe_as_a_plain_name_and_lists_as_specs(tmp_path):
    text = 'model = "m"\nout = "o"\nrecipe = "blur-l2"\nlayers = "conv2"\nchannels = [1, 3]\n'
    config = build(tmp_path, text + "classes = 4\n")
    assert config.recipe.name == "blur-l2"
    assert config.layers == ("conv2",)
    assert config.channels == "1,3"
    assert config.classes == "4"


def test_unknown_toml_key_suggests_the_right_one(tmp_path):
    with pytest.raises(AtlasError) as error:
        build(tmp_path, 'model = "m"\nout = "o"\nchanels = "0-3"\n')
    assert "unknown setting 'chanels'" in str(error.value)
    assert "did you mean: channels" in str(error.value)


def test_a_recipe_setting_at_the_top_level_is_sent_to_its_table(tmp_path):
    with pytest.raises(
        AtlasError, match=r"'steps' .* is a recipe setting: put it under \[recipe\]"
    ):
        build(tmp_path, 'model = "m"\nout = "o"\nsteps = 10\n')


def test_colour_is_nine_numbers_or_the_3x3_matrix(tmp_path):
    rows = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
    flat = build(tmp_path, f'model = "m"\nout = "o"\n[recipe]\ncolour = {sum(rows, [])}\n')
    nested = build(tmp_path, f'model = "m"\nout = "o"\n[recipe]\ncolour = {rows}\n')
    assert nested.recipe == flat.recipe and nested.recipe.colour == tuple(sum(rows, []))
    with pytest.raises(AtlasError, match="colour must be 3 rows of 3 numbers, or 9 numbers"):
        build(tmp_path, f'model = "m"\nout = "o"\n[recipe]\ncolour = {rows[:2]}\n')


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "atlas.toml"
    path.write_bytes(b'model = "m"\nlabel = "caf\xe9"\n')
    with pytest.raises(AtlasError, match=f"config file {path} is not UTF-8 text"):
        config_module.build(str(path))


def test_unknown_recipe_setting_suggests_the_right_one(tmp_path):
    with pytest.raises(AtlasError, match=r"unknown recipe setting 'stepz'.*did you mean: steps"):
        build(tmp_path, 'model = "m"\nout = "o"\n[recipe]\nstepz = 3\n')


def test_unknown_recipe_name(tmp_path):
    with pytest.raises(AtlasError, match=r"unknown recipe 'fourrier'.*did you mean: fourier"):
        build(tmp_path, 'model = "m"\nout = "o"\n[recipe]\nname = "fourrier"\n')


def test_bad_recipe_value_type(tmp_path):
    with pytest.raises(AtlasError, match="bad recipe setting"):
        build(tmp_path, 'model = "m"\nout = "o"\n[recipe]\nsteps = "many"\n')


def test_invalid_toml(tmp_path):
    with pytest.raises(AtlasError, match="is not valid TOML"):
        build(tmp_path, 'model = "m"\nout = \n')


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(AtlasError, match=f"config file {missing} does not exist"):
        config_module.build(str(missing))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('samples = "x"', "samples must be int"),
        ("seed = 1.5", "seed must be int"),
        ('batch = "auto"', "batch must be int"),
        ("weights = 5", "weights must be str"),
        ("layers = 5", "layers must be a list"),
        ('scheduler = ["inline"]', "scheduler must be str"),
        ("samples = 0", "samples must be at least 1"),
        ("batch = -1", "batch must be 0"),
        ("seed = -2", "seed must be 0 or more"),
    ],
)
def test_wrong_types_and_values(tmp_path, line, message):
    with pytest.raises(AtlasError, match=message):
        build(tmp_path, f'model = "m"\nout = "o"\n{line}\n')


def test_missing_model(tmp_path):
    with pytest.raises(AtlasError, match="no model given"):
        build(tmp_path, 'out = "o"\n')
    with pytest.raises(AtlasError, match="no model given"):
        build(out="o")


def test_missing_out(tmp_path):
    with pytest.raises(AtlasError, match="no output folder given"):
        build(tmp_path, 'model = "m"\n')
    with pytest.raises(AtlasError, match="no output folder given"):
        build(model="m")


def test_boolean_samples_are_refused(tmp_path):
    with pytest.raises(AtlasError, match="samples must be int"):
        build(tmp_path, 'model = "m"\nout = "o"\nsamples = true\n')


@pytest.mark.parametrize("line", ['channels_per_layer = "0-3"', "recipe = 3"])
def test_non_table_sections_are_refused_cleanly(tmp_path, line):
    with pytest.raises(AtlasError):
        build(tmp_path, f'model = "m"\nout = "o"\n{line}\n')


# --- [recipe] values from TOML, colour_from ------------------------------------------------------

OCTAVE_TOML = """\
model = "m"
out = "o"
[recipe]
name = "octaves"
lr = 1
scale = [0.9, 1]
octaves = [
  { share = 1, scale = 0.5, lr = [0.1, 0.05] },
  { share = 2, scale = 1, lr = [0.05, 0.01], blur = [1, 0] },
]
"""


def test_toml_arrays_and_tables_become_the_recipes_own_types(tmp_path):
    recipe = build(tmp_path, OCTAVE_TOML).recipe
    octaves = (
        Octave(share=1.0, scale=0.5, lr=(0.1, 0.05)),
        Octave(share=2.0, scale=1.0, lr=(0.05, 0.01), blur=(1.0, 0.0)),
    )
    expected = get("octaves", lr=1.0, scale=(0.9, 1.0), octaves=octaves)
    assert recipe == expected
    assert recipe.hash == expected.hash  # `lr = 1` and `lr = 1.0` are one recipe
    assert hash(recipe) == hash(expected)
    assert [(stage.steps, stage.size) for stage in recipe.stages()] == [(171, 64), (341, 128)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("octaves = [{ share = 1, scal = 1, lr = [1, 1] }]", "octaves[0] has no setting 'scal'"),
        ("octaves = [{ share = 1, scale = 1 }]", "octaves[0] needs lr"),
        ("octaves = [{ share = 1, scale = 1, lr = [1] }]", "octaves[0].lr must be a list of 2"),
        ("octaves = [{ share = 1, scale = 'big', lr = [1, 1] }]", "scale must be a number"),
        ("octaves = 3", "octaves must be a list of tables"),
        ("scale = [1, 2, 3]", "scale must be a list of 2 numbers"),
        ("steps = 1.5", "steps must be an integer"),
        ("steps = true", "steps must be an integer"),
        ("diversity_layer = 3", "diversity_layer must be a string"),
        ("name = 3", "the recipe name must be a preset name"),
    ],
)
def test_bad_recipe_values_are_one_clear_error(tmp_path, line, message):
    with pytest.raises(AtlasError, match=re.escape(message)):
        build(tmp_path, f'model = "m"\nout = "o"\n[recipe]\n{line}\n')


def photos(folder, tint, count=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        rgb = rng.random((16, 16, 1)) * np.array(tint) + 0.1 * rng.random((16, 16, 3))
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def test_colour_from_becomes_the_recipes_colour_matrix_keyed_by_the_images(tmp_path):
    warm = photos(tmp_path / "warm", (0.9, 0.6, 0.3))
    same = shutil.copytree(warm, tmp_path / "elsewhere")
    cold = photos(tmp_path / "cold", (0.2, 0.5, 0.9))
    from_toml = build(tmp_path, f'model = "m"\nout = "o"\ncolour_from = "{warm}"\n').recipe
    assert from_toml.colour == colour_matrix_from_folder(warm)
    hashes = [build(model="m", out="o", colour_from=str(f)).recipe.hash for f in (same, cold)]
    assert from_toml.hash == hashes[0] != hashes[1]  # the path is not in the key
    # a --colour-from flag wins over the file's colour_from
    flagged = build(tmp_path, f'model = "m"\nout = "o"\ncolour_from = "{warm}"\n', colour_from=cold)
    assert flagged.recipe.hash == hashes[1]


def test_colour_from_errors(tmp_path):
    warm = photos(tmp_path / "warm", (0.9, 0.6, 0.3))
    both = f'model = "m"\nout = "o"\ncolour_from = "{warm}"\n[recipe]\ncolour = "none"\n'
    with pytest.raises(AtlasError, match="sets both colour_from and \\[recipe\\] colour"):
        build(tmp_path, both)
    with pytest.raises(AtlasError, match="colour_from folder .*nowhere does not exist"):
        build(model="m", out="o", colour_from=str(tmp_path / "nowhere"))
    with pytest.raises(AtlasError, match="colour_from must be str"):
        build(tmp_path, 'model = "m"\nout = "o"\ncolour_from = 3\n')


def test_load_recipe_reads_only_the_recipe_but_checks_every_setting(tmp_path):
    path = write(tmp_path, TOML)
    assert config_module.load_recipe(None) == get(DEFAULT)
    assert config_module.load_recipe(None, "plain", steps=4) == get("plain", steps=4)
    assert config_module.load_recipe(path) == get("plain", steps=17, size=40)
    assert config_module.load_recipe(path, "fourier", steps=3, lr=None) == get(
        "fourier", steps=3, size=40
    )
    with pytest.raises(AtlasError, match="unknown setting 'layerz'"):
        config_module.load_recipe(write(tmp_path, TOML.replace("layers", "layerz")))


# --- parse_indices ----------------------------------------------------------------------------

LABELS = ("hen", "Pelican", "espresso", "castle", "hen harrier")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(10))),
        (" ALL ", list(range(10))),
        ("0-3", [0, 1, 2, 3]),
        ("3,5,9", [3, 5, 9]),
        ("0-2,7", [0, 1, 2, 7]),
        (" 9 , 0-1 ,1 ", [0, 1, 9]),  # sorted, deduplicated, spaces ignored
        ("4-4", [4]),
        ("", []),
        ("0-9", list(range(10))),
    ],
)
def test_parse_indices(spec, expected):
    assert parse_indices(spec, 10, "channel") == expected


def test_parse_labels():
    assert parse_indices("hen", 5, "class", LABELS) == [0]
    assert parse_indices("pelican,CASTLE", 5, "class", LABELS) == [1, 3]
    assert parse_indices("hen harrier,0-1", 5, "class", LABELS) == [0, 1, 4]
    assert parse_indices("2", 5, "class", LABELS) == [2]  # numbers stay numbers


def test_parse_out_of_range():
    with pytest.raises(AtlasError) as error:
        parse_indices("3,12", 12, "channel")
    assert str(error.value) == "channel 12 is out of range: there are 12 (channel 0-11)"
    with pytest.raises(AtlasError, match="channel 20 is out of range: there are 12"):
        parse_indices("10-20", 12, "channel")


def test_parse_backwards_range():
    with pytest.raises(AtlasError) as error:
        parse_indices("5-3", 10, "channel")
    assert str(error.value) == "channel range 5-3 is backwards"


def test_parse_unknown_label_suggests_close_ones():
    with pytest.raises(AtlasError) as error:
        parse_indices("pelikan", 5, "class", LABELS)
    assert str(error.value).startswith("no class named 'pelikan'")
    assert "did you mean: Pelican" in str(error.value)


@pytest.mark.parametrize("spec", ["hen", "-1", "1-", "0-3x", "3;5"])
def test_parse_garbage_without_labels(spec):
    with pytest.raises(AtlasError, match="channels must be 'all', ranges like 0-63"):
        parse_indices(spec, 10, "channel")


# --- make_plan --------------------------------------------------------------------------------


def test_units_per_layer_and_logits_with_labels(model):
    plan = make_plan(plan_config(layers=("conv2", "conv3"), channels="0-3", classes="1,0"), model)
    assert [(u.layer, u.index) for u in plan.units] == [
        *[("conv2", i) for i in range(4)],
        *[("conv3", i) for i in range(4)],
        ("logits", 0),
        ("logits", 1),
    ]
    assert plan.units_per_layer() == {"conv2": 4, "conv3": 4, "logits": 2}
    assert [layer.name for layer in plan.layers] == ["conv2", "conv3", "logits"]
    assert [u.label for u in plan.units if u.layer == "logits"] == ["class0", "class1"]
    assert all(u.label is None for u in plan.units if u.layer != "logits")
    assert {u.kind for u in plan.units} == {"channel", "logit"}
    assert plan.units[-1].id == "logits:1"
    assert plan.digest == model.digest
    assert plan.spec == model.spec


def test_all_channels_and_classes_by_label(model):
    plan = make_plan(plan_config(layers=("conv1",), classes="class9,class3"), model)
    assert plan.units_per_layer() == {"conv1": 8, "logits": 2}
    assert [(u.index, u.label) for u in plan.units if u.layer == "logits"] == [
        (3, "class3"),
        (9, "class9"),
    ]


def test_channels_per_layer(model):
    config = plan_config(
        layers=("conv1", "conv3"), channels="0", channels_per_layer=(("conv3", "10-15"),)
    )
    plan = make_plan(dataclasses.replace(config, classes=""), model)
    assert [(u.layer, u.index) for u in plan.units] == [("conv1", 0)] + [
        ("conv3", i) for i in range(10, 16)
    ]


def test_no_classes_means_no_logits(model):
    plan = make_plan(plan_config(layers=("conv2",), classes=""), model)
    assert "logits" not in plan.units_per_layer()
    assert [layer.name for layer in plan.layers] == ["conv2"]


def test_default_layers_when_none_are_chosen(model):
    assert default_layer_patterns(model) == ("relu1", "relu2", "conv3")
    plan = make_plan(plan_config(), model)
    assert plan.units_per_layer() == {"relu1": 8, "relu2": 12, "conv3": 16, "logits": 10}


def test_model_default_layers_win(model):
    custom = dataclasses.replace(model, default_layers=("conv3", "pool"))
    custom.layers = model.layers  # no second dry run
    plan = make_plan(plan_config(classes=""), custom)
    assert plan.units_per_layer() == {"conv3": 16, "pool": 16}


def test_glob_star_stays_within_a_name_part(model):
    conv = make_plan(plan_config(layers=("conv*",), channels="0", classes=""), model)
    assert [layer.name for layer in conv.layers] == ["conv1", "conv2", "conv3"]
    children = make_plan(plan_config(layers=("pool.*",), channels="0", classes=""), model)
    assert [layer.name for layer in children.layers] == ["pool.0", "pool.1"]
    parent = make_plan(plan_config(layers=("pool",), channels="0", classes=""), model)
    assert [layer.name for layer in parent.layers] == ["pool"]
    relu = make_plan(plan_config(layers=("relu?", "fc"), channels="0", classes=""), model)
    assert [layer.name for layer in relu.layers] == ["relu1", "relu2", "fc"]


def test_layers_come_in_model_order_whatever_the_pattern_order(model):
    plan = make_plan(plan_config(layers=("conv3", "conv1"), channels="0", classes=""), model)
    assert [u.layer for u in plan.units] == ["conv1", "conv3"]


def test_unknown_layer_and_unmatched_glob(model):
    with pytest.raises(AtlasError, match=r"no layer 'conv4'.*did you mean"):
        make_plan(plan_config(layers=("conv4",)), model)
    with pytest.raises(AtlasError, match=r"no layer of tiny matches 'block\*'"):
        make_plan(plan_config(layers=("block*",)), model)


def test_out_of_range_channel_and_class(model):
    with pytest.raises(AtlasError, match="channel 12 is out of range: conv2 has 12"):
        make_plan(plan_config(layers=("conv2",), channels="0-12"), model)
    with pytest.raises(AtlasError, match="class 10 is out of range: tiny has 10"):
        make_plan(plan_config(layers=("conv2",), classes="10"), model)
    with pytest.raises(AtlasError, match="no class named 'hen'"):
        make_plan(plan_config(layers=("conv2",), classes="hen"), model)


def test_empty_plan(model):
    with pytest.raises(AtlasError, match="the plan is empty"):
        make_plan(plan_config(layers=("logits",), classes=""), model)
    with pytest.raises(AtlasError, match="the plan is empty"):
        make_plan(plan_config(layers=("conv2",), channels="", classes=""), model)


# --- unit keys --------------------------------------------------------------------------------

BASE = {"layers": ("conv2",), "channels": "0-3", "classes": "0-1", "seed": 1, "samples": 1}


def test_keys_are_deterministic_and_distinct(model):
    first = keys(make_plan(plan_config(**BASE), model))
    second = keys(make_plan(plan_config(**BASE), tiny_model()))  # a fresh load of equal weights
    assert first == second
    assert len(set(first.values())) == len(first) == 6  # layer and index are part of the key
    assert all(len(key) == 64 and int(key, 16) >= 0 for key in first.values())


def test_key_follows_unit_key_fields(model):
    recipe = get(DEFAULT, steps=3)
    key = unit_key(model.identity, "conv2", 3, recipe, 1, 1)
    assert keys(make_plan(plan_config(**BASE), model))[("conv2", 3)] == key
    variants = [
        unit_key("another digest", "conv2", 3, recipe, 1, 1),
        unit_key(model.identity, "relu2", 3, recipe, 1, 1),
        unit_key(model.identity, "conv2", 4, recipe, 1, 1),
        unit_key(model.identity, "conv2", 3, recipe.replace(lr=0.1), 1, 1),
        unit_key(model.identity, "conv2", 3, recipe, 2, 1),
        unit_key(model.identity, "conv2", 3, recipe, 1, 2),
        unit_key(model.identity, "conv2", 3, recipe, 1, 1, timelapse=4),
        unit_key(model.identity, "conv2", 3, recipe, 1, 1, inputs="conv1"),  # its circuit's layer
    ]
    assert len({key, *variants}) == 9
    assert ENGINE_VERSION  # part of every key: bumping it changes them all


@pytest.mark.parametrize(
    "change",
    [
        {"recipe": get(DEFAULT, steps=4)},
        {"recipe": get("plain", steps=3)},
        {"seed": 2},
        {"samples": 2},
    ],
    ids=["steps", "preset", "seed", "samples"],
)
def test_every_key_changes_with_recipe_seed_and_samples(model, change):
    before = keys(make_plan(plan_config(**BASE), model))
    after = keys(make_plan(plan_config(**{**BASE, **change}), model))
    assert before.keys() == after.keys()
    assert all(before[unit] != after[unit] for unit in before)


def test_keys_ignore_what_does_not_change_images(model):
    before = keys(make_plan(plan_config(**BASE), model))
    renamed = get(DEFAULT, steps=3)
    renamed = dataclasses.replace(renamed, name="my-own-name")
    unaffected = plan_config(
        **{**BASE, "channels": "0-5", "classes": "0-2"},
        recipe=renamed,
        batch=5,
        scheduler="inline",
        out="elsewhere",
        force=True,
    )
    after = keys(make_plan(unaffected, model))
    assert len(after) == 9
    assert all(after[unit] == before[unit] for unit in before)  # the shared units kept theirs


def test_keys_change_with_the_weights(model):
    changed = tiny_model()
    with torch.no_grad():
        changed.module.conv3.bias[0] += 1.0  # a layer after conv2: still every key changes
    changed.digest = state_digest(changed.module)
    assert changed.digest != model.digest
    before = keys(make_plan(plan_config(**BASE), model))
    after = keys(make_plan(plan_config(**BASE), changed))
    assert before.keys() == after.keys()
    assert all(before[unit] != after[unit] for unit in before)


# --- make_tasks -------------------------------------------------------------------------------


def task_shape(tasks):
    return [(task.layer, [unit.index for unit in task.units]) for task in tasks]


def test_tasks_batch_per_layer_with_explicit_batch(model):
    plan = make_plan(plan_config(layers=("conv2", "conv3"), channels="0-4", batch=2), model)
    tasks = make_tasks(plan, list(plan.units), "cpu")
    assert task_shape(tasks) == [
        ("conv2", [0, 1]),
        ("conv2", [2, 3]),
        ("conv2", [4]),
        ("conv3", [0, 1]),
        ("conv3", [2, 3]),
        ("conv3", [4]),
        ("logits", [0, 1]),
        ("logits", [2, 3]),
        ("logits", [4, 5]),
        ("logits", [6, 7]),
        ("logits", [8, 9]),
    ]
    for task in tasks:
        assert {unit.layer for unit in task.units} == {task.layer}
        assert task.recipe == plan.config.recipe
        assert (task.samples, task.seed) == (1, 0)


def test_automatic_batch_on_cpu_and_cuda(model):
    plan = make_plan(plan_config(layers=("conv3",), classes=""), model)
    assert [len(t.units) for t in make_tasks(plan, list(plan.units), "cpu")] == [4, 4, 4, 4]
    assert [len(t.units) for t in make_tasks(plan, list(plan.units), "cuda")] == [16]


@pytest.mark.parametrize(
    ("batch", "samples", "sizes"),
    [
        (6, 2, [3, 3, 3, 3]),  # 6 images per task: 3 units of 2 images
        (6, 4, [1] * 12),  # 6 // 4 = 1
        (6, 12, [1] * 12),  # never 0
        (0, 3, [1] * 12),  # cpu default 4 // 3
        (5, 1, [5, 5, 2]),
    ],
)
def test_batch_is_divided_by_samples(model, batch, samples, sizes):
    config = plan_config(layers=("conv2",), classes="", batch=batch, samples=samples)
    plan = make_plan(config, model)
    tasks = make_tasks(plan, list(plan.units), "cpu")
    assert [len(task.units) for task in tasks] == sizes
    assert all(task.samples == samples for task in tasks)
    assert [u.index for task in tasks for u in task.units] == list(range(12))


def test_tasks_never_mix_layers_even_for_shuffled_todo(model):
    plan = make_plan(plan_config(layers=("conv*",), channels="0-5", batch=4), model)
    todo = [u for u in plan.units if u.index % 2 == 0 or u.layer == "conv3"]
    random.Random(0).shuffle(todo)
    tasks = make_tasks(plan, todo, "cpu")
    for task in tasks:
        assert {unit.layer for unit in task.units} == {task.layer}
        assert 1 <= len(task.units) <= 4
    ids = sorted(u.id for task in tasks for u in task.units)
    assert ids == sorted(u.id for u in todo)  # each unit exactly once
    layers = [task.layer for task in tasks]
    assert sorted(set(layers)) == ["conv1", "conv2", "conv3", "logits"]
    assert layers == sorted(layers, key=layers.index)  # each layer's tasks are together


def test_only_the_given_units_become_tasks(model):
    plan = make_plan(plan_config(layers=("conv2",), channels="0-3", classes="0"), model)
    todo = [plan.units[1], plan.units[3]]
    assert task_shape(make_tasks(plan, todo, "cpu")) == [("conv2", [1, 3])]
    assert make_tasks(plan, [], "cpu") == []


def test_task_key_is_stable(model):
    config = plan_config(layers=("conv2",), channels="0-7", classes="", batch=4)
    plan = make_plan(config, model)
    first = make_tasks(plan, list(plan.units), "cpu")
    again = make_plan(config, tiny_model())
    second = make_tasks(again, list(again.units), "cpu")
    assert [t.key for t in first] == [t.key for t in second]
    assert len({t.key for t in first}) == 2
    assert all(len(t.key) == 64 for t in first)
    # the key is over the units' keys: other units or another recipe give another key
    reordered = Task("conv2", first[0].units[::-1], config.recipe, 1, 0)
    assert reordered.key != first[0].key
    other = make_plan(dataclasses.replace(config, seed=3), model)
    assert make_tasks(other, list(other.units), "cpu")[0].key != first[0].key


def test_octave_steps_always_add_up_and_the_last_octave_always_runs():
    octaves = tuple(Octave(1.0, 0.1 + k * 0.045, (0.05, 0.05)) for k in range(21))
    few = get("octaves", steps=11, octaves=octaves).stages()
    assert sum(stage.steps for stage in few) == 11
    assert few[-1].size == round(128 * octaves[-1].scale)  # the largest octave is reached
    # where rounding each octave already worked, the split is what it always was
    assert [stage.steps for stage in get("octaves", steps=512).stages()] == [171, 171, 170]


@pytest.mark.parametrize("octave_count", [1, 2, 3, 5, 21])
def test_the_stages_of_any_recipe_add_up_to_its_steps(octave_count):
    octaves = tuple(Octave(1.0 + k % 3, 0.5 + k / 50, (0.05, 0.05)) for k in range(octave_count))
    for steps in range(1, 60):
        stages = get("octaves", steps=steps, octaves=octaves).stages()
        assert sum(stage.steps for stage in stages) == steps
        assert stages[-1].size == round(128 * octaves[-1].scale)  # the last octave always runs


@pytest.mark.parametrize(
    ("toml", "flags", "expected"),
    [
        ("", {}, DEFAULT_DIVERSITY),  # K images of a unit should differ
        ("[recipe]\ndiversity = 0\n", {}, 0.0),  # said explicitly: kept
        ("[recipe]\ndiversity = 2.5\n", {}, 2.5),
        ("samples = 1\n", {"samples": None}, 0.0),  # one image: nothing to differ from
        ("samples = 3\n", {"samples": None}, DEFAULT_DIVERSITY),
        ("", {"recipe_overrides": {"diversity": 0.0}}, 0.0),
    ],
    ids=["default", "explicit-zero", "explicit", "toml-one", "toml-three", "flag-zero"],
)
def test_samples_get_a_diversity_unless_one_is_set(tmp_path, toml, flags, expected):
    path = tmp_path / "atlas.toml"
    path.write_text(f'model = "tinymodels:tiny"\nout = "out"\n{toml}')
    built = config_module.build(str(path), **{"samples": 2, **flags})
    assert built.recipe.diversity == expected
    given = flags.get("recipe_overrides", {}).get("diversity")
    samples = flags.get("samples", 2) or built.samples
    recipe = config_module.load_recipe(str(path), diversity=given, samples=samples)
    assert recipe.diversity == expected  # atlas visualize reads it the same way


def test_a_name_cut_short_suggests_the_names_it_begins_first():
    from atlas.errors import did_you_mean

    names = ["gcvit_small", "davit_small", "vit_small_patch16_224", "vit_base_patch16_224"]
    assert did_you_mean("vit_smal", names, limit=2) == (
        " (did you mean: vit_small_patch16_224, gcvit_small?)"
    )
    assert did_you_mean("zzz", names) == ""
