"""How the locate routes send their answers: JSON (the default), GeoJSON or KML (`pigeon.geoformats`),
chosen by the `format` form field, else by the Accept header (`application/geo+json`,
`application/vnd.google-earth.kml+xml`), else JSON. GeoJSON and KML are drawn from the answers'
regions, so asking for either asks for the regions (`AnswerOptions(regions=True)`)."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from fastapi import Response

from pigeon.geoformats import FORMATS, MEDIA_TYPES, feature_collection, kml_document

from .service import Service

_BY_MEDIA = {m: f for f, m in MEDIA_TYPES.items()}

FORMAT_DESCRIPTION = ("json | geojson | kml (default: the Accept header's choice among application/json, application/geo+json and "
                      "application/vnd.google-earth.kml+xml, else json). geojson: an RFC 7946 FeatureCollection (per answer its point, "
                      "its 50% and 90% regions and its top cells as polygons); kml: the same as a KML document")
REGIONS_DESCRIPTION = ("add each answer's `regions`: the 50% and 90% credible regions (the fewest cells holding that probability: "
                       "probability held, n_cells, cell_ids, area_km2, contains_answer, GeoJSON geometry); geojson and kml always carry them")

_FEATURE_COLLECTION_SCHEMA = {
    "type": "object", "required": ["type", "features"],
    "properties": {"type": {"type": "string", "enum": ["FeatureCollection"]},
                   "features": {"type": "array", "items": {"type": "object", "required": ["type", "geometry", "properties"]}},
                   "refused": {"type": "array", "description": "/locate/batch: the entries that got no answer ({filename | place, error})"}},
}
OTHER_CONTENT = {  # the 200 response's content types beside application/json (OpenAPI)
    MEDIA_TYPES["geojson"]: {"schema": _FEATURE_COLLECTION_SCHEMA},
    MEDIA_TYPES["kml"]: {"schema": {"type": "string", "description": "a KML 2.2 document: a Folder per answer"}},
}


def choose_format(field: Optional[str], accept: Optional[str]) -> str:
    """The `format` field when given, else the Accept header's preferred media type among ours (by q; ties:
    the first listed), else json. Wildcards and other types choose nothing."""
    if field:
        return field
    best, best_q = "json", 0.0
    for part in (accept or "").split(","):
        media, *params = [x.strip() for x in part.split(";")]
        fmt = _BY_MEDIA.get(media.lower())
        if fmt is None:
            continue
        q = 1.0
        for prm in params:
            name, _, value = prm.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = fmt, q
    return best


def _render(fmt: str, answers: list[dict[str, Any]], names: Sequence[str | None], refused: list[dict[str, Any]], regions: Any) -> bytes:
    fc = feature_collection(answers, regions, names=names, refused=refused)
    if fmt == "geojson":
        return json.dumps(fc, separators=(",", ":")).encode()
    return kml_document(fc).encode()


async def respond_one(service: Service, fmt: str, answer: dict[str, Any], name: str | None) -> Any:
    """/locate's answer as asked: the dict itself (json), else a GeoJSON / KML response."""
    if fmt == "json":
        return answer
    body = await service.run(_render, fmt, [answer], [name], [], service.predictor.regions)
    return Response(body, media_type=MEDIA_TYPES[fmt])


async def respond_batch(service: Service, fmt: str, batch: dict[str, Any]) -> Any:
    """/locate/batch's answer as asked: the {results, timings_ms} dict (json), else ONE GeoJSON
    FeatureCollection / KML document for every located entry (the refused ones listed in `refused`)."""
    if fmt == "json":
        return batch
    located = [e for e in batch["results"] if "result" in e]
    refused = [e for e in batch["results"] if "error" in e]
    names = [e.get("filename") or e.get("place") for e in located]
    body = await service.run(_render, fmt, [e["result"] for e in located], names, refused, service.predictor.regions)
    return Response(body, media_type=MEDIA_TYPES[fmt])


__all__ = ["FORMATS", "FORMAT_DESCRIPTION", "REGIONS_DESCRIPTION", "OTHER_CONTENT", "choose_format", "respond_one", "respond_batch"]
