"""FastAPI dependencies: the service and settings of the app, the API key, the query-string guard.

- `require_api_key` is added to the protected routers (locate, cells, /version, /metrics) by `create_app`
  only when a key is configured, so `/openapi.json` shows the `X-API-Key` scheme exactly when the
  server enforces it. The page, `/static`, the docs and `/health` never need it. On the locate
  routes the request gate (middleware.py) checks the key too, before the upload is read.
- `no_query_params` refuses a query string on the locate routes: their options are form fields,
  and a `?top_k=3` that is silently ignored would answer a question the client did not ask.
- Admission (the 503 gate) is not a dependency: FastAPI parses the form before dependencies run,
  so it lives in the request gate, which decides before reading the body.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Optional

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from .errors import ApiError
from .service import Service
from .settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="the server's key (PIGEON_API_KEY); required on /locate, /locate/batch, /cells, /version and /metrics when the server has one",
    auto_error=False,  # our own 401 below, in the {error, detail} shape
)

UNAUTHORIZED = "missing or wrong API key; send it in the X-API-Key header"


def key_matches(given: Optional[str], want: str) -> bool:
    """The client's key equals the server's (constant-time compare; a missing key never matches)."""
    return given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), want.encode("ascii"))


def get_service(request: Request) -> Service:
    """The app's `Service` (made once by `create_app`)."""
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    """The app's `Settings`."""
    return request.app.state.settings


async def require_api_key(
    key: Annotated[Optional[str], Security(api_key_header)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> None:
    """401 unless `X-API-Key` equals the configured key."""
    if settings.api_key is not None and not key_matches(key, settings.api_key):
        raise ApiError(401, "unauthorized", UNAUTHORIZED)


async def bundle_intact(request: Request) -> None:
    """503 `bundle_damaged` naming the part once the background verification found a bundle part that does
    not match its sha256 (the answers would come from damaged data); while it is still running, nothing."""
    check = get_service(request).start_verification()
    if check.state == "failed":
        raise ApiError(503, "bundle_damaged", f"{check.error}; this server answers no /locate until the part is restored and the server restarted")


async def no_query_params(request: Request) -> None:
    """422 naming the query parameters sent to a route that reads none (its options are form fields)."""
    names = list(dict.fromkeys(request.query_params.keys()))
    if names:
        raise ApiError(422, "validation_error", [
            {"loc": ["query", n], "msg": f"{n} is not read from the query string; send it as a multipart form field (curl -F {n}=...)",
             "type": "extra_forbidden"} for n in names])


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
