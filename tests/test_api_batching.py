"""Batched serving (api/batching.py) and the metrics (GET /metrics), through the real app on the tiny bundle.

Concurrent locate requests meet in the batcher and share one backbone forward; every answer must be
the answer its request gets alone (same top cell, coordinates within 1 m), per-item errors and
refusals keep working, a lone request does not wait, and a fault in a shared forward stays with the
request that caused it. The metrics are read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pigeon.api import Settings, create_app
from pigeon.api.batching import Batcher
from pigeon.core.errors import UserError
from api_support import BlockingPredictor, encode, photo, tiny_predictor

torch.set_num_threads(2)


class GatedForwards:
    """The real predictor; records each forward's size, and holds its first forward until `release`
    (so the requests sent meanwhile gather in the batcher)."""

    def __init__(self, inner, hold_first: bool = True):
        self.inner, self.forwards = inner, []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold_first:
            self.release.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images):
        self.forwards.append(len(images))
        self.entered.set()
        self.release.wait(30)
        return self.inner.embed(images)


def _km(a: dict, b: dict) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a["lat"], a["lon"], b["lat"], b["lon"]))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(min(1.0, h)))


def _same_answer(got: dict, want: dict) -> None:
    """The batched answer equals the one computed alone: same top cells, coordinates within 1 m, the
    same probabilities (1e-4 relative), the same keys and upload facts."""
    assert got.keys() == want.keys()
    assert [c["cell_id"] for c in got["top_cells"]] == [c["cell_id"] for c in want["top_cells"]]
    assert _km(got, want) < 0.001, (got["lat"], got["lon"], want["lat"], want["lon"])
    assert got["confidence"] == pytest.approx(want["confidence"], rel=1e-4)
    assert [c["probability"] for c in got["top_cells"]] == pytest.approx([c["probability"] for c in want["top_cells"]], rel=1e-4, abs=1e-7)
    assert [c["name"] for c in got["countries"]] == [c["name"] for c in want["countries"]]
    for key in ("image", "exif_gps_present", "views", "view_images", "combine", "region_at_answer"):
        assert got.get(key) == want.get(key), key


def _requests(n: int) -> list[tuple[str, list, dict]]:
    """`n` requests: plain /locate, /locate with same_place (2-3 views), /locate/batch (one of them with a GIF)."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 2):
            out.append(("/locate", [("image", (f"p{i}.jpg", encode(photo(96 + 8 * (i % 5), 72, seed=100 + i)), "image/jpeg"))], {"top_k": "3"}))
        elif kind == 1:
            views = [("image", (f"v{i}-{j}.png", encode(photo(80, 64 + 8 * j, seed=200 + 10 * i + j), "PNG"), "image/png")) for j in range(2 + i % 2)]
            out.append(("/locate", views, {"top_k": "3", "same_place": "true", "combine": ("mean", "product", "both")[i % 3]}))
        else:
            files = [("images", (f"b{i}-{j}.jpg", encode(photo(90, 70, seed=300 + 10 * i + j)), "image/jpeg")) for j in range(2)]
            if i % 8 == 3:
                files.insert(1, ("images", ("bad.gif", encode(photo(), "GIF"), "image/gif")))
            out.append(("/locate/batch", files, {"top_k": "2"}))
    return out


def _answers(r: httpx.Response) -> list[dict | None]:
    """The answers of a response, comparable: /locate's one, /locate/batch's per entry (None for an error entry)."""
    assert r.status_code == 200, r.text
    body = r.json()
    if "results" in body:
        return [e.get("result") for e in body["results"]]
    return [body]


