"""Backbones: one spec string names an image+text encoder pair everywhere (CLI, manifest, API).

| spec                          | what                                                                   |
|-------------------------------|------------------------------------------------------------------------|
| `open_clip:ARCH:TAG`          | an open_clip architecture with a pretrained tag (model hub cache)      |
| `open_clip:ARCH:/path/m.pt`   | an open_clip architecture with a local checkpoint                      |
| `open_clip:ARCH:none`         | an open_clip architecture with random weights (speed benchmarks)       |
| `hf:ID_OR_DIR`                | a transformers `CLIPModel` (hub id or local folder)                    |
| `lite`                        | EfficientNet-Lite0 + all-MiniLM-L6-v2 with seeded linear projections   |
| `tiny`                        | a small seeded random open_clip config (tests)                         |

The registry is data, as timm's and open_clip's: a named backbone is a frozen `BackboneCfg`
(like timm's `PretrainedCfg`), a spec family (`open_clip:`, `hf:`) is a prefix with a builder, and
both go through `register_backbone` (like timm's `register_model`); `create_backbone(spec)` looks the
spec up, `list_backbones()` lists the accepted forms. `tiny` and `lite` are open_clip model configs
shipped as data in `pigeon/data/model_configs/`, registered with open_clip's public `add_model_config`.
Every backbone exposes the same surface (`Backbone`): `preprocess`, `tokenize`, `encode_image`,
`encode_text`, `embed_images`, `embed_texts`, `embed_dim`, and a content `hash` of its weights that
bundles use to tie a head or an index to the backbone that made its embeddings.

The package, one file per job (as timm's `_registry` / `_pretrained`, open_clip's `factory` / `pretrained`):

    config.py     BackboneSpec (a parsed spec) and BackboneCfg (a named backbone as data)
    registry.py   spec parsing, register_backbone, list_backbones, get_backbone_cfg, create_backbone
    base.py       the Backbone class, state_dict_hash, the towers of the freeze policy, check_device
    hub.py        model-hub handling shared by the adapters: offline switch, one-line download errors
    openclip.py   the open_clip adapter: model configs, builds, checkpoints, the tiny and lite configs
    hf.py         the transformers CLIPModel adapter (`hf:`)
    bundle.py     backbone_from_bundle: a bundle's backbone, its weights' hash checked

This `__init__` registers the built-ins (`tiny`, `lite`, `open_clip:`, `hf:`) on import.
"""

from __future__ import annotations

from .base import Backbone, state_dict_hash
from .bundle import backbone_from_bundle
from .config import BackboneCfg, BackboneSpec
from .hf import _build_hf
from .openclip import LITE_CFG, TINY_CFG, _build_open_clip, _parse_open_clip
from .registry import DEFAULT_SPEC, create_backbone, get_backbone_cfg, list_backbones, parse_spec, register_backbone

# the other public names of the former single module `pigeon/backbones.py`, still importable from here
from .base import check_device  # noqa: F401
from .openclip import LITE_MEAN, LITE_SEED, LITE_STD, TINY_SEED  # noqa: F401
from .registry import Builder, Parser  # noqa: F401

# -- the built-ins, registered like any user backbone -----------------------------------------

register_backbone("tiny", TINY_CFG)
register_backbone("lite", LITE_CFG)
register_backbone("open_clip:", _build_open_clip, parse=_parse_open_clip,
                  forms=("open_clip:ARCH:TAG", "open_clip:ARCH:/path/model.pt", "open_clip:ARCH:none"))
register_backbone("hf:", _build_hf, forms=("hf:ORG/NAME", "hf:/path/to/folder"))

__all__ = [
    "Backbone", "BackboneCfg", "BackboneSpec", "DEFAULT_SPEC", "LITE_CFG", "TINY_CFG", "backbone_from_bundle", "create_backbone",
    "get_backbone_cfg", "list_backbones", "parse_spec", "register_backbone", "state_dict_hash",
]
