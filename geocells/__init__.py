"""Geocells: admin regions merged and split (OPTICS + Voronoi) into cells that tile all land.

Public surface: `build_cells`, `GeoCells`, `load_boundaries`, `load_points`, `default_optics_rounds`,
`UserError`, and the `bundled` data module. Imports neither `pigeon` nor `index`.
"""

from . import bundled
from .boundaries import load_boundaries
from .build import build_cells, default_optics_rounds
from .cells import GeoCells
from .errors import UserError
from .points import Points, load_points

__all__ = ["GeoCells", "Points", "UserError", "build_cells", "bundled", "default_optics_rounds", "load_boundaries", "load_points"]
