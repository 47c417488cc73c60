"""GET /cells: the geocells as simplified GeoJSON, built on first use and cached."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import ServiceDep
from ..errors import ERROR

router = APIRouter(tags=["cells"])

_GEOJSON = {"content": {"application/geo+json": {"schema": {"type": "object"}}}, "description": "the geocells as a simplified GeoJSON FeatureCollection"}


@router.get("/cells", response_class=Response, responses={200: _GEOJSON, 401: ERROR}, summary="Geocells as GeoJSON (simplified, cached)")
async def cells(service: ServiceDep) -> Response:
    body = service.cells_cached or await anyio.to_thread.run_sync(service.cells_geojson)
    return Response(body, media_type="application/geo+json", headers={"Cache-Control": "public, max-age=3600"})
