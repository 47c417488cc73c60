"""The request gate decides before reading the body: the API key (401) and admission (503 +
Retry-After) on the locate routes; a stalled upload is cut off (408); the slot comes back when the
response ends, whatever happened. Driven as raw ASGI calls, so the test sees every `receive`."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time

import pytest
import torch

from pigeon.api import Settings, create_app
from api_support import BlockingPredictor, encode, photo, tiny_predictor

torch.set_num_threads(2)
BOUNDARY = "gateXyZ"
PORTS = itertools.count(20000)  # each Call is its own client connection unless told otherwise


def _multipart(data: bytes, name: str = "image") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


class Call:
    """One ASGI request: records how often the app asked for the body, and what it answered."""

    def __init__(self, body: bytes | None, stall: bool = False):
        self.body, self.stall = body, stall
        self.receives, self.status, self.headers, self.answer = 0, None, {}, b""

    async def receive(self) -> dict:
        self.receives += 1
        if self.stall:  # a client that sent its headers and then nothing
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": self.body or b"", "more_body": False}

    async def send(self, msg: dict) -> None:
        if msg["type"] == "http.response.start":
            self.status = msg["status"]
            self.headers = {k.decode(): v.decode() for k, v in msg["headers"]}
        else:
            self.answer += msg.get("body", b"")

    async def run(self, app, path: str = "/locate", key: str | None = None, client: tuple | None = None) -> "Call":
        size = len(self.body) if self.body is not None else 10_000
        headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()), (b"content-length", str(size).encode())]
        if key is not None:
            headers.append((b"x-api-key", key.encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers, "client": client or ("127.0.0.1", next(PORTS)), "server": ("t", 80)}
        await app(scope, self.receive, self.send)
        return self


def test_wrong_or_missing_key_is_refused_before_the_body_is_read():
    app = create_app(tiny_predictor(), Settings(api_key="s3cret", warmup=False))
    body = _multipart(encode(photo()))

    async def scenario():
        return [await Call(body).run(app, key=k) for k in (None, "wrong")] + [await Call(body).run(app, "/locate/batch")] + [await Call(body).run(app, key="s3cret")]

    missing, wrong, batch, right = asyncio.run(scenario())
    for c in (missing, wrong, batch):
        assert c.status == 401 and c.receives == 0, (c.status, c.receives)
        assert b'"unauthorized"' in c.answer
    assert right.status == 200 and right.receives >= 1


def test_overload_is_refused_before_the_body_and_a_stalled_upload_gives_its_slot_back():
    """max_concurrency 1, max_queue 0: a client that sends headers and then nothing holds the only slot;
    the next request is refused with 503 + Retry-After without a `receive`, in well under a millisecond
    of server time; after body_timeout_s the stalled one gets 408 and the slot is free again."""
    app = create_app(tiny_predictor(), Settings(max_concurrency=1, max_queue=0, retry_after_s=3, body_timeout_s=0.5, warmup=False))
    admission = app.state.service.admission
    body = _multipart(encode(photo()))

    async def scenario():
        stalled = Call(None, stall=True)
        task = asyncio.create_task(stalled.run(app))
        while stalled.receives == 0:
            await asyncio.sleep(0.01)
        in_flight = admission.in_flight
        refused, times = [], []
        for _ in range(200):
            c = Call(body)
            t = time.perf_counter()
            refused.append(await c.run(app))
            times.append(time.perf_counter() - t)
        await task
        after = await Call(body).run(app)
        return stalled, in_flight, refused, statistics.median(times), after

    stalled, in_flight, refused, median_s, after = asyncio.run(scenario())
    assert in_flight == 1
    assert {c.status for c in refused} == {503} and all(c.receives == 0 for c in refused)
    assert refused[0].headers["retry-after"] == "3" and b'"overloaded"' in refused[0].answer
    assert median_s < 0.002, median_s  # a refusal reads nothing and decodes nothing
    assert stalled.status == 408 and b'"request_timeout"' in stalled.answer
    assert after.status == 200 and admission.in_flight == 0


def test_a_client_that_ignores_retry_after_gets_its_next_503_only_when_it_has_passed():
    """Clients that retry at once used to keep the event loop busy with 503s (goodput fell to a quarter
    at 64 of them, bench/serve.py --mode overload): a connection refused less than Retry-After ago
    that finds no free slot is answered when its Retry-After has passed; other clients at once."""
    app = create_app(tiny_predictor(), Settings(max_concurrency=1, max_queue=0, retry_after_s=1, body_timeout_s=5, warmup=False))
    body = _multipart(encode(photo()))
    eager = ("127.0.0.1", 41000)

    async def timed(client):
        t = time.perf_counter()
        c = await Call(body).run(app, client=client)
        return c.status, time.perf_counter() - t

    async def scenario():
        holder = asyncio.create_task(Call(None, stall=True).run(app))  # holds the only slot for 5 s
        await asyncio.sleep(0.05)
        first = await timed(eager)
        again = await timed(eager)  # at once, ignoring Retry-After: 1
        other = await timed(("127.0.0.1", 41001))
        holder.cancel()
        return first, again, other

    first, again, other = asyncio.run(scenario())
    assert first[0] == again[0] == other[0] == 503
    assert first[1] < 0.1 and other[1] < 0.1
    assert 0.8 < again[1] < 1.5, again




def test_the_slot_comes_back_whatever_happens():
    """A server fault (500), a request cancelled mid-inference (client gone): in_flight returns to 0."""
    body = _multipart(encode(photo()))
    failing = create_app(BlockingPredictor(tiny_predictor(), fail=True), Settings(warmup=False))
    with pytest.raises(RuntimeError, match="boom"):  # raw ASGI: the fault propagates after the 500 is sent
        asyncio.run(Call(body).run(failing))
    assert failing.state.service.admission.in_flight == 0

    pred = BlockingPredictor(tiny_predictor())
    app = create_app(pred, Settings(warmup=False))

    async def cancelled():
        task = asyncio.create_task(Call(body).run(app))
        await asyncio.get_running_loop().run_in_executor(None, pred.entered.wait, 30)
        held = app.state.service.admission.in_flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pred.release.set()
        return held

    assert asyncio.run(cancelled()) == 1
    assert app.state.service.admission.in_flight == 0


def test_pixel_budget_is_checked_over_the_headers_before_decoding():
    """16 PNGs of 49 Mpx each (headers only: decoding one would fail) are refused as a whole, 413 naming
    the per-request budget; within budget, each image is judged on its own."""
    import struct
    import zlib

    from starlette.testclient import TestClient

    def png_claiming(w, h):
        chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")

    with TestClient(create_app(tiny_predictor(), Settings(warmup=False))) as c:
        files = [("images", (f"{i}.png", png_claiming(7000, 7000), "image/png")) for i in range(16)]
        r = c.post("/locate/batch", files=files)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "too_many_pixels" and "784000000 pixels together" in r.json()["detail"]
        assert "the limit is 200000000 pixels per request" in r.json()["detail"]
        files = [("images", ("ok.jpg", encode(photo()), "image/jpeg")), ("images", ("fake.png", png_claiming(7000, 7000), "image/png"))]
        r = c.post("/locate/batch", files=files)
        assert r.status_code == 200 and r.json()["results"][1]["error"]["status"] == 400  # within budget: decoded, and refused alone
    with TestClient(create_app(tiny_predictor(), Settings(max_request_pixels=10_000, warmup=False))) as c:
        r = c.post("/locate", files={"image": ("big.jpg", encode(photo(200, 100)), "image/jpeg")})
        assert r.status_code == 413 and "the limit is 10000 pixels per request" in r.json()["detail"]


def test_large_png_is_reduced_while_decoding():
    """A PNG far above the model's input size is box-reduced right after decoding (shorter side still
    >= draft_size); the answer reports the original size."""
    from pigeon.api.uploads import decode_image

    big = photo(2400, 1600, seed=3)
    dec = decode_image(encode(big, "PNG"), draft_size=224)
    assert (dec.width, dec.height) == (2400, 1600) and dec.image.size == (343, 229)  # factor 1600 // 224 = 7
    assert dec.image.mode == "RGB"
    ref = big.reduce(7)
    assert abs(int(sum(dec.image.resize((1, 1)).getpixel((0, 0)))) - int(sum(ref.resize((1, 1)).getpixel((0, 0))))) <= 3
