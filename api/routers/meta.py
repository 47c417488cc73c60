"""GET /health (always open: load balancers and Docker's health check) and GET /version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import ServiceDep
from ..errors import ERROR
from ..schemas import Health, Version

public = APIRouter(tags=["meta"])  # never behind the API key
router = APIRouter(tags=["meta"], responses={401: ERROR})

STATUS = {"ok": "ok", "verifying": "verifying", "failed": "unhealthy"}  # the background check's state -> /health's status
HEALTH_DESCRIPTION = ("`status`: `ok`; `verifying` while the bundle's large parts (index, gallery, clusters) are hashed in full in "
                      "the background after start-up (still 200: the service answers meanwhile); `unhealthy` (503, `detail` naming "
                      "the part) when a part does not match its sha256: /locate then answers 503 until it is restored and the server restarted.")


@public.get("/health", response_model=Health, response_model_exclude_none=True, summary="Liveness, load and bundle verification",
            description=HEALTH_DESCRIPTION, responses={503: {"model": Health, "description": "a bundle part failed verification"}})
async def health(service: ServiceDep, response: Response) -> Any:
    adm = service.admission
    check = service.start_verification()
    state = check.state
    if state == "failed":
        response.status_code = 503
    return {"status": STATUS[state], "in_flight": adm.in_flight, "capacity": adm.capacity, "cells": len(service.predictor.cells),
            "detail": check.error if state == "failed" else None}


@public.head("/health", include_in_schema=False)
async def health_head(service: ServiceDep) -> Response:
    """HEAD /health: 200 and no body (load balancers that probe with HEAD); 503 once a bundle part failed verification."""
    status = 503 if service.start_verification().state == "failed" else 200
    return Response(status_code=status, media_type="application/json")


@router.get("/version", response_model=Version, summary="Bundle manifest and backbone spec")
async def version(service: ServiceDep) -> Any:
    return service.version()
