"""The real EfficientNet-Lite0: class visualizations it recognizes."""

import pytest
import torch

from atlas import models
from atlas.optim import get, logit, visualize

pytestmark = pytest.mark.integration

CLASSES = {8: "hen", 144: "pelican", 967: "espresso", 483: "castle"}


@pytest.fixture(scope="module")
def lite0():
    return models.load("efficientnet_lite0")


def classify(model, images):
    x = torch.stack([torch.tensor(i).permute(2, 0, 1).float() / 255 for i in images])
    x = torch.nn.functional.interpolate(x, size=model.input_size, mode="bilinear", antialias=True)
    with torch.no_grad():
        return model.module(model.normalize(x)).softmax(1)


def test_fourier_recipe_draws_classes_that_lite0_recognizes(lite0):
    recipe = get("fourier", steps=128)
    results = visualize(lite0, [logit(c) for c in CLASSES], recipe, seed=0)
    probabilities = classify(lite0, [r.image for r in results])
    assert probabilities.argmax(1).tolist() == list(CLASSES)
    assert [lite0.labels[c].lower() for c in CLASSES] == list(CLASSES.values())
    for result in results:
        assert result.objective_best > result.objective_start + 10
