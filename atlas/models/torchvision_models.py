"""torchvision classification models by name, built by torchvision's own builder.

Named weights go through `torchvision.models.get_model(name, weights=member)`, so every
setting the builder makes when it is given weights is torchvision's: GoogLeNet's and
InceptionV3's `transform_input` and aux-logit handling, the number of classes, ViT's image
size. Built with `weights=None` and loaded afterwards, GoogLeNet's first conv sees other input
(max abs difference 0.53 in one check). Weights are never downloaded: atlas reads the file
(from the local hub cache, or a state-dict file) with `weights_only=True`, unwrapped as every
state-dict file is, and hands it to the builder in place of the builder's own download.

A state-dict file is built the same way, as torchvision builds the pretrained model named like
the file (else the default one), since most checkpoints are fine-tuned from those (a
fine-tuned GoogLeNet, which lost the aux heads that build drops, included); one that does not
fit that build (a checkpoint of 10 classes) loads into a `weights=None` build with the file's
number of classes. So GoogLeNet and InceptionV3 files are read with `transform_input=True`,
as torchvision's pretrained ones are, even when trained from scratch: their keys cannot tell.
`--weights random` keeps the builder's initialization (seeded: every process builds the same
weights), with the input size and class names of the model's default weights.

Images are read with the weights' mean, std and crop size, resized bilinearly from the whole
image, as atlas read them before preprocessing was part of unit keys (their torchvision
transforms resize some models bicubically, after a centre crop): so the atlases of torchvision
models keep their keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputNormalization,
    LoadedModel,
    seeded_init,
)
from atlas.models.registry import register_source
from atlas.models.weights import RANDOM, apply_state, load_state_dict_file, names_a_file


def names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _weights_member(name: str, weights: str | None):
    """The torchvision weights enum member named by `weights` (None: the model's default)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member_name = (weights or "DEFAULT").split(".")[-1]
    try:
        return enum[member_name] if member_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = [m.name for m in enum]
        raise AtlasError(
            f"{name} has no weights {weights!r}; choose one of {', '.join(choices)}, "
            "a state-dict file, or 'random'"
        ) from None


def _file_name(member) -> str:
    return Path(member.url).name


def _member_for_file(name: str, path: Path):
    """The weights member whose published file has this file's name, or None."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    return next((m for m in enum if _file_name(m) == path.name), None)


@contextmanager
def _serving(member, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """torchvision's builder, given `member`, takes `state` (already read safely) instead of
    reading the weights' file itself (which it does without `weights_only`)."""
    enum = type(member)
    own = enum.__dict__.get("get_state_dict")
    enum.get_state_dict = lambda _self, *_args, **_kwargs: state
    try:
        yield
    finally:
        if own is None:
            del enum.get_state_dict
        else:
            enum.get_state_dict = own


def _build_with(name: str, member, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """torchvision's builder given `member` and these weights; None when they do not fit it."""
    import torchvision

    try:
        with _serving(member, state):
            return torchvision.models.get_model(name, weights=member)
    except RuntimeError:  # load_state_dict: missing, unexpected or reshaped tensors
        return None


def _classes_in(state: dict[str, torch.Tensor], module: nn.Module) -> int | None:
    """The class count of a checkpoint whose classifier (the module's last Linear or conv,
    SqueezeNet's is a conv) has another number of outputs than the module's."""
    heads = [n for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    weight = state.get(f"{heads[-1]}.weight") if heads else None
    own = module.get_submodule(heads[-1]).weight.shape[0] if heads else None
    if weight is None or weight.dim() < 2 or weight.shape[0] == own:
        return None
    return int(weight.shape[0])


def _input_size(member, module: nn.Module) -> int:
    """The crop of the weights' transforms (299 for InceptionV3), unless the module was built
    for another size (ViT-H/14 without weights is built for 224, its weights for 518)."""
    crop = int(getattr(member.transforms(), "crop_size", [224])[0])
    return int(getattr(module, "image_size", crop))


def _normalization(member) -> InputNormalization:
    transforms = member.transforms()
    mean = tuple(getattr(transforms, "mean", IMAGENET_MEAN))
    std = tuple(getattr(transforms, "std", IMAGENET_STD))
    return InputNormalization.mean_std(mean, std)


def _from_file(name: str, path: Path, member) -> tuple[nn.Module, object, bool]:
    """(module, the weights member whose settings it has, whether its classes are the
    member's) for a state-dict file: built as torchvision builds its pretrained model (the
    member named like the file, else the default; most checkpoints are fine-tuned from those),
    else, when the file does not fit that, built without weights, with the file's classes."""
    import torchvision

    state = load_state_dict_file(path)
    member = _member_for_file(name, path) or member
    module = _build_with(name, member, state)
    if module is not None:
        return module, member, True
    with seeded_init():
        plain = torchvision.models.get_model(name, weights=None)
    # a fine-tuned GoogLeNet lacks the aux heads the builder loads and then drops: lend them
    # from a plain build, and keep the result only if the builder dropped every lent tensor
    lent = {key: value for key, value in plain.state_dict().items() if key not in state}
    module = _build_with(name, member, {**state, **lent}) if lent else None
    if module is not None and not set(lent) & set(module.state_dict()):
        return module, member, True
    module = plain
    classes = _classes_in(state, module)
    if classes is not None:
        module = torchvision.models.get_model(name, weights=None, num_classes=classes)
    apply_state(module, state, f"weights file {path}", name)
    return module, member, classes is None


def _describe() -> list[str]:
    listed = names()
    return [
        f"NAME                    any of {len(listed)} torchvision classification models "
        f"({', '.join(listed[:3])}, ...): weights from the local torch hub cache, "
        "--weights NAME (IMAGENET1K_V2), FILE or random"
    ]


@register_source(
    "torchvision", accepts=lambda spec: spec in names(), describe=_describe, names=names, rank=10
)
def load(name: str, weights: str | None) -> LoadedModel:
    """The torchvision model `name` with `weights`: a weights name (default: the model's
    default weights, from the local hub cache), a state-dict file, or 'random'."""
    import torchvision

    is_file = bool(weights) and names_a_file(weights)
    member = _weights_member(name, None if weights == RANDOM or is_file else weights)
    same_classes = True
    if weights == RANDOM:
        with seeded_init():
            module, weights_path = torchvision.models.get_model(name, weights=None), RANDOM
    elif is_file:
        module, member, same_classes = _from_file(name, Path(weights), member)
        weights_path = weights
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / _file_name(member)
        if not cached.is_file():
            raise AtlasError(
                f"weights {type(member).__name__}.{member.name} are not on this machine and atlas "
                f"does not download: put {_file_name(member)} in {cached.parent}, "
                "pass --weights path/to/state_dict.pth, or --weights random for untrained "
                "weights"
            )
        module = _build_with(name, member, load_state_dict_file(cached))
        if module is None:
            raise AtlasError(f"weights file {cached} does not fit {name}")
        weights_path = str(cached)
    size = _input_size(member, module)
    return LoadedModel(
        spec=name,
        module=module,
        normalize=_normalization(member),
        input_size=(size, size),
        labels=tuple(member.meta["categories"]) if same_classes else None,
        weights=weights_path,
        preprocessing_from=f"torchvision's {type(member).__name__}.{member.name}, bilinear "
        "over the whole image as atlas read it before (not its resize and crop)",
    ).keep_keys()
