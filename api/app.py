"""The FastAPI app: `POST /locate` and friends, the offline web page, limits and safety.

`create_app(bundle_or_predictor, settings)` loads the bundle once (a bundle with missing or
mismatched parts raises `UserError` before anything listens), warms the model up, and returns
the app. Design choices that keep per-request overhead small and failures well-behaved:

- One pure-ASGI gate in front of everything: request id, optional API key, the body-size limit
  (Content-Length checked up front, the stream counted while it is read, so nothing unbounded is
  ever buffered), and one JSON log line per request.
- Decoding and inference run in a worker thread (one hop per request) under a capacity limiter;
  requests beyond `max_concurrency + max_queue` are answered 503 with Retry-After at once.
- Every error is `{error, detail}` JSON: bad input is 4xx; 500 only for a fault of the server.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pigeon.index import RefineConfig
from pigeon.predictor import Predictor

from .schemas import BatchResponse, ErrorResponse, Health, Location, Version
from .uploads import UploadError, decode_image

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("pigeon.api")
access_log = logging.getLogger("pigeon.api.access")

# Paths that never need the API key: the page, its assets, the docs and the health check.
_OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})
_OPEN_PREFIXES = ("/static/",)
_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the image bytes


@dataclass
class Settings:
    """Service limits and options. `from_env()` reads PIGEON_* variables (PIGEON_API_KEY, PIGEON_CORS_ORIGINS...)."""

    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body; 413 beyond
    max_pixels: int = 50_000_000  # width x height from the header, before decoding; 413 beyond
    min_side: int = 16  # smaller images are refused (422): nothing to locate in a 1x1 image
    max_batch: int = 16  # images per /locate/batch request
    max_top_k: int = 50
    max_concurrency: int = 1  # inferences at once (torch already uses every core for one)
    max_queue: int = 8  # requests allowed to wait; more -> 503 + Retry-After
    retry_after_s: int = 1
    api_key: Optional[str] = None  # when set, X-API-Key is required except on the page, docs and /health
    cors_origins: list[str] = field(default_factory=list)
    cells_simplify: float = 0.05  # degrees, for GET /cells
    warmup: bool = True  # one inference at start-up, so the first request is not the slow one
    refine: Optional[str] = None  # gallery refinement mode: cluster+nn (the default), cluster, nn, none
    max_refinement_km: Optional[float] = None  # PIGEON's guard (default 1000 km; inf turns it off)

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Defaults, then PIGEON_<FIELD> environment variables, then explicit `overrides` (None ignored)."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"PIGEON_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.name == "cors_origins":
                kw[f.name] = [o.strip() for o in raw.split(",") if o.strip()]
            elif f.name in ("api_key", "refine"):
                kw[f.name] = raw
            elif f.name == "max_refinement_km":
                kw[f.name] = float("inf") if raw.lower() in ("none", "off", "inf") else float(raw)
            elif f.name in ("warmup",):
                kw[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name == "cells_simplify":
                kw[f.name] = float(raw)
            else:
                kw[f.name] = int(raw)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


class ApiError(Exception):
    """An HTTP error with a JSON body `{error, detail}` and optional headers."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class _BodyTooLarge(Exception):
    pass


_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 411: "length_required", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests", 500: "internal_error",
    503: "service_unavailable",
}


def _error_body(status: int, code: str, detail: Any) -> bytes:
    return json.dumps({"error": code, "detail": detail}).encode()


