"""The bundled GeoNames places (every place with at least 1000 people): the nearest town of a point
(captions) and how settled a point is, urban / suburban / rural (`pigeon evaluate`'s breakdown).

Population is not bundled (the GeoNames file has lat, lon, name, admin1 and country only), so the
classic rule "within so many km of a place of 100K / 10K people" cannot be applied. `area_types`
uses the density of places instead: how many of them lie within `AREA_RADIUS_KM` of the point. A
one-off check against GeoNames populations (not bundled) on 30,000 MP-16 photo positions: of the
photos within 10 km of a place of >= 100K people, 43% are urban here, 42% suburban, 15% rural; of
those more than 10 km from any place of >= 10K people, 68% are rural, 29% suburban, 3% urban. It is a
measure of settlement density, not of city size: the centre of a big city that GeoNames lists as
one point with few neighbours (Tokyo station, central Mumbai or Sao Paulo) counts as rural or
suburban, a European farming district with a village every few km as suburban.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

from .core.sphere import chord_to_km, km_to_chord, to_xyz
from .geocells import bundled

AREA_TYPES: tuple[str, ...] = ("urban", "suburban", "rural")
AREA_RADIUS_KM = 10.0       # places counted within this distance of the point
URBAN_MIN_PLACES = 10       # at least this many: urban (central Paris: 55, Croydon: 20, Manhattan: 15)
SUBURBAN_MIN_PLACES = 2     # at least this many (and fewer than URBAN_MIN_PLACES): suburban; else rural


@lru_cache(maxsize=1)
def town_index() -> tuple[cKDTree, np.ndarray]:
    """KD-tree over the bundled places' unit vectors, and their names (built once per process)."""
    c = bundled.cities()
    return cKDTree(to_xyz(c["lat"].to_numpy(np.float64), c["lon"].to_numpy(np.float64))), c["name"].astype(str).to_numpy()


def nearest_towns(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Name of, and great-circle km to, the nearest bundled town for each point (vectorised)."""
    tree, names = town_index()
    d, i = tree.query(to_xyz(np.atleast_1d(lat), np.atleast_1d(lon)))
    return names[i], chord_to_km(d)


def towns_within(lat: np.ndarray, lon: np.ndarray, km: float) -> np.ndarray:
    """(n,) int: how many bundled places lie within `km` great-circle km of each point."""
    tree, _ = town_index()
    xyz = to_xyz(np.atleast_1d(np.asarray(lat, np.float64)), np.atleast_1d(np.asarray(lon, np.float64)))
    return np.asarray(tree.query_ball_point(xyz, km_to_chord(km), return_length=True), dtype=np.int64)


def area_types(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n,) object array of "urban" / "suburban" / "rural" for each point: the one rule (see the module
    docstring): >= URBAN_MIN_PLACES bundled places within AREA_RADIUS_KM is urban, >= SUBURBAN_MIN_PLACES
    suburban, fewer (the open sea, deserts, farmland between small towns) rural."""
    n = towns_within(lat, lon, AREA_RADIUS_KM)
    kind = np.where(n >= URBAN_MIN_PLACES, 0, np.where(n >= SUBURBAN_MIN_PLACES, 1, 2))
    return np.asarray(AREA_TYPES, dtype=object)[kind]


def area_type_rule() -> dict[str, object]:
    """The rule's parameters, for a report to say how its classes were drawn."""
    return {"places": "bundled GeoNames places of >= 1000 people (no population: a density proxy)",
            "radius_km": AREA_RADIUS_KM, "urban_min_places": URBAN_MIN_PLACES, "suburban_min_places": SUBURBAN_MIN_PLACES}


__all__ = ["AREA_TYPES", "AREA_RADIUS_KM", "URBAN_MIN_PLACES", "SUBURBAN_MIN_PLACES", "town_index", "nearest_towns",
           "towns_within", "area_types", "area_type_rule"]
