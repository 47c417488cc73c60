"""The one pure-ASGI middleware in front of the app: request id, body-size limit, body timeout,
API key and admission for the locate routes, JSON access log.

It has to be middleware (not dependencies): FastAPI reads the multipart body before any
dependency runs, and these decisions must come before the body is read.

- Content-Length is checked up front; a chunked or lying body is counted while it streams and
  cut off with 413 the moment it passes the limit.
- On the locate routes (`POST /locate`, `POST /locate/batch`) the API key is checked (401) and a
  slot taken (503 + Retry-After when all `max_concurrency + max_queue` are taken) before a byte of
  the body is read: a refusal costs microseconds however large the upload, so clients that retry
  at once cannot crowd out the requests being served. The slot is given back when the response
  has ended, whatever happened (error, cancellation, client gone).
- An admitted upload must arrive whole within `body_timeout_s` of its admission, and, after a
  grace of `UPLOAD_GRACE_S`, at `min_upload_bytes_per_s` on average; otherwise it is cut off (408).
  So neither a stalled client nor one that trickles a byte at a time can hold a slot for long.
- A refusal (503) is held until its Retry-After has passed (see `Admission`), so clients that
  ignore it, reconnecting or not, cannot crowd the event loop with refusals.
- When an exchange has ended, it is counted in the app's metrics (metrics.py): route, method,
  status, latency, and for an answer >= 400 its `error` code.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Optional

import anyio

from .deps import UNAUTHORIZED, key_matches
from .errors import STATUS_CODES, error_body
from .logs import access_log
from .metrics import Metrics, error_code
from .service import Admission

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the image bytes
UPLOAD_GRACE_S = 5.0  # the minimum upload rate is measured from admission + this (connection set-up, a slow first packet)
LOCATE_PATHS = frozenset({"/locate", "/locate/batch"})


class _BodyCut(Exception):
    """The body was cut off (too large, or stalled); the answer is in `_Exchange.cut`."""


class _Exchange:
    """One request's bookkeeping as it passes the gate: id, status sent, bytes read, limit state."""

    def __init__(self, scope: dict, send: Any, limit: int, body_timeout_s: float, min_rate: float = 0.0):
        self.t0 = time.perf_counter()
        self.scope, self.send, self.limit, self.body_timeout_s, self.min_rate = scope, send, limit, body_timeout_s, min_rate
        self.headers = dict(scope["headers"])
        self.rid = self.headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        self.status, self.read = 0, 0
        self.code: Optional[str] = None   # the `error` code of an answer >= 400 (the metrics)
        self.started = self.swallow = self.body_done = False
        self.cut: Optional[tuple[int, str, str]] = None  # (status, code, detail) once the body was cut off
        self.t_admitted = anyio.current_time()   # event-loop clock; reset when a slot is taken

    async def error(self, status: int, code: str, detail: Any, close: bool = False, extra: Optional[list] = None) -> None:
        """Answer `{error, detail}` JSON here, without the app."""
        body = error_body(code, detail)
        self.code = code
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"x-request-id", self.rid.encode("latin-1"))]
        headers += extra or []
        if close:
            headers.append((b"connection", b"close"))
        self.status, self.started = status, True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def send_wrapped(self, msg: dict) -> None:
        """The app's `send`: adds X-Request-Id; replaces the answer with 413/408 when the body was cut off
        inside the app (FastAPI turns any error while parsing the form into its own 400)."""
        if msg["type"] == "http.response.start":
            if self.cut and not self.started:
                self.swallow = True
                await self.error(*self.cut, close=True)
                return
            self.started, self.status = True, msg["status"]
            msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", self.rid.encode("latin-1"))]}
        elif self.swallow:
            return
        elif self.status >= 400 and self.code is None and msg["type"] == "http.response.body":
            self.code = error_code(msg.get("body", b""), STATUS_CODES.get(self.status, "http_error"))
        await self.send(msg)

    def limited(self, receive: Any) -> Any:
        """The app's `receive`: counts body bytes, stops reading past the limit or after `body_timeout_s` of silence."""

        async def receive_limited() -> dict:
            if self.body_done:  # after the body, receive() only waits for the disconnect: no timeout
                return await receive()
            with anyio.move_on_at(self._give_up_at()) as scope:
                msg = await receive()
            if scope.cancelled_caught:
                self._cut_slow()
            if msg["type"] == "http.request":
                self.read += len(msg.get("body", b""))
                if self.read > self.limit:
                    self.cut = (413, "payload_too_large", too_large_detail(self.limit))
                    raise _BodyCut()
                self.body_done = not msg.get("more_body", False)
                if not self.body_done and anyio.current_time() >= self._give_up_at():
                    self._cut_slow()
            return msg

        return receive_limited

    def _give_up_at(self) -> float:
        """When the body must have arrived (the whole-body deadline), or, sooner, when the bytes read so
        far fall below the minimum average rate (event-loop clock)."""
        start = self.t_admitted
        at = start + self.body_timeout_s
        if self.min_rate > 0:
            at = min(at, start + UPLOAD_GRACE_S + self.read / self.min_rate)
        return at

    def _cut_slow(self) -> None:
        """Cut the upload off as too slow: 408, with what was asked of it."""
        rate = f" and at {self.min_rate / 1024:g} KiB/s on average" if self.min_rate > 0 else ""
        self.cut = (408, "request_timeout", f"the upload did not arrive within {self.body_timeout_s:g} s{rate} "
                                            f"({self.read} bytes read); it was cut off: send it again over a faster connection")
        raise _BodyCut()

    def log_line(self) -> str:
        client = self.scope.get("client")
        return json.dumps({
            "ts": round(time.time(), 3), "request_id": self.rid, "method": self.scope["method"], "path": self.scope["path"],
            "status": self.status or 500, "duration_ms": round((time.perf_counter() - self.t0) * 1000, 2),
            "bytes_in": self.read, "client": client[0] if client else None,
        })


