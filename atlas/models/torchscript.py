"""A TorchScript file: a whole model without its code. Hooks cannot reach inside it, so only
its logits can be visualized."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from atlas.errors import AtlasError, describe
from atlas.models.loaded import IMAGENET_MEAN, IMAGENET_STD, InputNormalization, LoadedModel
from atlas.models.registry import register_source
from atlas.models.weights import pickled_class

SUFFIXES = {".pt", ".pth", ".ts", ".torchscript"}


def _is_model_file(spec: str) -> bool:
    return Path(spec).suffix in SUFFIXES or Path(spec).is_file()


def _describe() -> list[str]:
    return [
        "FILE.pt                 a TorchScript file (its logits only), ImageNet mean/std, 224 px"
    ]


@register_source("torchscript", accepts=_is_model_file, describe=_describe, rank=40)
def load(spec: str, weights: str | None) -> LoadedModel:
    path = Path(spec)
    if not path.is_file():
        raise AtlasError(f"model file {spec} does not exist")
    try:
        with warnings.catch_warnings():  # torch deprecates jit.load loudly; it still works
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        if model_class := pickled_class(path):
            raise AtlasError(
                f"{path} holds a whole pickled model ({model_class}), which atlas does not "
                "unpickle (that can run code): save its state dict, "
                "torch.save(model.state_dict(), path), and pass it with --weights to the "
                "architecture's name, or return the model from a package.module:factory"
            ) from error
        raise AtlasError(
            f"{path} is not a TorchScript file ({describe(error).split('. ')[0]}); for a "
            "state dict, name the architecture as the model and pass this file with --weights"
        ) from error
    return LoadedModel(
        spec=str(path),
        module=module,
        normalize=InputNormalization.mean_std(IMAGENET_MEAN, IMAGENET_STD),
        weights=str(path),
        hookable=False,
        preprocessing_from="atlas's defaults: ImageNet mean/std at 224 px",
    ).keep_keys()
