"""GET /metrics: the app's Prometheus metrics in the text exposition format (see pigeon.api.metrics);
behind the API key when the server has one."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import ServiceDep
from ..errors import ERROR
from ..metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["meta"])

_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}},
         "description": "Prometheus text format: requests, latencies (decode, batch wait, forward, head, format, total), in-flight and "
                        "queued requests, refusals by reason, batch sizes, the build"}


@router.get("/metrics", response_class=Response, responses={200: _TEXT, 401: ERROR}, summary="Prometheus metrics")
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
