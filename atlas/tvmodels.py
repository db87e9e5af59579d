"""torchvision classification models by name, built by torchvision's own builder.

Named weights go through `torchvision.models.get_model(name, weights=member)`, so every
setting the builder makes when it is given weights is torchvision's: GoogLeNet's and
InceptionV3's `transform_input` and aux-logit handling, the number of classes, ViT's image
size. Built with `weights=None` and loaded afterwards, GoogLeNet's first conv sees other input
(max abs difference 0.53 in one check). Weights are never downloaded: the builder finds them
in the local hub cache, or, for a state-dict file named like torchvision's own, in a private
cache that links to it. Every file is first read with `weights_only=True`, so a file holding
code is refused before the builder, which reads it without that guard, sees it.

Other state-dict files load into `weights=None` builds, with the number of classes taken from
the file (a 10-class ResNet-18 checkpoint works). `--weights random` keeps the builder's
initialization (seeded: every process builds the same weights), with the input size and class
names of the model's default weights.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_SUFFIXES,
    InputNormalization,
    LoadedModel,
    apply_state,
    load_state_dict_file,
    seeded_init,
)


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
def _hub_holding(path: Path):
    """A hub cache in which `path` is found under its own name (the real one if it is there)."""
    real = Path(torch.hub.get_dir())
    if (real / "checkpoints" / path.name).resolve() == path.resolve():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="atlas-hub-") as private:
        (Path(private) / "checkpoints").mkdir()
        (Path(private) / "checkpoints" / path.name).symlink_to(path.resolve())
        torch.hub.set_dir(private)
        try:
            yield
        finally:
            torch.hub.set_dir(str(real))


def _build_with(name: str, member, path: Path) -> nn.Module:
    """torchvision's builder given `member`, reading the weights from `path`."""
    import torchvision

    load_state_dict_file(path)  # refuses code and corrupt files, with a clear message
    try:
        with _hub_holding(path):
            return torchvision.models.get_model(name, weights=member)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise AtlasError(f"weights file {path} does not fit {name}: {first}") from error


def _classes_in(state: dict[str, torch.Tensor], module: nn.Module) -> int | None:
    """The class count of a checkpoint whose classifier (the module's last Linear) differs."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    weight = state.get(f"{linears[-1]}.weight") if linears else None
    if weight is None or weight.dim() != 2:
        return None
    own = dict(module.named_modules())[linears[-1]].out_features
    return int(weight.shape[0]) if weight.shape[0] != own else None


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


def _names_a_file(weights: str) -> bool:
    """A path rather than a weights name: it exists, holds a folder, or ends like a weights
    file (`ckpt.pth.tar` too), so a missing file is reported as missing."""
    path = Path(weights)
    suffixes = {suffix.lower() for suffix in path.suffixes}
    return path.exists() or "/" in weights or bool(suffixes & WEIGHTS_SUFFIXES)


def load(name: str, weights: str | None) -> LoadedModel:
    """The torchvision model `name` with `weights`: a weights name (default: the model's
    default weights, from the local hub cache), a state-dict file, or 'random'."""
    import torchvision

    is_file = bool(weights) and _names_a_file(weights)
    member = _weights_member(name, None if weights == "random" or is_file else weights)
    labels: tuple[str, ...] | None = tuple(member.meta["categories"])
    if weights == "random":
        with seeded_init():
            module, weights_path = torchvision.models.get_model(name, weights=None), "random"
    elif is_file:
        path = Path(weights)
        state = load_state_dict_file(path)
        named = _member_for_file(name, path)
        if named is not None:
            member, module = named, _build_with(name, named, path)
        else:
            module = torchvision.models.get_model(name, weights=None)
            classes = _classes_in(state, module)
            if classes is not None:
                module = torchvision.models.get_model(name, weights=None, num_classes=classes)
                labels = None
            apply_state(module, state, f"weights file {path}", name)
        weights_path = str(path)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / _file_name(member)
        if not cached.is_file():
            raise AtlasError(
                f"weights {type(member).__name__}.{member.name} are not on this machine and atlas "
                f"does not download: put {_file_name(member)} in {cached.parent} "
                "or pass --weights path/to/state_dict.pth"
            )
        module, weights_path = _build_with(name, member, cached), str(cached)
    size = _input_size(member, module)
    return LoadedModel(
        spec=name,
        module=module,
        normalize=_normalization(member),
        input_size=(size, size),
        labels=labels,
        weights=weights_path,
    )
