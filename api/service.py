"""The loaded predictor and what the endpoints share: admission (the slot counter of the 503 gate),
the worker-thread limiter, the batcher, decoding, the answers, the explainer, the metrics and the
cached GeoJSON.

Requests to the locate routes take a slot of `Admission` in the request gate (middleware.py)
before their body is read; beyond `max_concurrency + max_queue` they are refused at once (503
with Retry-After). Decoding, and later the answers, run in worker threads under a capacity limiter
of `max_concurrency`, so decoded pixels are bounded too; the backbone forward runs in the batcher
(batching.py), which gathers the images of concurrent requests into one forward, one at a time.

Every locate request, whatever its route and options, takes one path, `Service.locate`: probe each
upload's header, check the request's pixel budget (`uploads.check_request_pixels`), decode (a worker
thread); the usable images to the batcher, which embeds them in one backbone forward with those of
other requests in flight (awaited on the event loop); then the Predictor's answers
(`predict_embeddings` + `format`, or `predict_places` + `format_places`; a worker thread), to which
the service adds only what it knows of the uploads (`exif_gps_present`, `image`, `view_images`, and
the files' own EXIF position and capture time checked against the answer, `metadata`/`view_metadata`,
from `pigeon.exif`), the timings and the explanation.
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Callable, NamedTuple

import anyio
import numpy as np
from PIL import Image

from pigeon.bundle import BackgroundVerify
from pigeon.exif import metadata_fields
from pigeon.explain import Explainer, heatmap_base64
from pigeon.predictor import DEFAULT_OPTIONS, AnswerOptions

from .logs import log
from .batching import Batcher, Embedded
from .metrics import Metrics, bundle_build_id
from .settings import Settings
from .uploads import DecodedImage, ProbedImage, UploadError, check_request_pixels, decode_probed, probe_image, upload_label

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


class Upload(NamedTuple):
    """One uploaded file: how details name it (`image[1] (b.jpg)`), the client's file name, the bytes."""

    label: str
    filename: str | None
    data: bytes


@dataclass
class _Read:
    """A request's uploads after decoding (`Service._prepare`): what each entry is made of, the usable images."""

    decoded: list[DecodedImage | UploadError]
    pixels: int
    members: dict[Any, list[int]]   # entry -> its uploads
    bad: dict[Any, UploadError]     # entry -> why it cannot be answered
    use: list[int]                  # the uploads embedded (every upload of an answerable entry)
    groups: list[Any] | None        # their place labels (None: one answer per upload)

    @property
    def images(self) -> list[Image.Image]:
        return [self.decoded[i].image for i in self.use]  # type: ignore[union-attr]


@dataclass
class Located:
    """What `Service.locate` found: the entries (a result or an error each) and the request's timings."""

    entries: list[dict[str, Any]]
    timings: dict[str, float]
    stages_s: tuple[float, float] = (0.0, 0.0)   # head (+ refinement) and formatting, in seconds (the metrics)


ONE_PLACE = "same_place"  # the place label of /locate's views (any non-empty label: they are one place)


def _batch_uploads(blobs: list[tuple[str | None, bytes]]) -> list[Upload]:
    return [Upload(upload_label(f"images[{i}]", name), name, data) for i, (name, data) in enumerate(blobs)]


def _image_info(d: DecodedImage) -> dict[str, Any]:
    return {"format": d.format, "width": d.width, "height": d.height}


def _result(answer: dict[str, Any], views: list[DecodedImage], timings: dict[str, float], place: bool) -> dict[str, Any]:
    """The Predictor's answer plus the upload facts the service owns: `exif_gps_present` (any view's),
    `metadata` (+ `view_metadata` for a place) only when a file recorded a position or capture time
    (`pigeon.exif.metadata_fields`), `image` (the first view's), `view_images` (a place's views, in
    order) and `timings_ms`."""
    out = dict(answer)
    out["exif_gps_present"] = any(v.exif_gps_present for v in views)
    out.update(metadata_fields(answer, [v.metadata for v in views], several=place))
    out["image"] = _image_info(views[0])
    if place:
        out["view_images"] = [_image_info(v) for v in views]
    out["timings_ms"] = dict(timings)
    return out


def _answer_timings(stages: dict[str, float], n_answers: int, place: bool, strict: bool) -> dict[str, float]:
    """Each answer's own `timings_ms`, with the keys each route has always given: a photo's answer its
    share of the predictor's stages as `Predictor.locate` reports them (load_ms 0: uploads arrive
    decoded, decode_ms counts that), /locate's one place the stages as `Predictor.locate_place` does,
    a batch's places none (the batch's own timings_ms has them)."""
    if place and not strict:
        return {}
    share = {k: v / n_answers for k, v in stages.items()}
    share["total_ms"] = sum(share.values())
    return share if place else {"load_ms": 0.0, **share}


