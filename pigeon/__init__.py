"""pigeon: photo geolocation from pixels alone (PIGEON/PIGEOTTO as installable software).

The Python API, as small as open_clip's::

    import pigeon
    predictor = pigeon.load("bundle/", device="cpu", refine="cluster+nn")
    answers = predictor.locate(["photo.jpg"])          # lat, lon, confidence, radii, countries...
    backbone = pigeon.create_backbone("lite")           # any spec of pigeon.list_backbones()

Names are resolved on first use: `import pigeon` (and every `pigeon ...` CLI start, and the
bottom layers `pigeon.core`, `pigeon.geocells`) stays free of torch and faiss until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.errors import UserError

_LAZY = {
    "load": ".predictor",
    "Predictor": ".predictor",
    "RefineConfig": ".index",
    "Bundle": ".bundle",
    "create_backbone": ".backbones",
    "list_backbones": ".backbones",
    "register_backbone": ".backbones",
    "BackboneCfg": ".backbones",
}

__all__ = ["UserError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pigeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