def test_32_requests_in_flight_share_forwards_and_get_their_alone_answers():
    """32 requests in flight at once (plain, same_place and batches, one with a bad file), default
    max_concurrency 1: the first forward is held until the other 31 wait in the batcher, so they are
    served in shared forwards of up to max_batch_images. Each answer equals the one its request got
    alone, one at a time."""
    pred = GatedForwards(tiny_predictor(), hold_first=False)
    app = create_app(pred, Settings(max_queue=64, max_batch_images=16, batch_wait_ms=0, warmup=False))  # the first forward: one request
    svc = app.state.service
    reqs = _requests(32)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            alone = [_answers(await c.post(path, files=files, data=data)) for path, files, data in reqs]
            n_alone = len(pred.forwards)
            pred.release.clear()
            pred.entered.clear()
            tasks = [asyncio.create_task(c.post(path, files=files, data=data)) for path, files, data in reqs]
            await asyncio.get_running_loop().run_in_executor(None, pred.entered.wait, 30)
            t_end = time.monotonic() + 60
            while (svc.admission.in_flight < len(reqs) or svc.batcher.coming or svc.batcher.waiting < len(reqs) - 1) and time.monotonic() < t_end:
                await asyncio.sleep(0.01)
            waiting = svc.batcher.waiting
            pred.release.set()
            together = await asyncio.gather(*tasks)
            metrics = (await c.get("/metrics")).text
            return alone, n_alone, waiting, together, metrics

    alone, n_alone, waiting, together, metrics = asyncio.run(scenario())
    assert n_alone == len(reqs)  # one at a time: one forward each
    assert waiting == len(reqs) - 1
    shared = pred.forwards[n_alone:]
    n_images = sum(pred.forwards[:n_alone])
    assert sum(shared) == n_images and max(shared) <= 16
    assert len(shared) <= 1 + math.ceil((n_images - shared[0]) / 16) + 2, shared  # a few full forwards, not one per request
    for (path, _, _), got, want in zip(reqs, together, alone):
        got = _answers(got)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if w is None:  # the batch's bad file: its error entry, as alone
                assert g is None
                continue
            g, w = dict(g), dict(w)
            g.pop("timings_ms"), w.pop("timings_ms")
            _same_answer(g, w)
    bad = [e for r in together for e in r.json().get("results", []) if "error" in e]
    assert len(bad) == 4 and all(e["error"]["status"] == 415 and e["filename"] == "bad.gif" for e in bad)
    fam = _families(metrics)
    assert _value(fam, "pigeon_batch_requests", "count") == len(pred.forwards)
    assert _value(fam, "pigeon_batch_images", "sum") == 2 * n_images
    assert _bucket(fam, "pigeon_batch_requests", "1.0") < len(pred.forwards)  # some forward served several requests


def test_a_lone_request_never_waits_and_a_batch_waits_at_most_batch_wait_ms():
    """An idle server starts a lone request's forward at once, whatever batch_wait_ms; a batch waits for
    requests still decoding at most batch_wait_ms after its first arrived; with 0 it never waits."""
    app = create_app(tiny_predictor(), Settings(batch_wait_ms=1000, warmup=False))
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/locate", files={"image": ("a.jpg", encode(photo()), "image/jpeg")}).status_code == 200
        fam = _families(c.get("/metrics").text)
    assert _value(fam, "pigeon_batch_wait_seconds", "count") == 3
    assert _value(fam, "pigeon_batch_wait_seconds", "sum") < 0.3  # nothing else on its way: no wait (1 s each otherwise)

    async def waited(wait_ms: float) -> float:
        b = Batcher(lambda ims: torch.zeros(len(ims), 4).numpy(), max_images=8, wait_ms=wait_ms)
        with b.on_the_way():  # another request decoding, which never arrives
            t = time.perf_counter()
            got = await b.embed(["x"])
        assert got.embeddings.shape == (1, 4) and got.batch_requests == 1
        assert got.wait_ms <= (time.perf_counter() - t) * 1000 + 1
        return got.wait_ms

    assert 150 <= asyncio.run(waited(200)) < 600
    assert asyncio.run(waited(0)) < 50


def test_batches_take_requests_whole_in_arrival_order_up_to_max_images():
    """A request is never split: with max_images 4, requests of 3, 2, 5, 1 and 1 images go as [3], [2],
    [5] (over the limit: alone), [1, 1]; each gets its own rows back."""
    sizes: list[int] = []
    started, release = threading.Event(), threading.Event()

    def forward(images):
        sizes.append(len(images))
        started.set()
        release.wait(10)
        return torch.tensor([[float(x), 0.0] for x in images]).numpy()

    async def scenario():
        b = Batcher(forward, max_images=4, wait_ms=0)
        first = asyncio.create_task(b.embed([0]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        groups = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12]]
        tasks = [asyncio.create_task(b.embed(g)) for g in groups]
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.embed([99]))   # cancelled while it waits: it leaves the queue
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        release.set()
        return await first, groups, await asyncio.gather(*tasks)

    first, groups, got = asyncio.run(scenario())
    assert sizes == [1, 3, 2, 5, 2]
    assert first.embeddings[:, 0].tolist() == [0.0]
    for g, e in zip(groups, got):
        assert e.embeddings[:, 0].tolist() == [float(x) for x in g]
    assert [e.batch_images for e in got] == [3, 2, 5, 2, 2]


