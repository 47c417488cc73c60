"""The FastAPI app: `create_app(bundle_or_predictor, settings)` and the uvicorn factory `app_from_env`.

Laid out as FastAPI's "bigger applications": settings (settings.py), dependencies (deps.py),
one router per concern (routers/), error handlers (errors.py), the request gate (middleware.py),
the shared per-process state (service.py). Here they are put together:

- The bundle is loaded eagerly, in `create_app`: a bundle with missing or mismatched parts raises
  `UserError` before any server is started, let alone listening.
- The lifespan does what needs the server running: it starts the full hash of the bundle's large
  parts in a background thread (the start only checked them against `.verified.json`'s size and
  mtime; /health says `verifying` until it is done), runs the warm-up inference (uvicorn runs the
  lifespan before it binds the socket, so the first request is not the slow one) and, at
  shutdown, drops the caches. An app driven without a lifespan (httpx's ASGITransport) still
  answers; it just is not warmed up, and its background check starts with the first /health or
  /locate.
- The API key is a dependency on the protected routers (locate, cells, /version, /metrics), added
  only when a key is configured;
  on the locate routes the request gate checks it too, before the upload is read, and takes the
  request's admission slot (503 otherwise) before reading it as well.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from pigeon.core.errors import FieldError, UserError
from pigeon.predictor import Predictor

from .deps import require_api_key
from .errors import install_error_handlers
from .logs import configure_logging, log
from .middleware import RequestGate
from .routers import cells, locate, meta, metrics, page
from .service import Service
from .settings import Settings

__all__ = ["Settings", "app_from_env", "configure_logging", "create_app"]


def serving_device(requested: str | None) -> str:
    """The model's device: the setting (checked: this machine has it), else cuda when there is one, else cpu."""
    import torch

    from pigeon.backbones import check_device

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(requested))


def load_predictor(bundle: Any, settings: Settings) -> Any:
    """A bundle folder -> a Predictor (UserError when a part is missing or mismatched, or the device or
    precision setting cannot run here); a loaded one as given, with the settings' refinement options and
    precision applied when they set any."""
    refine = settings.refine_config()
    try:
        if isinstance(bundle, (str, os.PathLike)):
            return Predictor.from_bundle(bundle, device=serving_device(settings.device), refine=refine, precision=settings.precision)
        if settings.precision is not None:
            bundle.backbone.set_precision(settings.precision)
    except FieldError as e:   # a setting the device cannot run: named as the user set it
        if e.field not in ("precision", "device"):
            raise
        raise e.renamed(f"--{e.field}", f"PIGEON_{e.field.upper()}") from None
    if settings.refine is not None or settings.max_refinement_km is not None:
        bundle.refine = refine.resolve(bundle.refine.mode)
    return bundle


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: the warm-up inference (in a worker thread); shutdown: drop the caches."""
    service: Service = app.state.service
    settings: Settings = app.state.settings
    check = service.start_verification()
    if check.state == "verifying":
        log.info(f"verifying {', '.join(check.parts)} in full in the background; /health reports `verifying` until done")
    if settings.warmup:
        ms = await anyio.to_thread.run_sync(service.warm_up)
        log.info(f"warm-up inference took {ms:.0f} ms")
    log.info(f"ready: {len(service.predictor.cells)} cells, max_concurrency {settings.max_concurrency}, "
             f"batches of up to {settings.max_batch_images} images (wait {settings.batch_wait_ms:g} ms), "
             f"API key {'required' if settings.api_key else 'not required (PIGEON_API_KEY unset)'}")
    try:
        yield
    finally:
        service.close()


def _include_routers(app: FastAPI, settings: Settings) -> None:
    """Open routers as they are; protected ones behind the API key when the server has one."""
    auth = [Depends(require_api_key)] if settings.api_key else []
    app.include_router(locate.router, dependencies=auth)
    app.include_router(cells.router, dependencies=auth)
    app.include_router(meta.router, dependencies=auth)
    app.include_router(metrics.router, dependencies=auth)
    app.include_router(meta.public)
    app.include_router(page.router)
    app.mount("/static", page.static, name="static")


def _add_middleware(app: FastAPI, settings: Settings, service: Service) -> None:
    """The request gate (outermost but for CORS) and, when origins are configured, CORS."""
    app.add_middleware(RequestGate, max_upload_bytes=settings.max_upload_bytes, admission=service.admission, api_key=settings.api_key,
                       body_timeout_s=settings.body_timeout_s, min_upload_bytes_per_s=settings.min_upload_bytes_per_s,
                       metrics=service.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )


def create_app(bundle: Any, settings: Settings | None = None) -> FastAPI:
    """Build the app over a bundle folder (loaded now, once) or an already-loaded predictor."""
    settings = settings or Settings.from_env()
    service = Service(load_predictor(bundle, settings), settings)
    app = FastAPI(
        title="pigeon",
        summary="Where on Earth was this photo taken? From the pixels alone.",
        version=service.version()["pigeon_version"],
        lifespan=lifespan,
        form_limits={"max_files": settings.max_batch + 1, "max_fields": settings.max_batch + 16, "max_part_size": 64 * 1024},
    )
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)
    _include_routers(app, settings)
    _add_middleware(app, settings, service)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: the bundle from PIGEON_BUNDLE, settings from PIGEON_*."""
    bundle = os.environ.get("PIGEON_BUNDLE")
    if not bundle:
        raise UserError("PIGEON_BUNDLE is not set; give the bundle folder (`pigeon serve --bundle DIR`)")
    configure_logging()
    return create_app(bundle, Settings.from_env())
