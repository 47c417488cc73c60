"""Every error the service answers is JSON `{error, detail}`: the exception type and its handlers.

Bad input is 4xx (`UploadError` from the decoder, `ApiError` from the endpoints and dependencies,
Starlette's 404/405, FastAPI's validation errors); a 500 (`internal_error`) only for a fault of
the server, logged with its traceback.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from pigeon.area import AreaError

from .logs import log
from .schemas import ErrorResponse
from .uploads import UploadError

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 411: "length_required", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests", 500: "internal_error",
    503: "service_unavailable",
}

ERROR = {"model": ErrorResponse}  # the OpenAPI `responses` entry of an error status
ONE_IMAGE = ("send one `image` part, or 2 to {limit} views of ONE place with the form field same_place=true; "
             "use POST /locate/batch (field `images`) for photos of different places")


class ApiError(Exception):
    """An HTTP error with a JSON body `{error, detail}` and optional headers."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_body(code: str, detail: Any) -> bytes:
    """The `{error, detail}` body as bytes (for the ASGI middleware, which answers before FastAPI)."""
    return json.dumps({"error": code, "detail": detail}).encode()


async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def too_many_images(n: int | None, limit: int) -> ApiError:
    """413 for a batch over `max_batch` (n: how many were sent, None when the form parser stopped counting)."""
    sent = f"{n} images" if n is not None else f"more than {limit} images"
    return ApiError(413, "too_many_images", f"{sent} in one batch; the limit is {limit}: send them in several requests")


def too_many_views(n: int | None, limit: int, same_place: bool = True) -> ApiError:
    """422 for /locate with several `image` parts but no same_place=true, or over `max_batch` views (n: how many
    were sent, None when the form parser stopped counting). The code stays `one_image_expected`, what /locate
    answered before it took several views."""
    sent = f"{n} `image` parts" if n is not None else f"more than {limit} `image` parts"
    why = "" if same_place else " without same_place=true"
    return ApiError(422, "one_image_expected", f"{sent} sent to /locate{why}; " + ONE_IMAGE.format(limit=limit))


def _too_many_files(request: Request, exc: StarletteHTTPException) -> ApiError | None:
    """Starlette's form parser stops at `max_files` parts with a 400 of its own ("Too many files...");
    answer what the API documents instead: 413 too_many_images (batch), 422 one_image_expected (/locate)."""
    cause, seen = exc.__context__, 0
    while cause is not None and not isinstance(cause, MultiPartException) and seen < 4:  # FastAPI may wrap it once more
        cause, seen = cause.__context__, seen + 1
    if exc.status_code != 400 or not isinstance(cause, MultiPartException) or not cause.message.startswith("Too many files"):
        return None
    if request.url.path == "/locate":
        return too_many_views(None, request.app.state.settings.max_batch)
    return too_many_images(None, request.app.state.settings.max_batch)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    translated = _too_many_files(request, exc)
    if translated is not None:
        return await _api_error(request, translated)
    code = STATUS_CODES.get(exc.status_code, "http_error")
    return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
    return JSONResponse({"error": "validation_error", "detail": detail}, status_code=422)


async def _area_error(request: Request, exc: AreaError) -> JSONResponse:
    """A bad area of interest (unknown code, not a polygon), or one that holds no cell for these photos:
    wherever it is found (the form, or the answer's restriction in a worker thread), 422 `bad_area`."""
    return await _api_error(request, ApiError(422, "bad_area", str(exc)))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s: %s\n%s", request.method, request.url.path, exc, traceback.format_exc())
    return JSONResponse({"error": "internal_error", "detail": "unexpected server error; it has been logged"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception as `{error, detail}` JSON."""
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(AreaError, _area_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