def test_a_fault_in_a_shared_forward_stays_with_its_request():
    """A forward that fails on one request's image: the shared forward fails, each request is forwarded
    again alone, and only that request answers 500; the others are answered."""

    class Faulty(GatedForwards):
        def embed(self, images):
            self.forwards.append(len(images))
            self.entered.set()
            self.release.wait(30)
            if any(im.size[0] == 77 for im in images):
                raise RuntimeError("boom")
            return self.inner.embed(images)

    pred = Faulty(tiny_predictor())
    app = create_app(pred, Settings(max_queue=16, warmup=False))
    svc = app.state.service
    widths = [96, 96, 77, 96, 96]

    async def scenario():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            post = lambda w, s: c.post("/locate", files={"image": ("a.png", encode(photo(w, 64, seed=s), "PNG"), "image/png")})  # noqa: E731
            first = asyncio.create_task(post(96, 0))
            await asyncio.get_running_loop().run_in_executor(None, pred.entered.wait, 30)
            rest = [asyncio.create_task(post(w, i + 1)) for i, w in enumerate(widths)]
            while svc.batcher.waiting < len(widths):
                await asyncio.sleep(0.01)
            pred.release.set()
            return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert first.status_code == 200
    assert [r.status_code for r in rest] == [500 if w == 77 else 200 for w in widths]
    assert pred.forwards == [1, 5, 1, 1, 1, 1, 1]  # the shared forward, then each request alone


def test_bad_batching_settings_are_one_line_user_errors(monkeypatch):
    for kw, words in [({"max_batch_images": 0}, ["max_batch_images", "PIGEON_MAX_BATCH_IMAGES", "integer >= 1"]),
                      ({"batch_wait_ms": -1}, ["batch_wait_ms", "PIGEON_BATCH_WAIT_MS", ">= 0"]),
                      ({"batch_wait_ms": "soon"}, ["PIGEON_BATCH_WAIT_MS", "'soon'", "<= 1000"])]:
        with pytest.raises(UserError) as e:
            Settings(**kw)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    monkeypatch.setenv("PIGEON_MAX_BATCH_IMAGES", "64")
    monkeypatch.setenv("PIGEON_BATCH_WAIT_MS", "0")
    s = Settings.from_env()
    assert (s.max_batch_images, s.batch_wait_ms) == (64, 0)
    assert (Settings().max_batch_images, Settings().batch_wait_ms) == (64, 0)  # from the environment
    monkeypatch.delenv("PIGEON_MAX_BATCH_IMAGES")
    monkeypatch.delenv("PIGEON_BATCH_WAIT_MS")
    assert (Settings().max_batch_images, Settings().batch_wait_ms) == (16, 2.0)


# -- metrics ----------------------------------------------------------------------------------------

def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam: dict, name: str, suffix: str = "", **labels) -> float:
    """The sample `name[_suffix]` with exactly `labels` (0 when absent)."""
    want = f"{name}_{suffix}" if suffix else name
    for s in fam[name].samples:
        if s.name == want and all(s.labels.get(k) == v for k, v in labels.items()) and (suffix != "bucket" or "le" in labels):
            return s.value
    return 0.0


def _bucket(fam: dict, name: str, le: str) -> float:
    return _value(fam, name, "bucket", le=le)


