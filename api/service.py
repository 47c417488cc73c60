"""The loaded predictor and what the endpoints share: admission (the slot counter of the 503 gate),
the worker-thread limiter, decoding, the answers, the explainer and the cached GeoJSON.

Requests to the locate routes take a slot of `Admission` in the request gate (middleware.py)
before their body is read; beyond `max_concurrency + max_queue` they are refused at once (503
with Retry-After). Decoding and inference then run in a worker thread (one hop per request)
under a capacity limiter of `max_concurrency`, so decoded pixels are bounded too.
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Callable

import anyio
import numpy as np
from PIL import Image

from pigeon.bundle import BackgroundVerify
from pigeon.explain import Explainer, heatmap_base64

from .logs import log
from .settings import Settings
from .uploads import DecodedImage, ProbedImage, UploadError, decode_probed, probe_image, upload_label

LARGE_REQUEST_PIXELS = 16_000_000  # after a request this large, freed heap pages go back to the OS


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (None elsewhere: musl, macOS). glibc keeps freed decode buffers in its
    arenas (one per worker thread) rather than returning them, so RSS would stay at its peak."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_memory() -> None:
    """Give freed heap pages back to the OS (after a large request)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def plain(x: Any) -> Any:
    """numpy scalars/arrays -> Python values (the predictor's dicts may carry them); NaN/inf -> None."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def round_coords(obj: Any, nd: int = 3) -> Any:
    """GeoJSON coordinates rounded to `nd` decimals (0.001 degree is ~100 m: plenty for a cell outline)."""
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, (list, tuple)):
        return [round_coords(v, nd) for v in obj]
    return obj


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 2)


def _all_failed(errors: list[UploadError]) -> UploadError:
    """The answer to a batch in which no image could be used: the items' status and code when they
    share them (400 `bad_image` otherwise), the detail naming every image."""
    if len(errors) == 1:
        return errors[0]
    same = len({(e.status, e.code) for e in errors}) == 1
    status, code = (errors[0].status, errors[0].code) if same else (400, "bad_image")
    return UploadError(status, code, f"none of the {len(errors)} images could be used: " + " | ".join(e.detail for e in errors))


class Admission:
    """The locate routes' slots: `capacity` requests in at once (in inference or waiting for it).

    Counted on the event loop only (one thread: no lock). The request gate takes a slot before it
    reads a byte of the body and gives it back when the response has ended, whatever happened.

    It also remembers when each client connection was last refused, for `hold_off`: a client that
    asks again before its Retry-After has passed, and finds no free slot, gets its 503 only once
    that Retry-After has passed. Without that, clients that retry at once keep the event loop busy
    answering 503s (uvicorn's per-request work, ~0.4 ms each on a small CPU) and the inference
    thread, which needs the same interpreter lock, starves: goodput fell to a quarter at 64 such
    clients even with the refusal itself taking microseconds.
    """

    MAX_REMEMBERED = 4096  # clients whose last refusal is remembered (expired ones are dropped first)

    def __init__(self, capacity: int, retry_after_s: int):
        self.capacity, self.retry_after_s = capacity, retry_after_s
        self.in_flight = 0
        self._refused_at: dict[Any, float] = {}

    def try_enter(self) -> bool:
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> str:
        return f"the server is busy ({self.in_flight} requests in progress or waiting); retry in {self.retry_after_s} s"

    def hold_off(self, client: Any) -> float:
        """Seconds until `client`'s last Retry-After has passed (0 when it was not refused, or has waited)."""
        t = self._refused_at.get(client) if client is not None else None
        return 0.0 if t is None else max(0.0, t + self.retry_after_s - time.monotonic())

    def refused(self, client: Any) -> None:
        """Remember that `client` was just refused (bounded: expired entries go first, then all)."""
        if client is None or not self.retry_after_s:
            return
        now = time.monotonic()
        if len(self._refused_at) >= self.MAX_REMEMBERED:
            self._refused_at = {c: t for c, t in self._refused_at.items() if t + self.retry_after_s > now}
            if len(self._refused_at) >= self.MAX_REMEMBERED:
                self._refused_at.clear()
        self._refused_at[client] = now


def _log_verification(check: BackgroundVerify) -> None:
    """The background check's end, in the service log: an error naming the part, or that all is verified."""
    if check.state == "failed":
        log.error(f"bundle verification failed: {check.error}; /locate answers 503 and /health 503 until the part is restored and the server restarted")
    else:
        log.info(f"bundle verified: {', '.join(check.parts)} hashed in full, matching the manifest")


class Service:
    """The loaded predictor plus the per-process state the endpoints share (limiter, caches, explainer)."""

    def __init__(self, predictor: Any, settings: Settings):
        self.predictor = predictor
        self.settings = settings
        self.admission = Admission(settings.max_concurrency + settings.max_queue, settings.retry_after_s)
        self._limiter: anyio.CapacityLimiter | None = None
        self._cells_json: bytes | None = None
        self._cells_lock = threading.Lock()
        # The explainer keeps no per-request state on the model (see pigeon.explain), so explanations
        # run beside plain requests under the same limiter, up to max_concurrency at once.
        head = predictor.head
        self.explainer = Explainer(predictor.backbone, lambda e: head(e))
        # JPEGs decode at reduced scale down to the model's input size (never below 224)
        self.draft_size = max(224, int(getattr(getattr(predictor, "backbone", None), "image_size", 224) or 224))
        # the large parts' full hash, in a background thread started with the service (`start_verification`):
        # until it is done /health says "verifying"; a mismatch makes /health 503 and /locate 503 naming the part
        self.verification = BackgroundVerify(getattr(predictor, "bundle", None), on_done=_log_verification)

    def start_verification(self) -> BackgroundVerify:
        """Start the background hash of the bundle's large parts (once; later calls return the same check)."""
        return self.verification.start()

    # -- admission and worker threads -------------------------------------------------------------
    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # must be created inside the running event loop
            self._limiter = anyio.CapacityLimiter(self.settings.max_concurrency)
        return self._limiter

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread, at most `max_concurrency` at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- lifecycle ---------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """One inference on a small synthetic image (the first forward pass is the slow one); returns ms."""
        t0 = time.perf_counter()
        self.predictor.locate([Image.new("RGB", (64, 48), (120, 130, 140))], top_k=1)
        return _ms(t0, time.perf_counter())

    def close(self) -> None:
        """Drop the caches (the GeoJSON); the predictor stays loaded so the app can start again."""
        self._cells_json = None

    # -- answers -----------------------------------------------------------------------------------
    def probe(self, data: bytes, label: str) -> ProbedImage:
        s = self.settings
        return probe_image(data, label=label, max_pixels=s.max_pixels, min_side=s.min_side)

    def check_budget(self, probed: list[ProbedImage]) -> None:
        """413 when the request's images add up to more pixels than `max_request_pixels` (from their
        headers, before anything is decoded)."""
        total, limit = sum(p.pixels for p in probed), self.settings.max_request_pixels
        if total > limit:
            raise UploadError(413, "too_many_pixels", f"the {len(probed)} images of this request are {total} pixels together (width x height, "
                                                      f"from their headers); the limit is {limit} pixels per request; send fewer or smaller images")

    def locate_one(self, data: bytes, label: str, top_k: int, explain: bool) -> dict[str, Any]:
        """Decode, locate and (optionally) explain one upload; runs in a worker thread."""
        t0 = time.perf_counter()
        probed = self.probe(data, label)
        self.check_budget([probed])
        dec = decode_probed(probed, self.draft_size)
        t1 = time.perf_counter()
        res = plain(self.predictor.locate([dec.image], top_k=top_k)[0])
        t2 = time.perf_counter()
        out = self._finish(res, dec)
        timings = dict(out["timings_ms"])
        if explain:
            out["explain"] = self.explain(dec.image, res)
            timings["explain_ms"] = _ms(t2, time.perf_counter())
        timings.update(decode_ms=_ms(t0, t1), locate_ms=_ms(t1, t2), total_ms=_ms(t0, time.perf_counter()))
        out["timings_ms"] = timings
        if probed.pixels > LARGE_REQUEST_PIXELS:
            release_memory()
        return out

    def locate_place(self, blobs: list[tuple[str | None, bytes]], top_k: int, combine: str | None) -> dict[str, Any]:
        """One answer for several views of one place; runs in a worker thread. Every view must be usable:
        the first that is not refuses the request with its own status, named `image[i] (name)`."""
        t0 = time.perf_counter()
        probed = [self.probe(data, upload_label(f"image[{i}]", name)) for i, (name, data) in enumerate(blobs)]
        self.check_budget(probed)
        decoded = [decode_probed(p, self.draft_size) for p in probed]  # one at a time: each full-size decode is dropped once reduced
        t1 = time.perf_counter()
        res = plain(self.predictor.locate_place([d.image for d in decoded], combine=combine, top_k=top_k))
        t2 = time.perf_counter()
        out = self._finish(res, decoded[0])
        out["exif_gps_present"] = any(d.exif_gps_present for d in decoded)
        out["view_images"] = [{"format": d.format, "width": d.width, "height": d.height} for d in decoded]
        out["timings_ms"] = {**out["timings_ms"], "decode_ms": _ms(t0, t1), "locate_ms": _ms(t1, t2), "total_ms": _ms(t0, time.perf_counter())}
        if sum(p.pixels for p in probed) > LARGE_REQUEST_PIXELS:
            release_memory()
        return out

    def _decode_all(self, blobs: list[tuple[str | None, bytes]]) -> tuple[list[DecodedImage | UploadError], int]:
        """Every upload decoded, or the error that names it; the request's pixel budget checked over
        all headers before the first decode (413 for the whole request). Returns (items, header pixels)."""
        probed: list[ProbedImage | UploadError] = []
        for i, (name, data) in enumerate(blobs):
            try:
                probed.append(self.probe(data, upload_label(f"images[{i}]", name)))
            except UploadError as e:
                probed.append(e)
        fine = [p for p in probed if isinstance(p, ProbedImage)]
        self.check_budget(fine)
        out: list[DecodedImage | UploadError] = []
        for p in probed:  # one at a time: each full-size decode is dropped once reduced
            try:
                out.append(decode_probed(p, self.draft_size) if isinstance(p, ProbedImage) else p)
            except UploadError as e:
                out.append(e)
        return out, sum(p.pixels for p in fine)

    def locate_many(self, blobs: list[tuple[str | None, bytes]], top_k: int) -> dict[str, Any]:
        """Per-item answers for a batch: one batched `locate` over the images that decode, an error
        entry `{error, detail, status}` for each one that does not. No usable image: that error."""
        t0 = time.perf_counter()
        decoded, pixels = self._decode_all(blobs)
        usable = [d for d in decoded if isinstance(d, DecodedImage)]
        if not usable:
            raise _all_failed([d for d in decoded if isinstance(d, UploadError)])
        t1 = time.perf_counter()
        results = iter(plain(self.predictor.locate([d.image for d in usable], top_k=top_k)))
        t2 = time.perf_counter()
        items = [{"filename": name, "result": self._finish(next(results), d)} if isinstance(d, DecodedImage) else {"filename": name, "error": d.as_item()}
                 for (name, _), d in zip(blobs, decoded)]
        if pixels > LARGE_REQUEST_PIXELS:
            release_memory()
        return {"results": items, "timings_ms": {"decode_ms": _ms(t0, t1), "locate_ms": _ms(t1, t2), "total_ms": _ms(t0, time.perf_counter())}}

    def locate_places(self, blobs: list[tuple[str | None, bytes]], places: list[str], top_k: int, combine: str | None) -> dict[str, Any]:
        """One answer per place label for a batch (all views embedded in one pass); a place with a view that
        cannot be used gets that view's error entry. No place usable: that error."""
        t0 = time.perf_counter()
        decoded, pixels = self._decode_all(blobs)
        order = list(dict.fromkeys(places))  # places in the order of their first file
        bad = {pl: d for pl, d in zip(places, decoded) if isinstance(d, UploadError)}
        good = [i for i, pl in enumerate(places) if pl not in bad]
        if not good:
            raise _all_failed(list(bad.values()))
        t1 = time.perf_counter()
        pred = self.predictor
        pp = pred.predict_places(pred.embed([decoded[i].image for i in good]), [places[i] for i in good], combine=combine, top_k=top_k)
        answers = {a.pop("place"): a for a in plain(pred.format_places(pp, top_k=top_k))}
        t2 = time.perf_counter()
        items = [self._place_item(pl, blobs, places, decoded, answers.get(pl), bad.get(pl)) for pl in order]
        if pixels > LARGE_REQUEST_PIXELS:
            release_memory()
        return {"results": items, "timings_ms": {"decode_ms": _ms(t0, t1), "locate_ms": _ms(t1, t2), "total_ms": _ms(t0, time.perf_counter())}}

    def _place_item(self, place: str, blobs: list[tuple[str | None, bytes]], places: list[str], decoded: list[Any],
                    res: dict[str, Any] | None, err: UploadError | None) -> dict[str, Any]:
        """A batch entry for one place: `{place, filenames, result}` or `{place, filenames, error}`."""
        mine = [i for i, pl in enumerate(places) if pl == place]
        item: dict[str, Any] = {"place": place, "filenames": [blobs[i][0] for i in mine]}
        if err is not None:
            item["error"] = err.as_item()
            return item
        views = [decoded[i] for i in mine]
        out = self._finish(res, views[0])
        out.update(exif_gps_present=any(d.exif_gps_present for d in views),
                   view_images=[{"format": d.format, "width": d.width, "height": d.height} for d in views])
        item["result"] = out
        return item

    @staticmethod
    def _finish(res: dict[str, Any], dec: DecodedImage) -> dict[str, Any]:
        out = dict(res)
        out["exif_gps_present"] = dec.exif_gps_present
        out["image"] = {"format": dec.format, "width": dec.width, "height": dec.height}
        out["timings_ms"] = {k: float(v) for k, v in (res.get("timings_ms") or {}).items() if isinstance(v, (int, float))}
        return out

    def explain(self, image: Image.Image, res: dict[str, Any]) -> dict[str, Any]:
        """Cue scores and the Grad-CAM heatmap of the answer's top cell."""
        cell = int(res["top_cells"][0]["cell_id"])
        am, emb = self.explainer.activation_map(image, cell)
        countries = [c.get("name") for c in res.get("countries", [])[:5] if c.get("name")]
        heat = heatmap_base64(image, am.heat)
        return {"cues": self.explainer.cues(emb, countries), "heatmap": {**heat, "method": am.method, "layer": am.layer, "cell_id": cell}}

    # -- metadata ----------------------------------------------------------------------------------
    def cells_geojson(self) -> bytes:
        """The cells as compact GeoJSON (simplified, coordinates rounded), built once."""
        with self._cells_lock:
            if self._cells_json is None:
                gj = self.predictor.cells.to_geojson(simplify=self.settings.cells_simplify)
                for f in gj.get("features", []):
                    geom = f.get("geometry") or {}
                    if "coordinates" in geom:
                        geom["coordinates"] = round_coords(geom["coordinates"])
                    f["properties"] = plain(f.get("properties", {}))
                self._cells_json = json.dumps(gj, separators=(",", ":")).encode()
            return self._cells_json

    @property
    def cells_cached(self) -> bytes | None:
        return self._cells_json

    def version(self) -> dict[str, Any]:
        bundle = self.predictor.bundle
        manifest = dict(getattr(bundle, "manifest", {}) or {})
        try:
            pv = package_version("pigeon-geo")
        except PackageNotFoundError:
            pv = manifest.get("pigeon_version", "0+unknown")
        return {"pigeon_version": pv, "backbone": getattr(bundle, "backbone_spec", None), "manifest": manifest}
