"""The service's Prometheus metrics (`GET /metrics`), through the official `prometheus-client`.

Each app has its own `CollectorRegistry` (not the process-global one: a process may hold many
apps, as the tests do, and each must count only its own requests). What is counted where:

- the request gate (middleware.py), once a response has ended: requests by route, method and
  status, their latency (gate in to the last byte out), and every answer with status >= 400 by its
  `error` code (`pigeon_refusals_total`: 401 `unauthorized`, 503 `overloaded`, 408
  `request_timeout`, 413 `payload_too_large` / `too_many_pixels` / `too_many_images`, ...);
- the service (service.py), per locate request: decode, the wait for a batch, head (+ refinement),
  formatting, and the request's whole locate path; per batch (the batcher's `observe`): the
  forward's time and its size in images and requests;
- at scrape time: admitted locate requests (in flight) and those waiting, for a worker thread or
  for a forward (queued);
- `pigeon_build_info`: pigeon's version, the backbone, the bundle's build id (a hash of the sha256
  of its parts, as the manifest lists them: it changes whenever any part is rebuilt).

Route labels are the app's routes (`/locate`, `/static` for every static file, `other` for any
path the app does not serve), so a client cannot grow the label set.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from .batching import BatchStats

ROUTES = frozenset({"/locate", "/locate/batch", "/health", "/version", "/cells", "/metrics", "/", "/docs", "/docs/oauth2-redirect",
                    "/redoc", "/openapi.json"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "bundle_build_id", "error_code", "route_label"]


def route_label(path: str) -> str:
    """The route a path belongs to, for labels: a known route, `/static`, or `other`."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


def error_code(body: bytes, fallback: str) -> str:
    """The `error` code of an `{error, detail}` body (`fallback` when there is none, or it is not a plain code)."""
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return fallback
    return code if isinstance(code, str) and _CODE.match(code) else fallback


def bundle_build_id(manifest: dict[str, Any] | None) -> str:
    """A short id of the bundle's build: sha256 over its parts' names and sha256s ("unknown" without a manifest)."""
    parts = (manifest or {}).get("parts") or {}
    if not parts:
        return "unknown"
    text = "\n".join(f"{name}:{(meta or {}).get('sha256', '')}" for name, meta in sorted(parts.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Metrics:
    """One app's metrics and their registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pigeon_requests", "HTTP requests answered, by route, method and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("pigeon_request_duration_seconds", "HTTP request latency, from the gate to the end of the response "
                                         "(the upload included), by route", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("pigeon_refusals", "answers with status >= 400, by status and `error` code (401 unauthorized, 503 overloaded, "
                                "408 request_timeout, 413 payload_too_large / too_many_pixels / too_many_images, ...)", ["status", "reason"], registry=r)
        self.decode_seconds = Histogram("pigeon_decode_seconds", "per locate request: probing, the pixel budget and decoding of its uploads",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_wait_seconds = Histogram("pigeon_batch_wait_seconds", "per locate request: from its images reaching the batcher to the "
                                            "start of their forward", buckets=LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("pigeon_forward_seconds", "per batch: the backbone forward (preprocessing included)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.head_seconds = Histogram("pigeon_head_seconds", "per locate request: the head and the gallery refinement",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.format_seconds = Histogram("pigeon_format_seconds", "per locate request: formatting the answers (countries, regions, radii)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.locate_seconds = Histogram("pigeon_locate_seconds", "per locate request: its whole locate path, decode to answer (total_ms)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("pigeon_batch_images", "images per backbone forward", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("pigeon_batch_requests", "requests per backbone forward", buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("pigeon_in_flight_requests", "locate requests admitted (reading, decoding, waiting or in inference)", registry=r)
        self.queued = Gauge("pigeon_queued_requests", "locate requests waiting: for a worker thread, or for a forward", registry=r)
        self.build = Info("pigeon_build", "the running build: pigeon version, backbone, bundle build id", registry=r)

    def bind(self, in_flight: Callable[[], float], queued: Callable[[], float], build: dict[str, str]) -> None:
        """The gauges read at scrape time, and the build info."""
        self.in_flight.set_function(in_flight)
        self.queued.set_function(queued)
        self.build.info(build)

    def observe_request(self, path: str, method: str, status: int, seconds: float, code: str | None) -> None:
        """One HTTP exchange, when its response has ended (the request gate)."""
        route = route_label(path)
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)
        if status >= 400:
            self.refusals.labels(str(status), code or "http_error").inc()

    def observe_batch(self, b: BatchStats) -> None:
        """One backbone forward (the batcher's `observe`)."""
        self.forward_seconds.observe(b.forward_s)
        self.batch_images.observe(b.images)
        self.batch_requests.observe(b.requests)
        for w in b.waited_s:
            self.batch_wait_seconds.observe(w)

    def observe_locate(self, decode_s: float, head_s: float, format_s: float, total_s: float) -> None:
        self.decode_seconds.observe(decode_s)
        self.head_seconds.observe(head_s)
        self.format_seconds.observe(format_s)
        self.locate_seconds.observe(total_s)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
