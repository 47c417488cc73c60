"""Geocells: admin regions merged and split (OPTICS + Voronoi) into cells that tile all land.

Public surface: `build_cells`, `GeoCells`, `load_boundaries`, `load_points`, `default_optics_rounds`,
`UserError`, and the `bundled` data module. Installed as `pigeon.geocells`; imports only `pigeon.core`
(never the index, model, api or cli layers). Names are loaded on first use, so importing one module
(`pigeon.geocells.bundled`, say) does not pay for numba and shapely.
"""

from __future__ import annotations

import importlib
from typing import Any

from pigeon.core.errors import UserError

_LAZY = {
    "GeoCells": ".cells",
    "Points": ".points",
    "build_cells": ".build",
    "default_optics_rounds": ".build",
    "load_boundaries": ".boundaries",
    "load_points": ".points",
    "bundled": None,
}

__all__ = ["GeoCells", "Points", "UserError", "build_cells", "bundled", "default_optics_rounds", "load_boundaries", "load_points"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pigeon.geocells' has no attribute {name!r}")
    mod = _LAZY[name]
    value = importlib.import_module(f".{name}" if mod is None else mod, __name__)
    if mod is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value