def too_large_detail(limit: int) -> str:
    mb = (limit - MULTIPART_SLACK) / (1024 * 1024)
    return f"the request body is over the {mb:g} MB limit; send a smaller image"


class RequestGate:
    """Pure ASGI middleware: request id, body limits, key and admission before the body, JSON access log."""

    def __init__(self, app: Any, max_upload_bytes: int, admission: Admission, api_key: Optional[str] = None, body_timeout_s: float = 30.0,
                 min_upload_bytes_per_s: float = 0.0, metrics: Optional[Metrics] = None):
        self.app = app
        self.limit = max_upload_bytes + MULTIPART_SLACK
        self.admission, self.api_key, self.body_timeout_s, self.min_rate = admission, api_key, body_timeout_s, min_upload_bytes_per_s
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(scope, send, self.limit, self.body_timeout_s, self.min_rate)
        try:
            if await self._refused_by_length(ex):
                return
            if scope["method"] == "POST" and scope["path"] in LOCATE_PATHS:
                await self._admit_and_forward(ex, receive)
            else:
                await self._forward(ex, receive)
        finally:
            if self.metrics is not None:
                status = ex.status or 500
                self.metrics.observe_request(scope["path"], scope["method"], status, time.perf_counter() - ex.t0,
                                             ex.code or STATUS_CODES.get(status, "http_error"))
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(ex.log_line())

    async def _admit_and_forward(self, ex: _Exchange, receive: Any) -> None:
        """The locate routes: key (401), then a slot (503), both before the body; the slot back at the end."""
        if self.api_key is not None:
            given = ex.headers.get(b"x-api-key")
            if not key_matches(given.decode("latin-1") if given is not None else None, self.api_key):
                await ex.error(401, "unauthorized", UNAUTHORIZED)
                return
        adm = self.admission
        if not adm.try_enter():
            await self._refuse(ex)
            return
        ex.t_admitted = anyio.current_time()
        try:
            await self._forward(ex, receive)
        finally:
            adm.leave()

    async def _refuse(self, ex: _Exchange) -> None:
        """503 + Retry-After, sent when the Retry-After has passed (nothing read, no slot held); when
        `max_held` refusals are already waiting, at once and closing the connection."""
        adm = self.admission
        extra = [(b"retry-after", str(adm.retry_after_s).encode())]
        if not adm.try_hold():
            await ex.error(503, "overloaded", adm.refusal(), close=bool(adm.retry_after_s), extra=extra)
            return
        try:
            await anyio.sleep(adm.retry_after_s)
        finally:
            adm.release_hold()
        await ex.error(503, "overloaded", adm.refusal(), extra=extra)

    async def _refused_by_length(self, ex: _Exchange) -> bool:
        """Refuse up front (400/413) a Content-Length that is not a number or over the limit."""
        cl = ex.headers.get(b"content-length")
        if cl is None:
            return False
        try:
            n = int(cl)
        except ValueError:
            await ex.error(400, "bad_request", "Content-Length is not a number")
            return True
        if n > self.limit:
            await ex.error(413, "payload_too_large", too_large_detail(self.limit), close=True)
            return True
        return False

    async def _forward(self, ex: _Exchange, receive: Any) -> None:
        """Run the app with the guarded `receive`; a body cut off mid-stream becomes a 413 (too large) or 408 (stalled)."""
        try:
            await self.app(ex.scope, ex.limited(receive), ex.send_wrapped)
        except Exception:
            if not ex.cut:
                raise
            if not ex.started:
                await ex.error(*ex.cut, close=True)
