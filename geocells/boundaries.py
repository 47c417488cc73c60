"""Admin boundaries: the bundled Natural Earth admin-1, or a user's own file, in one normalised layout.

Normalised columns: adm0_a3, iso_a2, country, admin1, admin2 (may be empty), geometry (EPSG:4326,
valid, polygonal). GADM (GID_0, COUNTRY, NAME_1, NAME_2) and geoBoundaries (shapeGroup, shapeName,
shapeType) layouts are recognised; any other layout works through an explicit column mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import geopandas as gpd
import pandas as pd
import shapely

from . import bundled
from pigeon.core.errors import UserError
from .geometry import polygonal

COLUMNS = ["adm0_a3", "iso_a2", "country", "admin1", "admin2"]

# Known layouts: normalised column -> candidate source columns, first present wins.
_LAYOUTS: dict[str, dict[str, list[str]]] = {
    "gadm": {"adm0_a3": ["GID_0"], "country": ["COUNTRY", "NAME_0"], "admin1": ["NAME_1"], "admin2": ["NAME_2"]},
    "geoboundaries": {"adm0_a3": ["shapeGroup"], "admin2": ["shapeName"]},
    "natural_earth": {"adm0_a3": ["adm0_a3"], "iso_a2": ["iso_a2"], "country": ["admin"], "admin1": ["name_en", "name"]},
    "pigeon": {c: [c] for c in COLUMNS},
}
_SIGNATURES = {"gadm": "GID_0", "geoboundaries": "shapeGroup", "natural_earth": "adm1_code"}


def load_boundaries(source: str | os.PathLike | None = "bundled", columns: Mapping[str, str] | None = None):
    """Admin polygons in the normalised layout, from 'bundled' (Natural Earth admin-1) or a file.

    `columns` maps normalised names (adm0_a3, iso_a2, country, admin1, admin2) to the file's column
    names, for layouts that are not recognised.
    """
    if source is None or str(source) == "bundled":
        g = bundled.admin1().copy()
        g["admin2"] = ""
        return g[COLUMNS + ["geometry"]]
    path = Path(source)
    if not path.exists():
        raise UserError(f"boundaries file {path} does not exist; give a GeoParquet, GeoJSON, GeoPackage or shapefile, or use --boundaries bundled")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            raw = gpd.read_parquet(path)
        else:
            raw = gpd.read_file(path)
    except Exception as e:  # pyogrio/arrow raise many types for unreadable files
        raise UserError(f"boundaries file {path} could not be read as a vector file ({type(e).__name__}: {e}); give a GeoParquet, GeoJSON, GeoPackage or shapefile") from e
    if raw.geometry is None or len(raw) == 0:
        raise UserError(f"boundaries file {path} has no features; give a file of admin polygons")
    if raw.crs is not None and not raw.crs.equals("EPSG:4326"):
        raw = raw.to_crs("EPSG:4326")
    geom = np.asarray(raw.geometry.values, dtype=object)
    poly = np.isin(shapely.get_type_id(geom), [3, 6])  # Polygon, MultiPolygon
    if not poly.any():
        raise UserError(f"boundaries file {path} holds no polygons (found {sorted(set(raw.geometry.geom_type.dropna()))}); give admin polygons")
    raw = raw[poly].reset_index(drop=True)
    out = _normalise(raw, columns or {}, path)
    geom = shapely.make_valid(np.asarray(raw.geometry.values, dtype=object))
    geom = np.array([polygonal(x) for x in geom], dtype=object)
    out = gpd.GeoDataFrame(out, geometry=geom, crs="EPSG:4326")
    return out[~out.geometry.is_empty].reset_index(drop=True)


def _normalise(raw: pd.DataFrame, columns: Mapping[str, str], path: Path) -> pd.DataFrame:
    bad = [k for k in columns if k not in COLUMNS]
    if bad:
        raise UserError(f"unknown boundary column key(s) {bad}; use {COLUMNS}")
    missing = [v for v in columns.values() if v not in raw.columns]
    if missing:
        raise UserError(f"boundaries file {path} has no column(s) {missing}; its columns are {list(raw.columns)}")
    layout = next((name for name, sig in _SIGNATURES.items() if sig in raw.columns), "pigeon")
    cand = _LAYOUTS[layout]
    out = pd.DataFrame(index=raw.index)
    for col in COLUMNS:
        src = columns.get(col) or next((c for c in cand.get(col, []) if c in raw.columns), None)
        out[col] = raw[src].fillna("").astype(str) if src else ""
    table = bundled.driving_side()
    a3_to_a2 = dict(zip(table.adm0_a3, table.iso_a2))
    a3_to_name = dict(zip(table.adm0_a3, table.country))
    out["iso_a2"] = out["iso_a2"].where(out["iso_a2"].str.len() == 2, out["adm0_a3"].map(a3_to_a2)).fillna("")
    out["country"] = out["country"].where(out["country"].str.len() > 0, out["adm0_a3"].map(a3_to_name)).fillna("")
    if (out["adm0_a3"] == "").all() and (out["country"] == "").all():
        raise UserError(f"boundaries file {path}: no country column recognised (columns {list(raw.columns)}); map one with --country-col")
    # a region always has a name to show: admin1, else admin2, else the country
    out["admin1"] = out["admin1"].where(out["admin1"] != "", out["admin2"]).where(lambda s: s != "", out["country"])
    return out
