"""timm models: `timm:NAME` or `timm:NAME.TAG`, built by `timm.create_model`.

Preprocessing is timm's own, resolved from the model's `pretrained_cfg` by
`timm.data.resolve_data_config`: mean, std, input size, interpolation and crop_pct (ViT-style
models 0.5/0.5, Inception-style 299 px). Class names come from timm's ImageNet subsets where
the class count names one. Pretrained weights are read from the local Hugging Face cache
(HF_HOME / HF_HUB_CACHE) or, for the models timm publishes by URL, the torch hub cache; atlas
never downloads, as with HF_HUB_OFFLINE=1. An optional extra: `pip install 'atlas[timm]'`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atlas.errors import AtlasError, did_you_mean
from atlas.models.lite import imagenet_labels
from atlas.models.loaded import LoadedModel, seeded_init
from atlas.models.plain import from_pretrained_cfg, wrap
from atlas.models.registry import installed, optional, prefixed, register_source
from atlas.models.weights import RANDOM, apply_weights, names_a_file

PREFIX = "timm:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for on the hub, in order


def _describe() -> list[str]:
    return [
        f"timm:NAME[.TAG]         a timm model ({installed('timm', 'timm')}), read with its "
        "pretrained_cfg; weights from the local Hugging Face cache, --weights TAG, FILE or random"
    ]


def _architecture(timm, name: str) -> str:
    """`name` with its pretrained tag if it names a timm model, else an AtlasError."""
    architecture, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        hint = did_you_mean(architecture, timm.list_models())
        raise AtlasError(f"timm has no model {architecture!r}{hint}")
    return architecture


def _pretrained_cfg(timm, name: str):
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        architecture = timm.models.split_model_name_tag(name)[0]
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*")]
        raise AtlasError(
            f"timm has no pretrained weights {name!r}; its tags: {', '.join(tags) or 'none'}"
        ) from None


def cached_weights(cfg) -> tuple[Path | None, str]:
    """(the local file of a pretrained cfg's weights or None, what to do on a networked
    machine to get it)."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else HF_FILES
        for filename in files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found), cfg.hf_hub_id
        return None, f"run `hf download {cfg.hf_hub_id}` and copy the Hugging Face cache here"
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        return (cached if cached.is_file() else None), f"put {cfg.url} in {cached.parent}"
    return None, "find its weights (timm names no source for them)"


def _labels(module) -> tuple[str, ...] | None:
    """ImageNet's class names when the class count names a subset timm knows."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(module)
    if subset is None:
        return None
    if subset == "imagenet-1k":
        return imagenet_labels()  # as torchvision and the bundled models name them
    info = ImageNetInfo(subset)
    return tuple(
        info.index_to_description(i, detailed=False).split(",")[0]
        for i in range(info.num_classes())
    )


@register_source("timm", accepts=prefixed(PREFIX), describe=_describe, rank=20)
def load(spec: str, weights: str | None) -> LoadedModel:
    """`timm:NAME` with pretrained weights from the local cache, a tag (--weights TAG), a
    state-dict file, or random (seeded: every process builds the same weights)."""
    timm = optional("timm", "timm", "timm models")
    name = spec.removeprefix(PREFIX)
    architecture = _architecture(timm, name)
    is_file = bool(weights) and weights != RANDOM and names_a_file(weights)
    if weights and weights != RANDOM and not is_file:
        name = f"{architecture}.{weights}"
    if weights == RANDOM or is_file:
        with seeded_init():
            module = timm.create_model(name, pretrained=False)
        if is_file:
            apply_weights(module, weights, spec)
        weights_path = weights
    else:
        cfg = _pretrained_cfg(timm, name)
        found, fetch = cached_weights(cfg)
        if found is None:
            raise AtlasError(
                f"{spec}: the weights {cfg.hf_hub_id or cfg.url or name} are not on this "
                f"machine and atlas does not download: on a networked machine {fetch}, or pass "
                "--weights random or a state-dict file"
            )
        module = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": found})
        weights_path = str(found)
    data = timm.data.resolve_data_config({}, model=module)
    loaded = wrap(module, spec=spec, labels=_labels(module), **from_pretrained_cfg(data))
    loaded.weights = weights_path
    cfg_name = ".".join(filter(None, (architecture, module.pretrained_cfg.get("tag"))))
    loaded.preprocessing_from = f"timm's pretrained_cfg of {cfg_name}"
    return loaded