class Admission:
    """The locate routes' slots: `capacity` requests in at once (in inference or waiting for it).

    Counted on the event loop only (one thread: no lock). The request gate takes a slot before it
    reads a byte of the body and gives it back when the response has ended, whatever happened.

    A refusal is held: its 503 is sent only when its Retry-After has passed (an idle await: no slot,
    no body read, no thread), so a client that ignores Retry-After, even one that opens a new
    connection for every request, asks at most once per Retry-After. Answering at once let 64 such
    clients send 48,260 refusals in 20 s, and uvicorn's work per request (~0.4 ms on a small CPU)
    starved the inference thread of the interpreter lock: goodput fell to 0.29 of the 4-client
    figure. At most `max_held` refusals are held at once; beyond that a refusal is answered at once
    with `Connection: close`, so held sockets stay bounded.
    """

    def __init__(self, capacity: int, retry_after_s: int, max_held: int = 256):
        self.capacity, self.retry_after_s, self.max_held = capacity, retry_after_s, max_held
        self.in_flight = 0
        self.held = 0   # refusals waiting out their Retry-After

    def try_enter(self) -> bool:
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> str:
        return f"the server is busy ({self.in_flight} requests in progress or waiting); retry in {self.retry_after_s} s"

    def try_hold(self) -> bool:
        """Take a place among the held refusals (False when `max_held` are held, or Retry-After is 0)."""
        if not self.retry_after_s or self.held >= self.max_held:
            return False
        self.held += 1
        return True

    def release_hold(self) -> None:
        self.held -= 1


def _log_verification(check: BackgroundVerify) -> None:
    """The background check's end, in the service log: an error naming the part, or that all is verified."""
    if check.state == "failed":
        log.error(f"bundle verification failed: {check.error}; /locate answers 503 and /health 503 until the part is restored and the server restarted")
    else:
        log.info(f"bundle verified: {', '.join(check.parts)} hashed in full, matching the manifest")


