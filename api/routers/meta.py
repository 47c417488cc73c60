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


@public.get("/health", response_model=Health, summary="Liveness and load")
async def health(service: ServiceDep) -> Any:
    adm = service.admission
    return {"status": "ok", "in_flight": adm.in_flight, "capacity": adm.capacity, "cells": len(service.predictor.cells)}


@public.head("/health", include_in_schema=False)
async def health_head() -> Response:
    """HEAD /health: 200 and no body (load balancers that probe with HEAD)."""
    return Response(status_code=200, media_type="application/json")


@router.get("/version", response_model=Version, summary="Bundle manifest and backbone spec")
async def version(service: ServiceDep) -> Any:
    return service.version()
