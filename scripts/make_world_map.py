"""The web page's world map: country outlines from the bundled Natural Earth admin-1 polygons.

`api/static/world.json` is made by `python scripts/make_world_map.py` (dissolve admin-1 into countries,
simplify, round to 0.01 degree) and shipped with the package, so the page needs no tile server
and no internet. Equirectangular drawing happens in the browser (static/app.js).
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


if __name__ == "__main__":  # pragma: no cover
    p = build_world_outline()
    print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