def test_metrics_count_requests_latencies_refusals_batches_and_the_build(monkeypatch):
    app = create_app(tiny_predictor(), Settings(api_key="s3cret", max_request_pixels=20_000, warmup=False))
    key = {"X-API-Key": "s3cret"}
    ok = encode(photo(), "PNG")
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/locate", files={"image": ("a.png", ok, "image/png")}, headers=key).status_code == 200
        assert c.post("/locate/batch", files=[("images", ("a.png", ok, "image/png"))] * 2, headers=key).status_code == 200
        assert c.post("/locate", files={"image": ("a.png", ok, "image/png")}).status_code == 401
        assert c.post("/locate", files={"image": ("a.gif", encode(photo(), "GIF"), "image/gif")}, headers=key).status_code == 415
        assert c.post("/locate", files={"image": ("big.png", encode(photo(200, 150), "PNG"), "image/png")}, headers=key).status_code == 413
        assert c.get("/nope").status_code == 404
        assert c.get("/metrics").status_code == 401   # behind the key, like /version
        r = c.get("/metrics", headers=key)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = _families(r.text)
    assert _value(fam, "pigeon_requests", "total", route="/locate", method="POST", status="200") == 3
    assert _value(fam, "pigeon_requests", "total", route="/locate/batch", method="POST", status="200") == 1
    assert _value(fam, "pigeon_requests", "total", route="/locate", method="POST", status="401") == 1
    assert _value(fam, "pigeon_requests", "total", route="other", method="GET", status="404") == 1
    assert _value(fam, "pigeon_requests", "total", route="/metrics", method="GET", status="401") == 1
    for status, reason in (("401", "unauthorized"), ("415", "unsupported_media_type"), ("413", "too_many_pixels"), ("404", "not_found")):
        assert _value(fam, "pigeon_refusals", "total", status=status, reason=reason) == (2 if status == "401" else 1), reason
    assert _value(fam, "pigeon_request_duration_seconds", "count", route="/locate") == 6
    assert _value(fam, "pigeon_request_duration_seconds", "bucket", route="/locate", le="+Inf") == 6
    for name in ("pigeon_decode_seconds", "pigeon_head_seconds", "pigeon_format_seconds", "pigeon_locate_seconds", "pigeon_batch_wait_seconds"):
        assert _value(fam, name, "count") >= 4 and _value(fam, name, "sum") > 0, name
    assert _value(fam, "pigeon_forward_seconds", "count") == 4
    assert _value(fam, "pigeon_batch_images", "sum") == 5 and _bucket(fam, "pigeon_batch_images", "2.0") == 4
    assert _value(fam, "pigeon_in_flight_requests") == 0 and _value(fam, "pigeon_queued_requests") == 0
    build = fam["pigeon_build_info"].samples[0].labels  # an Info metric: a gauge of 1 with the labels
    assert build["backbone"] == "tiny" and re.fullmatch(r"[0-9a-f]{16}", build["bundle_build"]) and build["pigeon_version"]
    # each app has its own registry: a new app starts from zero
    with TestClient(create_app(tiny_predictor(), Settings(warmup=False))) as c:
        fresh = _families(c.get("/metrics").text)
    assert _value(fresh, "pigeon_requests", "total", route="/locate", method="POST", status="200") == 0


def test_metrics_show_in_flight_queued_and_overload_refusals():
    """One request in its forward, one waiting for a forward, a third refused (503): the gauges read
    2 in flight and 1 queued, and the refusal is counted as `overloaded`."""
    pred = BlockingPredictor(tiny_predictor())
    app = create_app(pred, Settings(max_concurrency=1, max_queue=1, retry_after_s=0, warmup=False))
    data = encode(photo())

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            post = lambda: c.post("/locate", files={"image": ("a.jpg", data, "image/jpeg")})  # noqa: E731
            first = asyncio.create_task(post())
            await asyncio.get_running_loop().run_in_executor(None, pred.entered.wait, 30)
            second = asyncio.create_task(post())
            while app.state.service.batcher.waiting < 1:
                await asyncio.sleep(0.01)
            third = await post()
            during = (await c.get("/metrics")).text
            pred.release.set()
            return [await first, await second, third], during, (await c.get("/metrics")).text

    answers, during, after = asyncio.run(scenario())
    assert [r.status_code for r in answers] == [200, 200, 503]
    d, a = _families(during), _families(after)
    assert _value(d, "pigeon_in_flight_requests") == 2 and _value(d, "pigeon_queued_requests") == 1
    assert _value(a, "pigeon_in_flight_requests") == 0 and _value(a, "pigeon_queued_requests") == 0
    assert _value(a, "pigeon_refusals", "total", status="503", reason="overloaded") == 1
