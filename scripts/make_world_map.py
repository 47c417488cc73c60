"""The web page's map layers: country and admin-1 outlines from the bundled Natural Earth admin-1 polygons.

`python scripts/make_world_map.py` writes, shipped with the package so the page needs no tile server and
no internet (Leaflet, vendored in api/static/vendor/leaflet, draws them in the browser: static/app.js):
- `api/static/world.json`: countries (admin-1 dissolved, simplified, rounded to 0.01 degree);
- `api/static/admin1.json`: every admin-1 outline (simplified more finely, for zoomed-in views),
  properties admin1 and country.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import shapely
from shapely.geometry import mapping

from pigeon.core.io import atomic_path
from pigeon.geocells import bundled

OUT = Path(__file__).resolve().parents[1] / "api" / "static" / "world.json"
OUT_ADMIN1 = OUT.with_name("admin1.json")


def _rounded(coords, nd: int):
    if isinstance(coords[0], (float, int)):
        return [round(float(coords[0]), nd), round(float(coords[1]), nd)]
    return [_rounded(c, nd) for c in coords]


def build_world_outline(out: Path = OUT, tolerance: float = 0.15, min_area: float = 0.05, nd: int = 2) -> Path:
    """Write the simplified country-outline GeoJSON (properties: iso_a2, name) atomically; returns its path."""
    gdf = bundled.admin1()
    countries = gdf.dissolve(by="adm0_a3", aggfunc={"iso_a2": "first", "country": "first"}).reset_index()
    feats = []
    for row in countries.itertuples():
        g = shapely.simplify(shapely.make_valid(row.geometry), tolerance, preserve_topology=True)
        polys = [p for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon" and p.area >= min_area]
        if not polys:
            continue
        geom = mapping(shapely.MultiPolygon(polys))
        geom = {"type": "MultiPolygon", "coordinates": _rounded([[list(r) for r in poly] for poly in geom["coordinates"]], nd)}
        feats.append({"type": "Feature", "properties": {"iso_a2": row.iso_a2, "name": row.country}, "geometry": geom})
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":")))
    return out


def build_admin1_outline(out: Path = OUT_ADMIN1, tolerance: float = 0.12, min_area: float = 0.005, nd: int = 2) -> Path:
    """Write the admin-1 outline GeoJSON (properties: admin1, country) atomically; returns its path.

    The polygons are simplified as one coverage (shared borders stay shared, no slivers or gaps)."""
    gdf = bundled.admin1()
    geoms = shapely.coverage_simplify(shapely.make_valid(gdf.geometry.to_numpy()), tolerance)
    feats = []
    for g, name, country in zip(geoms, gdf["admin1"], gdf["country"]):
        polys = [p for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon" and p.area >= min_area]
        if not polys:
            continue
        coords = [[_rounded(list(p.exterior.coords), nd)] for p in polys]
        feats.append({"type": "Feature", "properties": {"admin1": name, "country": country},
                      "geometry": {"type": "MultiPolygon", "coordinates": coords}})
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":")))
    return out


if __name__ == "__main__":  # pragma: no cover
    for p in (build_world_outline(), build_admin1_outline()):
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