async def _send_json_error(send: Any, status: int, code: str, detail: Any, request_id: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = _error_body(status, code, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Gate:
    """Pure ASGI middleware: request id, API key, body-size limit while streaming, JSON access log."""

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.settings = settings
        self.limit = settings.max_upload_bytes + _MULTIPART_SLACK
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        path = scope["path"]
        state = {"status": 0, "started": False, "read": 0, "over": False, "swallow": False}

        async def send_wrapped(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                if state["over"] and not state["started"]:  # the body limit tripped inside the app
                    state["swallow"] = True
                    state["started"] = True
                    state["status"] = 413
                    await _send_json_error(send, 413, "payload_too_large", self._too_large_detail(), rid, [(b"connection", b"close")])
                    return
                state["started"] = True
                state["status"] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            elif state["swallow"]:
                return
            await send(msg)

        async def receive_limited() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                state["read"] += len(msg.get("body", b""))
                if state["read"] > self.limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return msg

        try:
            if self.key is not None and scope["method"] != "OPTIONS" and path not in _OPEN_PATHS and not path.startswith(_OPEN_PREFIXES):
                given = headers.get(b"x-api-key", b"")
                if not hmac.compare_digest(given, self.key):
                    state["status"] = 401
                    await _send_json_error(send, 401, "unauthorized", "missing or wrong API key; send it in the X-API-Key header", rid)
                    return
            cl = headers.get(b"content-length")
            if cl is not None:
                try:
                    n = int(cl)
                except ValueError:
                    state["status"] = 400
                    await _send_json_error(send, 400, "bad_request", "Content-Length is not a number", rid)
                    return
                if n > self.limit:
                    state["status"] = 413
                    await _send_json_error(send, 413, "payload_too_large", self._too_large_detail(), rid, [(b"connection", b"close")])
                    return
            try:
                await self.app(scope, receive_limited, send_wrapped)
            except _BodyTooLarge:
                if not state["started"]:
                    state["status"] = 413
                    state["started"] = True
                    await _send_json_error(send, 413, "payload_too_large", self._too_large_detail(), rid, [(b"connection", b"close")])
            except Exception:
                if state["over"] and not state["started"]:
                    state["status"] = 413
                    await _send_json_error(send, 413, "payload_too_large", self._too_large_detail(), rid, [(b"connection", b"close")])
                else:
                    raise
        finally:
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "request_id": rid,
                            "method": scope["method"],
                            "path": path,
                            "status": state["status"] or 500,
                            "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                            "bytes_in": state["read"],
                            "client": client[0] if client else None,
                        }
                    )
                )

    def _too_large_detail(self) -> str:
        mb = self.settings.max_upload_bytes / (1024 * 1024)
        return f"the request body is over the {mb:g} MB limit; send a smaller image"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access-log lines (already JSON) pass through unchanged."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name == access_log.name and msg.startswith("{"):
            return msg
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d)


