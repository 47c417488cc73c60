"""Geocells: admin regions merged and split (OPTICS + Voronoi) into cells that tile all land."""

from .errors import UserError

__all__ = ["UserError"]
