"""Model specs -> LoadedModel: the module in eval mode with frozen weights, how to feed it
(its preprocessing), its class labels and its identity (the digest of its weights plus the
preprocessing, part of every cache key).

Each family of specs is a source in its own module here, registered with
`atlas.models.registry.register_source`: the bundled EfficientNet-Lite (`lite`), torchvision
by name, `timm:NAME`, `hf:ORG/NAME`, `package.module:factory` and TorchScript files. This
package imports every module in it, so a new family is one new module. Weights never come from
the network: they are bundled, a local file, or a local cache (torch hub, Hugging Face).
"""

import importlib
import pkgutil

from atlas.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputNormalization,
    LoadedModel,
    Preprocessing,
    seeded_init,
    state_digest,
)
from atlas.models.plain import wrap
from atlas.models.registry import describe_sources, load, register_source, sources
from atlas.models.weights import apply_state, apply_weights, load_state_dict_file

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputNormalization",
    "LoadedModel",
    "Preprocessing",
    "apply_state",
    "apply_weights",
    "describe_sources",
    "load",
    "load_state_dict_file",
    "register_source",
    "seeded_init",
    "sources",
    "state_digest",
    "wrap",
]
