"""Bundled GeoNames places: the nearest town of a point (captions; every place of at least 1000
people) and how settled a point is, urban / suburban / rural (`pigeon evaluate`'s breakdown; the
places of at least 10,000 people, with their population).

The split is the usual distance-to-a-city rule (the one PIGEON reports its errors by): `urban` within `URBAN_KM` of a place of at
least `URBAN_MIN_POPULATION` people, else `suburban` within `SUBURBAN_KM` of a place of at least
`SUBURBAN_MIN_POPULATION`, else `rural`. Why 10 km for both: a GeoNames place is one point, its
centre; a city of 100K people reaches about 5 km from it and one of several million 15 km or more,
but GeoNames lists a metropolis's districts and satellite cities of 100K+ (Tokyo's wards,
Boulogne-Billancourt by Paris) as points of their own, so 10 km from any such
point covers a metropolis's built-up area without reaching much into the farmland around a lone
city of 100K. For a town of 10K people, 10 km is its own streets and its commuting belt.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

from .core.sphere import chord_to_km, to_xyz
from .geocells import bundled

AREA_TYPES: tuple[str, ...] = ("urban", "suburban", "rural")
URBAN_MIN_POPULATION = 100_000   # urban: near a place at least this big ...
URBAN_KM = 10.0                  # ... within this great-circle distance of its GeoNames point
SUBURBAN_MIN_POPULATION = 10_000  # suburban (if not urban): near a place at least this big (the bundled towns' floor) ...
SUBURBAN_KM = 10.0               # ... within this distance; anything else is rural


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


@lru_cache(maxsize=4)
def _populated_index(min_population: int) -> cKDTree:
    """KD-tree over the unit vectors of the bundled places of >= `min_population` people (once per size)."""
    t = bundled.towns()
    if min_population < int(t["population"].min()):
        raise ValueError(f"min_population {min_population}: the bundled towns start at {int(t['population'].min())} people")
    t = t[t["population"] >= min_population]
    return cKDTree(to_xyz(t["lat"].to_numpy(np.float64), t["lon"].to_numpy(np.float64)))


def km_to_populated(lat: np.ndarray, lon: np.ndarray, min_population: int) -> np.ndarray:
    """(n,) great-circle km from each point to the nearest bundled place of >= `min_population` people."""
    xyz = to_xyz(np.atleast_1d(np.asarray(lat, np.float64)), np.atleast_1d(np.asarray(lon, np.float64)))
    return chord_to_km(_populated_index(int(min_population)).query(xyz)[0])


def area_types(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n,) object array of "urban" / "suburban" / "rural" for each point: the one rule (module docstring)."""
    urban = km_to_populated(lat, lon, URBAN_MIN_POPULATION) <= URBAN_KM
    suburban = km_to_populated(lat, lon, SUBURBAN_MIN_POPULATION) <= SUBURBAN_KM
    kind = np.where(urban, 0, np.where(suburban, 1, 2))
    return np.asarray(AREA_TYPES, dtype=object)[kind]


def area_type_rule() -> dict[str, object]:
    """The rule's parameters, for a report to say how its classes were drawn."""
    return {"places": "bundled GeoNames places with their population (towns.parquet)",
            "urban": {"min_population": URBAN_MIN_POPULATION, "within_km": URBAN_KM},
            "suburban": {"min_population": SUBURBAN_MIN_POPULATION, "within_km": SUBURBAN_KM},
            "rural": "neither"}


__all__ = ["AREA_TYPES", "URBAN_MIN_POPULATION", "URBAN_KM", "SUBURBAN_MIN_POPULATION", "SUBURBAN_KM", "town_index",
           "nearest_towns", "km_to_populated", "area_types", "area_type_rule"]
