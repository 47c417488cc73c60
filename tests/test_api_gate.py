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
    the next requests are refused with 503 + Retry-After without a `receive`; after body_timeout_s the
    stalled one gets 408 and the slot is free again."""
    app = create_app(tiny_predictor(), Settings(max_concurrency=1, max_queue=0, retry_after_s=1, body_timeout_s=0.5, warmup=False))
    admission = app.state.service.admission
    body = _multipart(encode(photo()))

    async def scenario():
        stalled = Call(None, stall=True)
        task = asyncio.create_task(stalled.run(app))
        while stalled.receives == 0:
            await asyncio.sleep(0.01)
        in_flight = admission.in_flight
        refused = await asyncio.gather(*(Call(body).run(app) for _ in range(50)))
        await task
        after = await Call(body).run(app)
        return stalled, in_flight, refused, after

    stalled, in_flight, refused, after = asyncio.run(scenario())
    assert in_flight == 1
    assert {c.status for c in refused} == {503} and all(c.receives == 0 for c in refused)  # a refusal reads nothing
    assert refused[0].headers["retry-after"] == "1" and b'"overloaded"' in refused[0].answer
    assert stalled.status == 408 and b'"request_timeout"' in stalled.answer
    assert after.status == 200 and admission.in_flight == 0 and admission.held == 0


def test_refusals_wait_out_their_retry_after_and_beyond_the_cap_close_at_once():
    """Clients that ignore Retry-After, reconnecting for every request, used to get 503s as fast as they
    asked (48,260 in 20 s at 64 clients: goodput 0.29 of the 4-client figure). Every refusal is now
    held until its Retry-After has passed (an idle await: no slot, no body read), whatever the
    connection; beyond `max_held_refusals` held at once, the 503 comes at once and closes the connection."""
    app = create_app(tiny_predictor(), Settings(max_concurrency=1, max_queue=0, retry_after_s=1, body_timeout_s=5,
                                                max_held_refusals=2, warmup=False))
    admission = app.state.service.admission
    body = _multipart(encode(photo()))
    done: list[int] = []

    async def refused(i):
        c = await Call(body).run(app)   # a new connection each time (a new client port)
        done.append(i)
        return c

    async def scenario():
        holder = asyncio.create_task(Call(None, stall=True).run(app))  # holds the only slot
        while admission.in_flight == 0:
            await asyncio.sleep(0.01)
        first = [asyncio.create_task(refused(i)) for i in (0, 1)]
        while admission.held < 2:
            await asyncio.sleep(0.01)
        third = await refused(2)          # two already held: answered at once
        held_then = admission.held
        calls = [await t for t in first] + [third]
        holder.cancel()
        return calls, held_then

    calls, held_then = asyncio.run(scenario())
    assert [c.status for c in calls] == [503, 503, 503] and all(c.receives == 0 for c in calls)
    assert done[0] == 2 and held_then == 2   # the third finished while the first two were still held
    assert calls[2].headers.get("connection") == "close" and "connection" not in calls[0].headers
    assert admission.held == 0


class Drip(Call):
    """A client that trickles its body: the multipart part's headers, then `size` bytes of the file
    every `every` s, forever."""

    def __init__(self, every: float = 0.2, size: int = 1):
        super().__init__(b"")
        self.every, self.size = every, size
        self.head = _multipart(b"").split(b"\r\n--" + BOUNDARY.encode() + b"--")[0]

    async def receive(self) -> dict:
        self.receives += 1
        if self.receives == 1:
            return {"type": "http.request", "body": self.head, "more_body": True}
        await asyncio.sleep(self.every)
        return {"type": "http.request", "body": b"x" * self.size, "more_body": True}


@pytest.mark.parametrize("limit", ["deadline", "rate"])
def test_trickling_clients_cannot_hold_the_slots(limit):
    """Every slot held by a client that sends a byte every 0.2 s: each is cut off with 408 (by the
    whole-body deadline, or by the minimum average rate after its grace) and a normal request, retrying
    on 503, is answered 200."""
    opts = dict(body_timeout_s=2, min_upload_bytes_per_s=0) if limit == "deadline" else dict(body_timeout_s=120, min_upload_bytes_per_s=1024)
    app = create_app(tiny_predictor(), Settings(max_concurrency=1, max_queue=1, retry_after_s=1, warmup=False, **opts))
    admission = app.state.service.admission
    body = _multipart(encode(photo()))

    async def normal():
        while True:
            c = await Call(body).run(app)
            if c.status != 503:
                return c

    async def scenario():
        drips = [Drip() for _ in range(2)]
        tasks = [asyncio.create_task(d.run(app)) for d in drips]
        while admission.in_flight < 2:
            await asyncio.sleep(0.01)
        ok = await asyncio.wait_for(normal(), 60)   # a bound against hanging, not a timing assertion
        await asyncio.gather(*tasks)
        return drips, ok

    drips, ok = asyncio.run(scenario())
    assert [d.status for d in drips] == [408, 408]
    want = "within 2 s" if limit == "deadline" else "at 1 KiB/s on average"
    assert all(want in d.answer.decode() and b'"request_timeout"' in d.answer for d in drips), drips[0].answer
    assert ok.status == 200 and admission.in_flight == 0




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
