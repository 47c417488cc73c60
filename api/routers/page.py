"""GET / (the offline web page) and /static/* (its script, style and world outline); never behind the key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=STATIC_DIR)  # mounted at /static by create_app (a router's mounts are not carried by every FastAPI version)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