def configure_logging(level: int = logging.INFO) -> None:
    """Structured (JSON lines) logs on stderr for the `pigeon.api` loggers."""
    root = logging.getLogger("pigeon.api")
    if not any(getattr(h, "_pigeon_json", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        h._pigeon_json = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    root.propagate = False


def _plain(x: Any) -> Any:
    """numpy scalars/arrays -> Python values (the predictor's dicts may carry them); NaN/inf -> None."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _round_coords(obj: Any, nd: int = 3) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, (list, tuple)):
        return [_round_coords(v, nd) for v in obj]
    return obj


class Service:
    """The loaded predictor plus the per-process state the endpoints share (limiter, caches, explainer)."""

    def __init__(self, predictor: Any, settings: Settings):
        self.predictor = predictor
        self.settings = settings
        self.capacity = settings.max_concurrency + settings.max_queue
        self.admitted = 0  # touched only on the event loop
        self._limiter: anyio.CapacityLimiter | None = None
        self._cells_json: bytes | None = None
        self._explainer: Any = None
        # JPEGs decode at reduced scale down to the model's input size (never below 224)
        self.draft_size = max(224, int(getattr(getattr(predictor, "backbone", None), "image_size", 224) or 224))

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # must be created inside the running event loop
            self._limiter = anyio.CapacityLimiter(self.settings.max_concurrency)
        return self._limiter

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` in a worker thread; refuse at once (503) when over capacity."""
        if self.admitted >= self.capacity:
            raise ApiError(
                503,
                "overloaded",
                f"the server is busy ({self.admitted} requests in progress or waiting); retry in {self.settings.retry_after_s} s",
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        self.admitted += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.admitted -= 1

    @property
    def explainer(self) -> Any:
        if self._explainer is None:
            from pigeon.explain import Explainer

            head = self.predictor.head
            self._explainer = Explainer(self.predictor.backbone, lambda e: head(e))
        return self._explainer

    def decode(self, data: bytes) -> Any:
        s = self.settings
        return decode_image(data, max_pixels=s.max_pixels, min_side=s.min_side, draft_size=self.draft_size)

    def locate_one(self, data: bytes, top_k: int, explain: bool) -> dict[str, Any]:
        """Decode, locate and (optionally) explain one upload; runs in a worker thread."""
        t0 = time.perf_counter()
        dec = self.decode(data)
        t1 = time.perf_counter()
        res = _plain(self.predictor.locate([dec.image], top_k=top_k)[0])
        t2 = time.perf_counter()
        out = self._finish(res, dec)
        timings = dict(out["timings_ms"])
        if explain:
            out["explain"] = self.explain(dec.image, res)
            timings["explain_ms"] = round((time.perf_counter() - t2) * 1000, 2)
        timings.update(decode_ms=round((t1 - t0) * 1000, 2), locate_ms=round((t2 - t1) * 1000, 2), total_ms=round((time.perf_counter() - t0) * 1000, 2))
        out["timings_ms"] = timings
        return out

    def locate_many(self, blobs: list[tuple[str | None, bytes]], top_k: int) -> dict[str, Any]:
        """Decode every upload (naming the one at fault), then one batched `locate` call."""
        t0 = time.perf_counter()
        decoded = []
        for i, (name, data) in enumerate(blobs):
            try:
                decoded.append(self.decode(data))
            except UploadError as e:
                raise UploadError(e.status, e.code, f"images[{i}] ({name or 'unnamed'}): {e.detail}") from None
        t1 = time.perf_counter()
        results = _plain(self.predictor.locate([d.image for d in decoded], top_k=top_k))
        t2 = time.perf_counter()
        items = [{"filename": name, "result": self._finish(r, d)} for (name, _), r, d in zip(blobs, results, decoded)]
        return {
            "results": items,
            "timings_ms": {"decode_ms": round((t1 - t0) * 1000, 2), "locate_ms": round((t2 - t1) * 1000, 2), "total_ms": round((time.perf_counter() - t0) * 1000, 2)},
        }

    @staticmethod
    def _finish(res: dict[str, Any], dec: Any) -> dict[str, Any]:
        out = dict(res)
        out["exif_gps_present"] = dec.exif_gps_present
        out["image"] = {"format": dec.format, "width": dec.width, "height": dec.height}
        out["timings_ms"] = {k: float(v) for k, v in (res.get("timings_ms") or {}).items() if isinstance(v, (int, float))}
        return out

    def explain(self, image: Any, res: dict[str, Any]) -> dict[str, Any]:
        from pigeon.explain import heatmap_base64

        cell = int(res["top_cells"][0]["cell_id"])
        am, emb = self.explainer.activation_map(image, cell)
        countries = [c.get("name") for c in res.get("countries", [])[:5] if c.get("name")]
        heat = heatmap_base64(image, am.heat)
        return {"cues": self.explainer.cues(emb, countries), "heatmap": {**heat, "method": am.method, "layer": am.layer, "cell_id": cell}}

    def cells_geojson(self) -> bytes:
        if self._cells_json is None:
            gj = self.predictor.cells.to_geojson(simplify=self.settings.cells_simplify)
            for f in gj.get("features", []):
                geom = f.get("geometry") or {}
                if "coordinates" in geom:
                    geom["coordinates"] = _round_coords(geom["coordinates"])
                f["properties"] = _plain(f.get("properties", {}))
            self._cells_json = json.dumps(gj, separators=(",", ":")).encode()
        return self._cells_json

    def version(self) -> dict[str, Any]:
        bundle = self.predictor.bundle
        manifest = dict(getattr(bundle, "manifest", {}) or {})
        try:
            from importlib.metadata import version as _v

            pv = _v("pigeon-geo")
        except Exception:
            pv = manifest.get("pigeon_version", "0+unknown")
        return {"pigeon_version": pv, "backbone": getattr(bundle, "backbone_spec", None), "manifest": manifest}


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: the bundle from PIGEON_BUNDLE, settings from PIGEON_*."""
    bundle = os.environ.get("PIGEON_BUNDLE")
    if not bundle:
        from pigeon.core.errors import UserError

        raise UserError("PIGEON_BUNDLE is not set; give the bundle folder (`pigeon serve --bundle DIR`)")
    configure_logging()
    return create_app(bundle, Settings.from_env())


_ERR = {"model": ErrorResponse}
LOCATE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERR, "description": "the file is not a decodable image (empty, truncated, corrupt) or the body is malformed"},
    401: {**_ERR, "description": "missing or wrong X-API-Key (only when the server has one)"},
    413: {**_ERR, "description": "body over the size limit, image over the pixel limit, or too many images"},
    415: {**_ERR, "description": "not JPEG, PNG or WebP (detected from the bytes)"},
    422: {**_ERR, "description": "missing/invalid fields, more than one image, or an image too small to use"},
    503: {**_ERR, "description": "over capacity; retry after the Retry-After header's seconds"},
}


def create_app(bundle: Any, settings: Settings | None = None) -> FastAPI:
    """Build the app over a bundle folder (loaded now, once) or an already-loaded predictor."""
    settings = settings or Settings.from_env()
    refine = RefineConfig.from_options(settings.refine, settings.max_refinement_km)
    if isinstance(bundle, (str, os.PathLike)):
        predictor = Predictor.from_bundle(bundle, refine=refine)
    else:
        predictor = bundle
        if settings.refine is not None or settings.max_refinement_km is not None:
            predictor.refine = refine.resolve(predictor.refine.mode)
    svc = Service(predictor, settings)
    if settings.warmup:
        from PIL import Image

        predictor.locate([Image.new("RGB", (64, 48), (120, 130, 140))], top_k=1)

    app = FastAPI(
        title="pigeon",
        summary="Where on Earth was this photo taken? From the pixels alone.",
        version=svc.version()["pigeon_version"],
        form_limits={"max_files": settings.max_batch + 1, "max_fields": 16, "max_part_size": 64 * 1024},
    )
    app.state.service = svc
    app.state.settings = settings

    # -- errors: always {error, detail} ---------------------------------------------------------
    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"error": "validation_error", "detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s\n%s", request.method, request.url.path, exc, traceback.format_exc())
        return JSONResponse({"error": "internal_error", "detail": "unexpected server error; it has been logged"}, status_code=500)

    # -- endpoints --------------------------------------------------------------------------------
    @app.post("/locate", response_model=Location, responses=LOCATE_ERRORS, summary="Locate one photo")
    async def locate(
        request: Request,
        image: UploadFile = File(..., description="the photo: JPEG, PNG or WebP (type read from the bytes)"),
        top_k: int = Form(5, ge=1, le=settings.max_top_k, description="how many top cells to return"),
        explain: bool = Form(False, description="add text-tower cue scores and a class-activation heatmap"),
    ) -> Any:
        form = await request.form()
        if len(form.getlist("image")) != 1:
            raise ApiError(422, "one_image_expected", "send exactly one `image` part; use POST /locate/batch (field `images`) for several")
        data = await image.read()
        return await svc.run(svc.locate_one, data, top_k, explain)

    @app.post("/locate/batch", response_model=BatchResponse, responses=LOCATE_ERRORS, summary="Locate several photos in one batch")
    async def locate_batch(
        images: list[UploadFile] = File(..., description=f"up to {settings.max_batch} photos"),
        top_k: int = Form(5, ge=1, le=settings.max_top_k),
    ) -> Any:
        if len(images) > settings.max_batch:
            raise ApiError(413, "too_many_images", f"{len(images)} images in one batch; the limit is {settings.max_batch}")
        if not images:
            raise ApiError(422, "validation_error", "send at least one `images` part")
        blobs = [(f.filename, await f.read()) for f in images]
        return await svc.run(svc.locate_many, blobs, top_k)

    @app.get("/health", response_model=Health, summary="Liveness and load")
    async def health() -> Any:
        return {"status": "ok", "in_flight": svc.admitted, "capacity": svc.capacity, "cells": len(predictor.cells)}

    @app.get("/version", response_model=Version, responses={401: _ERR}, summary="Bundle manifest and backbone spec")
    async def version() -> Any:
        return svc.version()

    @app.get(
        "/cells",
        response_class=Response,
        responses={200: {"content": {"application/geo+json": {"schema": {"type": "object"}}}, "description": "the geocells as a simplified GeoJSON FeatureCollection"}, 401: _ERR},
        summary="Geocells as GeoJSON (simplified, cached)",
    )
    async def cells() -> Response:
        body = svc._cells_json if svc._cells_json is not None else await anyio.to_thread.run_sync(svc.cells_geojson)
        return Response(body, media_type="application/geo+json", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(_Gate, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app