class Service:
    """The loaded predictor plus the per-process state the endpoints share (limiter, batcher, caches, explainer, metrics)."""

    def __init__(self, predictor: Any, settings: Settings):
        self.predictor = predictor
        self.settings = settings
        self.admission = Admission(settings.max_concurrency + settings.max_queue, settings.retry_after_s, settings.max_held_refusals)
        self._limiter: anyio.CapacityLimiter | None = None
        self._cells_json: bytes | None = None
        self._cells_lock = threading.Lock()
        self.metrics = Metrics()
        # Concurrent requests meet here: up to max_batch_images images per forward, one forward at a time (it
        # takes every core, or the GPU); max_concurrency is the worker threads that decode and answer around it.
        self.batcher = Batcher(self._forward, settings.max_batch_images, settings.batch_wait_ms, max_running=1,
                               observe=self.metrics.observe_batch)
        # The explainer keeps no per-request state on the model (see pigeon.explain), so explanations
        # run beside plain requests under the same limiter, up to max_concurrency at once.
        head = predictor.head
        self.explainer = Explainer(predictor.backbone, lambda e: head(e))
        # JPEGs decode at reduced scale down to the model's input size (never below 224)
        self.draft_size = max(224, int(getattr(getattr(predictor, "backbone", None), "image_size", 224) or 224))
        # the large parts' full hash, in a background thread started with the service (`start_verification`):
        # until it is done /health says "verifying"; a mismatch makes /health 503 and /locate 503 naming the part
        self.verification = BackgroundVerify(getattr(predictor, "bundle", None), on_done=_log_verification)
        info = self.version()
        self.metrics.bind(lambda: self.admission.in_flight, self.queued, {
            "pigeon_version": str(info["pigeon_version"]), "backbone": str(info["backbone"]),
            "bundle_build": bundle_build_id(info["manifest"])})

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

    def queued(self) -> int:
        """Locate requests waiting: for a worker thread (decode or answers) or for a forward (the batcher)."""
        waiting = self._limiter.statistics().tasks_waiting if self._limiter is not None else 0
        return waiting + self.batcher.waiting

    def _forward(self, images: list[Image.Image]) -> np.ndarray:
        """The batcher's forward (in a worker thread): one `predictor.embed` over a batch's images."""
        return self.predictor.embed(images)

    # -- lifecycle ---------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """One inference on a small synthetic image (the first forward pass is the slow one); returns ms."""
        t0 = time.perf_counter()
        self.predictor.locate([Image.new("RGB", (64, 48), (120, 130, 140))], top_k=1)
        return _ms(t0, time.perf_counter())

    def close(self) -> None:
        """Drop the caches (the GeoJSON); the predictor stays loaded so the app can start again."""
        self._cells_json = None

    # -- answers: one path for every locate request -----------------------------------------------
    # /locate (one image, or views of one place with same_place) and /locate/batch (per file, or per
    # `place` label) differ only in how uploads map to answers and whether a bad upload refuses the
    # request; `locate` is the one flow, the four entry points below only name the uploads and shape the JSON.
    async def locate_one(self, data: bytes, filename: str | None, top_k: int, explain: bool,
                         options: AnswerOptions | None = None) -> dict[str, Any]:
        """POST /locate with one image: its answer (explained when asked); a refusal raises with its status."""
        return self._alone(await self.locate([Upload(upload_label("image", filename), filename, data)], top_k, strict=True, explain=explain,
                                             options=options))

    async def locate_place(self, blobs: list[tuple[str | None, bytes]], top_k: int, combine: str | None,
                           options: AnswerOptions | None = None) -> dict[str, Any]:
        """POST /locate with same_place: one answer for several views of one place. Every view must be
        usable: the first that is not refuses the request with its own status, named `image[i] (name)`."""
        uploads = [Upload(upload_label(f"image[{i}]", name), name, data) for i, (name, data) in enumerate(blobs)]
        return self._alone(await self.locate(uploads, top_k, places=[ONE_PLACE] * len(uploads), combine=combine, strict=True, options=options))

    async def locate_many(self, blobs: list[tuple[str | None, bytes]], top_k: int, options: AnswerOptions | None = None) -> dict[str, Any]:
        """POST /locate/batch: an entry per file, `{filename, result}` or `{filename, error}`."""
        return self._batch(await self.locate(_batch_uploads(blobs), top_k, options=options))

    async def locate_places(self, blobs: list[tuple[str | None, bytes]], places: list[str], top_k: int, combine: str | None,
                            options: AnswerOptions | None = None) -> dict[str, Any]:
        """POST /locate/batch with `place` labels: an entry per place, `{place, filenames, result | error}`."""
        return self._batch(await self.locate(_batch_uploads(blobs), top_k, places=places, combine=combine, options=options))

    async def locate(self, uploads: list[Upload], top_k: int, *, places: list[str] | None = None, combine: str | None = None,
                     strict: bool = False, explain: bool = False, options: AnswerOptions | None = None) -> Located:
        """The flow of every locate request: probe every upload, check the request's pixel budget, decode
        (a worker thread), then the usable images' embeddings from the batcher (one backbone forward,
        shared with the other requests in flight) and the Predictor's answers (a worker thread), one per
        upload (`places` None) or one per place label (`places`: one per upload; entries in the order of
        each place's first file).

        `strict`: every upload must be usable, the first refusal raises (the /locate routes). Otherwise a
        refused upload is its entry's error (a place with several gets the last one's, as before) and its
        place's other views are not used; when no entry can be answered, `_all_failed` is raised.
        `explain`: one upload only (the router refuses more); the explanation runs unbatched, after the answer.
        `options`: what the answers carry beyond the default (`pigeon.predictor.AnswerOptions`)."""
        if explain and len(uploads) != 1:
            raise ValueError("explain works on one upload")
        t0 = time.perf_counter()
        with self.batcher.on_the_way():   # a batch about to start may wait for this request's images
            try:
                read = await self.run(self._prepare, uploads, places, strict)
            finally:
                self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        t1 = time.perf_counter()
        got = await self.batcher.embed(read.images)
        t2 = time.perf_counter()
        located = await self.run(self._finish, read, got, uploads, top_k, places is not None, combine, strict, explain, (t0, t1, t2),
                                 options or DEFAULT_OPTIONS)
        m = self.metrics
        m.head_seconds.observe(located.stages_s[0])
        m.format_seconds.observe(located.stages_s[1])
        m.locate_seconds.observe(time.perf_counter() - t0)
        return located

    def _prepare(self, uploads: list[Upload], places: list[str] | None, strict: bool) -> _Read:
        """(Worker thread.) The uploads read and decoded (`_read`), sorted into entries: which can be
        answered, which images go to the forward. Raises `_all_failed` when no entry can be answered."""
        decoded, pixels = self._read(uploads, strict)
        units: list[Any] = list(range(len(uploads))) if places is None else list(places)  # the entry each upload answers in
        members: dict[Any, list[int]] = {}
        bad: dict[Any, UploadError] = {}
        for i, (u, d) in enumerate(zip(units, decoded)):
            members.setdefault(u, []).append(i)
            if isinstance(d, UploadError):
                bad[u] = d
        use = [i for i, u in enumerate(units) if u not in bad]
        if not use:
            raise _all_failed(list(bad.values()))
        return _Read(decoded, pixels, members, bad, use, None if places is None else [units[i] for i in use])

    def _finish(self, read: _Read, got: Embedded, uploads: list[Upload], top_k: int, place: bool, combine: str | None,
                strict: bool, explain: bool, marks: tuple[float, float, float], options: AnswerOptions) -> Located:
        """(Worker thread.) The Predictor's answers from the request's embeddings, as entries, with the timings."""
        t0, t1, t2 = marks
        answers, stages = self._answers(got.embeddings, read.groups, top_k, combine, options)
        stages = {"embed_ms": (t2 - t1) * 1e3, **stages}  # the request's wait for its batch and the batch's forward
        by_entry = dict(zip(read.use, answers)) if isinstance(answers, list) else answers
        t3 = time.perf_counter()
        shares = _answer_timings(stages, len(by_entry), place, strict)
        ok = read.decoded
        entries = []
        for u, idx in read.members.items():
            names = [uploads[i].filename for i in idx]
            entry: dict[str, Any] = {"filename": names[0]} if not place else {"place": u, "filenames": names}
            if u in read.bad:
                entry["error"] = read.bad[u].as_item()
            else:
                entry["result"] = _result(by_entry[u], [ok[i] for i in idx], shares, place)  # type: ignore[misc]
            entries.append(entry)
        timings = {"decode_ms": _ms(t0, t1), "locate_ms": _ms(t1, t3)}
        if explain:
            entries[0]["result"]["explain"] = self.explain(read.images[0], entries[0]["result"])
            timings["explain_ms"] = _ms(t3, time.perf_counter())
        timings["total_ms"] = _ms(t0, time.perf_counter())
        if read.pixels > LARGE_REQUEST_PIXELS:
            release_memory()
        return Located(entries, timings, (stages["head_ms"] / 1e3, stages["format_ms"] / 1e3))

    def _read(self, uploads: list[Upload], strict: bool) -> tuple[list[DecodedImage | UploadError], int]:
        """Every upload probed (header only), the request's pixel budget checked over the usable headers
        (413 for the whole request), then each decoded, one at a time (each full-size decode is dropped
        once reduced). A refusal raises at once when `strict`, else it stands in the upload's place.
        Returns (items, header pixels of the usable uploads)."""
        probed: list[ProbedImage | UploadError] = []
        for up in uploads:
            try:
                probed.append(self.probe(up.data, up.label))
            except UploadError as e:
                if strict:
                    raise
                probed.append(e)
        pixels = check_request_pixels([p for p in probed if isinstance(p, ProbedImage)], self.settings.max_request_pixels)
        decoded: list[DecodedImage | UploadError] = []
        for p in probed:
            try:
                decoded.append(decode_probed(p, self.draft_size) if isinstance(p, ProbedImage) else p)
            except UploadError as e:
                if strict:
                    raise
                decoded.append(e)
        return decoded, pixels

    def _answers(self, emb: np.ndarray, groups: list[Any] | None, top_k: int, combine: str | None,
                 options: AnswerOptions) -> tuple[list[dict[str, Any]] | dict[Any, dict[str, Any]], dict[str, float]]:
        """The Predictor's formatted answers for the images' embeddings `emb`: a list, one per image
        (`groups` None), or a dict place label -> answer (`groups`: each image's place). Also the
        stages' ms (head, format) for the answers' own timings."""
        pred = self.predictor
        t1 = time.perf_counter()
        if groups is None:
            arrays = pred.predict_embeddings(emb, top_k=top_k, options=options)
            t2 = time.perf_counter()
            answers: Any = plain(pred.format(arrays, top_k=top_k, options=options))
        else:
            pp = pred.predict_places(emb, groups, combine=combine, top_k=top_k, options=options)
            t2 = time.perf_counter()
            answers = {a.pop("place"): a for a in plain(pred.format_places(pp, top_k=top_k, options=options))}
        t3 = time.perf_counter()
        return answers, {"head_ms": (t2 - t1) * 1e3, "format_ms": (t3 - t2) * 1e3}

    @staticmethod
    def _alone(located: Located) -> dict[str, Any]:
        """The /locate JSON: the one entry's answer, the request's timings added to its own."""
        out = located.entries[0]["result"]
        out["timings_ms"] = {**out["timings_ms"], **located.timings}
        return out

    @staticmethod
    def _batch(located: Located) -> dict[str, Any]:
        """The /locate/batch JSON: the entries and the request's timings."""
        return {"results": located.entries, "timings_ms": located.timings}

    def probe(self, data: bytes, label: str) -> ProbedImage:
        """Header-only check of one upload against the per-image limits (uploads.probe_image)."""
        s = self.settings
        return probe_image(data, label=label, max_pixels=s.max_pixels, min_side=s.min_side)

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
