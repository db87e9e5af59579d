"""The optional libraries that learning concepts and activation atlases needs, imported late so
that atlas imports (and workers run) without them."""

from __future__ import annotations

import importlib
from types import ModuleType

from atlas.errors import AtlasError

EXTRA = "concepts"


def require(module: str, package: str, purpose: str) -> ModuleType:
    """The module, or one sentence naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise AtlasError(
            f"{purpose} need {package}, which is not installed: pip install 'atlas[{EXTRA}]'"
        ) from error
