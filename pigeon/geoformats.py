"""Answers as map files: GeoJSON (RFC 7946) and KML, for GIS tools, Google Earth and case files.

Both are written from answers that carry their `regions` (`Predictor.format` with
`AnswerOptions(regions=True)`), so the polygons, their rounding and orientation are decided once
(`pigeon.regions`). Per answer, in this order:

- the answer point (`kind: "answer"`): [lon, lat], with the answer's fields as properties (less
  lat/lon, the regions, which are features of their own, and an explanation's heatmap);
- its 50% and 90% regions (`kind: "region"`): level, probability (the mass held), area_km2, n_cells,
  cell_ids, contains_answer;
- its top cells as polygons (`kind: "cell"`): cell_id, rank, probability and name (admin-1, country).

Every feature carries `answer` (its answer's index) and `name`. The KML is the same features, one
Folder per answer, through fastkml (a maintained library, never hand-written XML); scalar properties
go to each Placemark's ExtendedData.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from .predictor import AnswerOptions
from .regions import POINT_DECIMALS, CellRegions, level_key

MAP_FORMATS: tuple[str, ...] = ("geojson", "kml")        # drawn from the answers' regions
FORMATS: tuple[str, ...] = ("json", *MAP_FORMATS)        # what an answer can be asked as (the CLI adds csv)
MEDIA_TYPES = {"json": "application/json", "geojson": "application/geo+json", "kml": "application/vnd.google-earth.kml+xml"}
_NOT_IN_PROPERTIES = ("lat", "lon", "regions", "explain")


def options_for(options: AnswerOptions, fmt: str | None) -> AnswerOptions:
    """The options answers need to be written as `fmt`: GeoJSON and KML are drawn from their regions."""
    return replace(options, regions=True) if fmt in MAP_FORMATS else options


def feature_collection(answers: Sequence[dict[str, Any]], regions: CellRegions, names: Sequence[str | None] | None = None,
                       refused: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One RFC 7946 FeatureCollection for all `answers` (each with `regions`); `names` label them (an
    image, a place; default "answer N"); `refused`: entries that got no answer, kept as a foreign member."""
    feats: list[dict[str, Any]] = []
    for i, a in enumerate(answers):
        if "regions" not in a:
            raise ValueError("answers written as GeoJSON/KML need their regions: format them with AnswerOptions(regions=True)")
        name = (names[i] if names is not None else None) or f"answer {i + 1}"
        point = [round(float(a["lon"]), POINT_DECIMALS), round(float(a["lat"]), POINT_DECIMALS)]
        props = {k: v for k, v in a.items() if k not in _NOT_IN_PROPERTIES}
        feats.append(_feature(f"{i}", {"kind": "answer", "answer": i, "name": name, **props}, {"type": "Point", "coordinates": point}))
        for level in regions.levels:
            r = a["regions"][level_key(level)]
            props = {k: v for k, v in r.items() if k != "geometry"}
            feats.append(_feature(f"{i}-region-{level_key(level)}",
                                  {"kind": "region", "answer": i, "name": f"{name}: {level_key(level)}% region", **props}, r["geometry"]))
        for rank, c in enumerate(a.get("top_cells", []), 1):
            label = ", ".join(s for s in (c.get("admin1"), c.get("country")) if s) or f"cell {c['cell_id']}"
            feats.append(_feature(f"{i}-cell-{c['cell_id']}", {
                "kind": "cell", "answer": i, "name": label, "rank": rank, "cell_id": int(c["cell_id"]), "probability": c["probability"],
                "country": c.get("country"), "iso_a2": c.get("iso_a2"), "admin1": c.get("admin1")}, regions.cell_geometry(c["cell_id"])))
    fc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if refused:
        fc["refused"] = list(refused)
    return fc


def _feature(fid: str, props: dict[str, Any], geometry: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "Feature", "id": fid, "geometry": geometry, "properties": props}


_STYLES = {  # KML colours are aabbggrr; the answer keeps the viewer's own pin
    "region-50": {"line": ("ff9a3d6a", 2.0), "poly": "406a3d9a"},
    "region-90": {"line": ("ff9a3d6a", 1.0), "poly": "1a6a3d9a"},
    "cell": {"line": ("ff3333aa", 1.0), "poly": "302e57e4"},
}


def kml_document(fc: dict[str, Any], title: str = "pigeon") -> str:
    """The KML of a `feature_collection`: one Document, a Folder per answer (its point, regions and
    cells as Placemarks with ExtendedData), written by fastkml."""
    import pygeoif
    from fastkml import containers, data, features, kml, styles

    def style(sid: str, s: dict[str, Any]) -> styles.Style:
        return styles.Style(id=sid, styles=[styles.LineStyle(color=s["line"][0], width=s["line"][1]), styles.PolyStyle(color=s["poly"])])

    folders: dict[int, list[Any]] = {}
    names: dict[int, str] = {}
    for f in fc["features"]:
        p = f["properties"]
        kind = p["kind"]
        sid = {"region": f"region-{level_key(p.get('level', 0))}", "cell": "cell"}.get(kind)
        if kind == "answer":
            names[p["answer"]] = str(p["name"])
        extended = data.ExtendedData(elements=[data.Data(name=k, value=_text(v)) for k, v in p.items()
                                               if isinstance(v, (str, int, float, bool)) and k not in ("name", "kind", "answer")])
        geometry = pygeoif.shape(f["geometry"]) if f["geometry"] else None
        folders.setdefault(p["answer"], []).append(features.Placemark(
            id=f"f{f['id']}", name=str(p["name"]), style_url=styles.StyleUrl(url=f"#{sid}") if sid else None, extended_data=extended,
            description=_description(p), geometry=geometry))
    doc = containers.Document(
        name=title, styles=[style(k, v) for k, v in _STYLES.items()],
        features=[containers.Folder(name=names.get(i, f"answer {i + 1}"), features=pms) for i, pms in folders.items()],
        description=_refused_text(fc.get("refused")))
    return kml.KML(features=[doc]).to_string(prettyprint=True, precision=POINT_DECIMALS)


def _text(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _description(p: dict[str, Any]) -> str:
    """One line a reader sees in Google Earth's balloon."""
    if p["kind"] == "answer":
        return (f"confidence {p.get('confidence', 0):.0%}; 50% within {p.get('radius_km_50') or 0:.0f} km, "
                f"90% within {p.get('radius_km_90') or 0:.0f} km")
    if p["kind"] == "region":
        inside = "" if p["contains_answer"] else "; the answer point lies outside it"
        return f"{p['n_cells']} cells holding {p['probability']:.0%}, {p['area_km2']:,.0f} km²{inside}"
    return f"cell {p['cell_id']} (rank {p['rank']}): {p['probability']:.1%}"


def _refused_text(refused: Sequence[dict[str, Any]] | None) -> str | None:
    if not refused:
        return None
    return "Not located: " + "; ".join(f"{r.get('filename') or r.get('place')}: {r['error'].get('detail')}" for r in refused)


__all__ = ["FORMATS", "MAP_FORMATS", "MEDIA_TYPES", "feature_collection", "kml_document", "options_for"]
