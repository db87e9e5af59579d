"""`package.module:factory`: a function of the user's that builds the model.

It returns an nn.Module or a LoadedModel. A LoadedModel is read exactly as it says (its
normalization, input size, channels, resize mode and labels win over anything its module
carries); a module is read as `atlas.models.plain.wrap` reads it: its timm-style
`pretrained_cfg` first, then atlas's defaults.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from torch import nn

from atlas.errors import AtlasError, describe
from atlas.models.loaded import LoadedModel, seeded_init, state_digest
from atlas.models.plain import wrap
from atlas.models.registry import register_source
from atlas.models.weights import RANDOM, apply_weights


def _user_code_failed(spec: str, what: str, error: Exception) -> AtlasError:
    """User code (an import, a factory) raised: one line naming it and the exception."""
    return AtlasError(f"{spec} {what} {describe(error)} (ATLAS_DEBUG=1 shows the traceback)")


def _is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _describe() -> list[str]:
    return [
        "package.module:factory  your function returning an nn.Module (read with its "
        "pretrained_cfg, else ImageNet mean/std at the first size that runs) or a LoadedModel "
        "(read as it says)"
    ]


def _build(spec: str) -> LoadedModel | nn.Module:
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
    return built


@register_source("factory", accepts=_is_factory, describe=_describe, rank=30)
def load(spec: str, weights: str | None) -> LoadedModel:
    """The factory's model, with `weights` (a state-dict file) loaded into it."""
    built = _build(spec)
    module = built.module if isinstance(built, LoadedModel) else built
    weights_file = weights if weights and weights != RANDOM else None
    if weights_file:  # first: lazy modules take their sizes from the file
        apply_weights(module, weights_file, spec)
    if isinstance(built, LoadedModel):
        loaded = built
        if weights_file:
            loaded.digest = state_digest(module)
        loaded.preprocessing_from = loaded.preprocessing_from or "the factory's LoadedModel"
    else:
        try:
            loaded = wrap(built, spec=spec)
        except ValueError as error:
            raise AtlasError(f"{error} (from the module's pretrained_cfg)") from error
    loaded.spec = spec
    loaded.weights = weights or loaded.weights
    return loaded
