"""--variants: the centre neuron's image and the negative of each unit, and a whole-layer
image per layer, stored with the unit and part of its key only when asked for."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tinymodels import tiny_model

from atlas.activations import model_inputs
from atlas.cli import cli
from atlas.layers import capture, run_forward
from atlas.site import render
from atlas.store import Store

ARGS = ["run", "tinymodels:tiny", "--layers", "conv2", "--channels", "0-2", "--classes", "0-1"]
ARGS += ["--steps", "12", "--size", "32", "--scheduler", "inline"]


def run(out, *extra):
    result = CliRunner().invoke(cli, [*ARGS, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def channel_mean(out, path, index):
    model = tiny_model()
    with Image.open(out / path) as image:
        pixels = np.array(image.convert("RGB"))
    with torch.no_grad(), capture(model, ["conv2"]) as acts:
        run_forward(model.module, model_inputs(model, [pixels], torch.device("cpu")))
    return float(acts["conv2"][0, index].mean())


def test_variants_are_stored_with_each_unit_and_a_layer_image_per_layer(tmp_path):
    run(tmp_path, "--variants", "neuron,negative", "--variants", "layer")
    records = {record.id: record for record in Store(tmp_path).records()}
    assert set(records["conv2:1"].variants) == {"neuron", "negative"}
    assert set(records["logits:0"].variants) == {"negative"}  # a logit has no map: no neuron
    whole = records["conv2"]
    assert (
        whole.kind == "layer"
        and whole.index is None
        and whole.images == ("units/conv2/layer.webp",)
    )
    assert "logits" not in records  # no whole-layer image of the logits
    for name, path in records["conv2:1"].variants.items():
        assert path == f"units/conv2/1.{name}.webp" and (tmp_path / path).is_file()
    page = (tmp_path / "site/conv2/1.html").read_text()
    assert 'src="img/1.negative.webp"' in page and 'src="img/1.neuron.webp"' in page
    layer_page = (tmp_path / "site/conv2/index.html").read_text()
    assert 'src="img/layer.webp"' in layer_page and not (tmp_path / "site/conv2/None.html").exists()
    render(tmp_path)  # a rerender keeps every linked file
    assert (tmp_path / "site/conv2/img/layer.webp").is_file()
    assert (tmp_path / "site/conv2/img/1.negative.webp").is_file()
    main = channel_mean(tmp_path, records["conv2:1"].images[0], 1)
    negative = channel_mean(tmp_path, records["conv2:1"].variants["negative"], 1)
    assert negative < main  # what turns the unit off


def test_variants_join_the_key_only_when_asked_for(tmp_path):
    run(tmp_path)
    plain = {r.id: r.key for r in Store(tmp_path).records()}
    assert "8 done" not in run(tmp_path).output  # unchanged: nothing to do
    with_variants = run(tmp_path, "--variants", "negative")
    assert "5 done, 0 failed, 0 already stored" in with_variants.output
    assert all(r.key != plain[r.id] for r in Store(tmp_path).records())
    back = run(tmp_path)
    assert "5 done, 0 failed, 0 already stored" in back.output
    assert {r.id: r.key for r in Store(tmp_path).records()} == plain
    assert all(r.variants == {} for r in Store(tmp_path).records())
    assert not list(tmp_path.glob("units/*/*.negative.webp"))  # the old variant files went


@pytest.mark.parametrize(("flag", "message"), [("sideways", "unknown variant 'sideways'")])
def test_unknown_variants_are_bad_input(tmp_path, flag, message):
    result = CliRunner().invoke(cli, [*ARGS, "--out", str(tmp_path), "--variants", flag])
    assert result.exit_code == 2 and message in result.output
