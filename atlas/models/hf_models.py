"""Hugging Face transformers image classifiers: `hf:ORG/NAME` (from the local Hugging Face
cache) or `hf:FOLDER` (a folder holding config.json, and the weights unless they are random),
built by `AutoModelForImageClassification`.

Preprocessing is the model's image processor's (preprocessor_config.json): image_mean,
image_std, the size it feeds the model, its resample filter and centre crop; a model without
one is read with ImageNet's mean and std at its config's image_size, and `atlas layers` says
so. Class names are the config's `id2label` (unless they are only LABEL_0, LABEL_1, ...).
The model returns an ImageClassifierOutput; a hook on it hands its logits on as the output, so
`logits` is a layer like any model's. atlas never downloads (as with HF_HUB_OFFLINE=1). An
optional extra: `pip install 'atlas[hf]'`.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from atlas.errors import AtlasError, describe
from atlas.models.loaded import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, seeded_init
from atlas.models.plain import wrap
from atlas.models.registry import installed, optional, prefixed, register_source
from atlas.models.weights import RANDOM, apply_weights, names_a_file

PREFIX = "hf:"
# PIL's resample numbers: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def _describe() -> list[str]:
    return [
        f"hf:ORG/NAME, hf:FOLDER  a Hugging Face image classifier "
        f"({installed('transformers', 'hf')}), read with its image processor; from the local "
        "Hugging Face cache or a folder with config.json, --weights FILE or random"
    ]


def _logits(_module: nn.Module, _inputs: tuple, output) -> object:
    """A forward hook: the classifier's output object -> its logits tensor."""
    return getattr(output, "logits", output)


def _not_here(spec: str, name: str, error: Exception) -> AtlasError:
    """A folder without what it needs, or a name the local cache lacks: one line."""
    if Path(name).is_dir():
        return AtlasError(f"{spec}: {describe(error)}")
    return AtlasError(
        f"{spec} is not in the local Hugging Face cache and atlas does not download: on a "
        f"networked machine run `hf download {name}` and copy the Hugging Face cache here, or "
        "give a folder with its config.json (hf:path/to/folder) and --weights random"
    )


def _field(settings: object, key: str) -> object:
    """A key of an image processor's size dict (a dict or transformers' SizeDict)."""
    if isinstance(settings, dict):
        return settings.get(key)
    return getattr(settings, key, None)


def processor_settings(processor: object, config: object) -> tuple[dict, str]:
    """(`wrap` keywords, where they came from) for an image processor (None: none found)."""
    size = getattr(config, "image_size", 224)
    if processor is None:
        settings = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": size}
        return settings, f"no image processor found: ImageNet mean/std at {size} px"
    normalizes = getattr(processor, "do_normalize", True)
    mean = getattr(processor, "image_mean", None) if normalizes else (0.0,)
    std = getattr(processor, "image_std", None) if normalizes else (1.0,)
    settings = {"mean": mean or IMAGENET_MEAN, "std": std or IMAGENET_STD}
    resized, cropped = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    crop = 1.0
    if getattr(processor, "do_center_crop", False) and _field(cropped, "height"):
        input_size = (_field(cropped, "height"), _field(cropped, "width"))
        if edge := _field(resized, "shortest_edge") or _field(resized, "height"):
            crop = min(1.0, min(input_size) / edge)
    elif _field(resized, "height"):
        input_size = (_field(resized, "height"), _field(resized, "width"))
    elif shortest := _field(resized, "shortest_edge"):
        input_size = (shortest, shortest)
        pct = getattr(processor, "crop_pct", None)
        crop = pct if pct and shortest < 384 else 1.0  # ConvNeXt's processor, below 384 px
    else:
        input_size = (size, size)
    settings["input_size"] = tuple(int(n) for n in input_size)
    settings["crop"] = float(crop)
    settings["resize"] = resize_mode(getattr(processor, "resample", None))
    return settings, f"its image processor ({type(processor).__name__})"


def resize_mode(resample: object) -> str:
    """PIL's resample number (or an interpolation enum named like one) as a resize mode."""
    try:
        return RESAMPLE.get(int(resample), "bilinear")
    except (TypeError, ValueError):
        name = str(getattr(resample, "value", resample)).lower()
        return name if name in RESAMPLE.values() else "bilinear"


def _name_the_architecture(config: object) -> None:
    """A config written from scratch names no architecture; where its model type has more than
    one classifier (DeiT: with and without its distillation head), transformers then fails to
    choose: take the first, the plain classifier."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as CLASSIFIERS,
    )

    named = CLASSIFIERS.get(getattr(config, "model_type", None))
    if not getattr(config, "architectures", None) and isinstance(named, tuple | list):
        config.architectures = [named[0]]


def _labels(config: object) -> tuple[str, ...] | None:
    id2label = getattr(config, "id2label", None) or {}
    labels = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    if not labels or all(re.fullmatch(r"LABEL_\d+", label) for label in labels):
        return None
    return labels


@register_source("hf", accepts=prefixed(PREFIX), describe=_describe, rank=21)
def load(spec: str, weights: str | None) -> LoadedModel:
    """`hf:ORG/NAME` or `hf:FOLDER` with its own weights, a state-dict file or random ones."""
    transformers = optional("transformers", "hf", "Hugging Face models")
    name = spec.removeprefix(PREFIX)
    if weights and weights != RANDOM and not names_a_file(weights):
        raise AtlasError(
            f"{spec} takes --weights random or a state-dict file (its own weights are the "
            f"default), not {weights!r}"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _not_here(spec, name, error) from error
    auto = transformers.AutoModelForImageClassification
    _name_the_architecture(config)
    try:
        if weights:  # random, or a state-dict file loaded into the random build
            with seeded_init():
                module = auto.from_config(config)
            if weights != RANDOM:
                apply_weights(module, weights, spec)
        else:
            module = auto.from_pretrained(name, local_files_only=True)
    except ValueError as error:  # the config of a model that classifies no images
        raise AtlasError(f"{spec} is no image classifier: {describe(error)}") from error
    except OSError as error:
        raise _not_here(spec, name, error) from error
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        processor = None
    settings, origin = processor_settings(processor, config)
    module.register_forward_hook(_logits)
    channels = getattr(config, "num_channels", None)
    loaded = wrap(module, spec=spec, labels=_labels(config), channels=channels, **settings)
    loaded.weights = weights or name
    loaded.preprocessing_from = origin
    return loaded
