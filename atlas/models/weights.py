"""Weights from local files, read without running code: state dicts (`torch.load` with
weights_only=True, or safetensors), checked against the module before loading."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from atlas.errors import AtlasError

WEIGHTS_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
RANDOM = "random"  # --weights random: the builder's own initialization, seeded


def names_a_file(weights: str) -> bool:
    """A path rather than a weights name: it exists, holds a folder, or ends like a weights
    file (`ckpt.pth.tar` too), so a missing file is reported as missing."""
    path = Path(weights)
    suffixes = {suffix.lower() for suffix in path.suffixes}
    return path.exists() or "/" in weights or bool(suffixes & WEIGHTS_SUFFIXES)


def pickled_class(path: Path) -> str | None:
    """The class a torch.save file pickles at its top, when it is a whole nn.Module (its
    pickle names torch.nn modules), read from the pickle's opcodes without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
        names, strings = [], []
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(argument)
            elif opcode.name == "GLOBAL":
                names.append(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError):
        return None
    modules = [n for n in names if n.startswith("torch.nn.modules.")]
    if not modules:
        return None
    library = ("torch.", "collections.", "builtins.", "__builtin__.", "copyreg.", "_codecs.")
    return next((n for n in names if not n.startswith(library)), modules[0])


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as error:
        raise AtlasError(f"reading {path} needs safetensors: pip install safetensors") from error
    except Exception as error:  # torch raises many types for corrupt or foreign files
        if model_class := pickled_class(path):
            raise AtlasError(
                f"weights file {path} holds a whole pickled model ({model_class}), which atlas "
                "does not unpickle (that can run code): save its state dict instead, "
                "torch.save(model.state_dict(), path), or return the model from a "
                "package.module:factory"
            ) from error
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
