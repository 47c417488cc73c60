"""Benchmark `pigeon serve`: /locate latency and throughput next to the bare backbone forward pass.

Builds a zero-shot bundle (cells = a seeded sample of the bundled admin-1 regions, head = their
captions through the text tower) for the timing backbone (default `open_clip:ViT-B-32:none`,
random weights: speed does not depend on the weights' values), starts uvicorn on 127.0.0.1 in a
subprocess, and drives it with a bounded load generator (httpx, one client per thread, a fixed
number of requests). At concurrency 1 it alternates one bare forward pass (`encode_image` on the
preprocessed image, no grad, in this process) with one request, so both see the same background
load; concurrency 4 follows. Then a soak on `tiny`:
constant load for `--soak-s` seconds, counting errors and the server's resident memory.

`--mode overload` (on `tiny`): goodput when clients ignore Retry-After. For 1, 4 and 64 clients
(`--overload-clients`), each client loops for `--overload-s` seconds (127.0.0.1 only), sending the
same POST /locate and retrying a 503 at once, on one keep-alive connection (`--connection
keepalive`) or on a new connection for every request (`reconnect`; `both`, the default, runs the
two). It counts answers by status and reports the 200s per second and the latency of the admitted
(200) requests; the server's own access log gives how long it took to refuse (503): held until
its Retry-After had passed, or at once (beyond `max_held_refusals`; see pigeon.api.service.Admission). The clients are raw asyncio sockets in
this process (an HTTP client library would spend more CPU than the server); `--client-nice N`
lowers their priority (default 0: the same as the server's).

`--mode memory` (on `tiny`): 16 PNGs of 7000x7000 (49 Mpx each, a smooth gradient: a small upload)
in one /locate/batch, which is over the per-request pixel budget (413 before decoding); then 4 of
them (196 Mpx, within the 200 Mpx budget), decoded one at a time and reduced: the server's RSS
before, at its peak (sampled every 5 ms) and after, and the time taken.

`--mode batch` (the timing backbone): batched serving against the bare forward. At 1 client, /locate
alternated with a bare batch-1 forward, as in the timing mode (p50 over p50); at `--clients` (16)
concurrent clients, /locate requests per second against the bare forward's images per second at
batch `--clients` (`encode_image` on that many preprocessed images at once, the server idle), in
`--rounds` rounds of one bare forward then a share of the requests, so both see the same background
load (requests / summed wall time of the rounds; the bare figure is the median); then 4 clients. The server batches with its settings
(`PIGEON_MAX_BATCH_IMAGES` = `--max-batch-images`, `PIGEON_BATCH_WAIT_MS` = `--batch-wait-ms`); its
/metrics give the batch sizes it formed.

Prints one JSON line. Examples:
    .venv/bin/python bench/serve.py --soak-s 120
    .venv/bin/python bench/serve.py --mode overload --overload-s 20
    .venv/bin/python bench/serve.py --mode memory
    .venv/bin/python bench/serve.py --mode batch --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(path: Path, spec: str, n_cells: int) -> Path:
    """A zero-shot bundle over `n_cells` admin-1 regions (seeded sample) with backbone `spec`."""
    from pigeon.geocells import bundled
    from pigeon.geocells.cells import GeoCells
    from pigeon.bundle import Bundle
    from pigeon.train import train_zero_shot

    a1 = bundled.admin1()
    gdf = a1.sample(n=min(n_cells, len(a1)), random_state=0).reset_index(drop=True)
    cells = GeoCells.from_frame(gdf)
    b = Bundle(path, create=True)
    b.write_part("cells", lambda tmp: cells.save(tmp), n_cells=len(cells))
    train_zero_shot(path, backbone=spec)
    return path


def test_jpeg(w: int = 1024, h: int = 768) -> bytes:
    """A seeded photo-sized JPEG (gradient sky/ground plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, h)[:, None, None]
    base = (1 - y) * np.array([120, 170, 230]) + y * np.array([90, 120, 60])
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def interleaved_c1(url: str, spec: str, jpeg: bytes, n: int, bb=None) -> tuple[list[float], list[float]]:
    """Concurrency 1, alternating one bare forward pass here with one POST /locate to the idle server.

    The bare pass is `encode_image` on the preprocessed image (same size the server uses), no
    grad. Alternating puts both under the same background load on a shared machine.
    """
    import httpx
    import torch

    from pigeon.api.uploads import decode_image
    from pigeon.backbones import create_backbone

    bb = bb or create_backbone(spec)
    x = bb.preprocess(decode_image(jpeg).image).unsqueeze(0)
    fwd, req = [], []
    with torch.no_grad(), httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n + 3):
            t = time.perf_counter()
            bb.encode_image(x)
            t1 = time.perf_counter()
            r = c.post("/locate", files={"image": ("b.jpg", jpeg, "image/jpeg")})
            t2 = time.perf_counter()
            if r.status_code != 200:
                raise RuntimeError(f"/locate answered {r.status_code}: {r.text[:200]}")
            if i >= 3:  # warm-up
                fwd.append((t1 - t) * 1000)
                req.append((t2 - t1) * 1000)
    return fwd, req


class Server:
    """uvicorn in a subprocess over a bundle (factory `pigeon.api.app:app_from_env`)."""

    def __init__(self, bundle: Path, threads: int, env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # the JSON request log; a pipe nobody reads would fill and stall the server
        env = {**os.environ, "PIGEON_BUNDLE": str(bundle), "OMP_NUM_THREADS": str(threads), "PIGEON_MAX_QUEUE": "16", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "pigeon.api.app:app_from_env", "--factory", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", "--no-access-log"],
            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=self.log,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not come up in 180 s")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, jpeg: bytes, concurrency: int, n_requests: int | None = None, seconds: float | None = None) -> dict:
    """Drive POST /locate from `concurrency` threads for a fixed request count or duration; bounded."""
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = {"left": n_requests if n_requests is not None else 10**9}
    stop_at = time.perf_counter() + seconds if seconds else float("inf")

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    if counter["left"] <= 0 or time.perf_counter() >= stop_at:
                        return
                    counter["left"] -= 1
                t = time.perf_counter()
                try:
                    r = c.post("/locate", files={"image": ("b.jpg", jpeg, "image/jpeg")})
                    ok = r.status_code == 200
                    msg = f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, msg = False, repr(e)
                dt = (time.perf_counter() - t) * 1000
                with lock:
                    (lat.append(dt) if ok else errors.append(msg))

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(lat) + len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
        "throughput_rps": round(len(lat) / wall, 2),
    }


def _post_bytes(jpeg: bytes, port: int) -> bytes:
    """One complete keep-alive POST /locate (multipart, one image), built once and sent as is."""
    b = "benchB0undary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + jpeg
    body += f"\r\n--{b}--\r\n".encode()
    head = (f"POST /locate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={b}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server closes) of one HTTP/1.1 response with a Content-Length; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers.get("connection", "").lower() == "close"


async def _client(port: int, request: bytes, stop_at: float, out: list, reconnect: bool = False) -> None:
    """One client that ignores Retry-After: send, read, repeat at once, until `stop_at` (`reconnect`:
    a new connection for every request)."""
    reader = writer = None
    while time.perf_counter() < stop_at:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t = time.perf_counter()
        try:
            writer.write(request)
            await writer.drain()
            status, closing = await _read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            out.append((type(e).__name__, (time.perf_counter() - t) * 1000))
            writer.close()
            writer = None
            continue
        out.append((status, (time.perf_counter() - t) * 1000))
        if closing or reconnect:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def overload_level(port: int, jpeg: bytes, clients: int, seconds: float, reconnect: bool = False) -> dict:
    """`clients` clients hammering POST /locate for `seconds`: answers by status, goodput, admitted latency."""
    request = _post_bytes(jpeg, port)
    out: list = []

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(port, request, t0 + seconds, out, reconnect) for _ in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    ok = [ms for st, ms in out if st == 200]
    by_status: dict[str, int] = {}
    for st, _ in out:
        by_status[str(st)] = by_status.get(str(st), 0) + 1
    pct = lambda a, q: round(float(np.percentile(a, q)), 2) if a else None  # noqa: E731
    return {"clients": clients, "connection": "reconnect" if reconnect else "keepalive", "seconds": round(wall, 2), "answers": by_status, "goodput_rps": round(len(ok) / wall, 2),
            "admitted_p50_ms": pct(ok, 50), "admitted_p99_ms": pct(ok, 99),
            "refused_p50_ms_client": pct([ms for st, ms in out if st == 503], 50)}


def server_refusal_ms(srv: "Server") -> dict:
    """From the server's JSON access log: how long its 503s took (duration_ms: gate in to answer out).
    `immediate`: refusals answered at once (more than max_held_refusals waiting); `held`: answered
    when their Retry-After had passed (~retry_after_s)."""
    srv.log.seek(0)
    ms = []
    for line in srv.log.read().decode("utf-8", "replace").splitlines():
        if line.startswith("{") and '"status": 503' in line:
            ms.append(json.loads(line)["duration_ms"])
    now = [m for m in ms if m < 100]
    pct = lambda a, q: round(float(np.percentile(a, q)), 3) if a else None  # noqa: E731
    return {"immediate": {"count": len(now), "p50_ms": pct(now, 50), "p99_ms": pct(now, 99)}, "held": {"count": len(ms) - len(now)}}


def run_overload(args: argparse.Namespace, tmp: Path, jpeg: bytes) -> dict:
    """The overload mode: 1, 4, 64 clients that ignore Retry-After, on `tiny`."""
    srv = Server(make_bundle(tmp / "overload", "tiny", args.cells), args.threads)
    if args.client_nice:
        os.nice(args.client_nice)  # after the server started: only this process (the clients) yields
    modes = {"keepalive": (False,), "reconnect": (True,), "both": (False, True)}[args.connection]
    try:
        overload_level(srv.port, jpeg, 4, 3.0)  # warm-up
        levels = [overload_level(srv.port, jpeg, int(n), args.overload_s, reconnect) for reconnect in modes
                  for n in args.overload_clients.split(",")]
        out: dict = {"levels": levels, "server_503_time": server_refusal_ms(srv), "max_concurrency": 1, "max_queue": 16,
                     "client_nice": args.client_nice}
    finally:
        srv.stop()
    for conn in ("keepalive", "reconnect"):
        by_n = {lv["clients"]: lv for lv in levels if lv["connection"] == conn}
        if 4 in by_n and 64 in by_n:
            c4, c64 = by_n[4], by_n[64]
            out[f"goodput_64_over_4_{conn}"] = round(c64["goodput_rps"] / c4["goodput_rps"], 3) if c4["goodput_rps"] else None
            out[f"admitted_p99_over_p50_at_64_{conn}"] = round(c64["admitted_p99_ms"] / c64["admitted_p50_ms"], 2) if c64["admitted_p50_ms"] else None
    return out


def _big_png(side: int = 7000) -> bytes:
    """A side x side RGB PNG of smooth gradients: 49 Mpx in ~160 KB."""
    from PIL import Image

    x = np.linspace(0, 255, side, dtype=np.float32)
    arr = np.empty((side, side, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = x, x[::-1], 128
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _timed_with_peak_rss(srv: "Server", send) -> tuple[object, float, float]:
    """Run `send()` while sampling the server's RSS every 5 ms: (its result, seconds, peak RSS MB)."""
    peak, stop = [srv.rss_mb()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], srv.rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    try:
        res = send()
    finally:
        stop.set()
        th.join()
    return res, time.perf_counter() - t, peak[0]


def run_memory(args: argparse.Namespace, tmp: Path, jpeg: bytes) -> dict:
    """The memory mode: a batch of 16 x 49 Mpx PNGs (refused by the budget), then 4 of them (served)."""
    import httpx

    png = _big_png()
    srv = Server(make_bundle(tmp / "memory", "tiny", args.cells), args.threads)
    out: dict = {"png_bytes": len(png), "image": "7000x7000 RGB PNG"}
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            for _ in range(3):
                c.post("/locate", files={"image": ("b.jpg", jpeg, "image/jpeg")})
            for n in (16, 4):
                files = [("images", (f"{i}.png", png, "image/png")) for i in range(n)]
                rss0 = srv.rss_mb()
                r, secs, peak = _timed_with_peak_rss(srv, lambda: c.post("/locate/batch", files=files))
                time.sleep(0.5)
                out[f"batch_{n}"] = {"status": r.status_code, "error": r.json().get("error") if r.status_code != 200 else None,
                                     "seconds": round(secs, 2), "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak, 1),
                                     "rss_after_mb": round(srv.rss_mb(), 1), "peak_growth_mb": round(peak - rss0, 1)}
    finally:
        srv.stop()
    return out


def run_timing(args: argparse.Namespace, tmp: Path, jpeg: bytes) -> dict:
    """The default mode: /locate against the bare forward pass, concurrency 4, then the soak on `tiny`."""
    out: dict = {}
    bundle = make_bundle(tmp / "timing", args.backbone, args.cells)
    srv = Server(bundle, args.threads)
    try:
        fwd, req = interleaved_c1(srv.url, args.backbone, jpeg, n=args.requests)
        out["bare_forward_p50_ms"] = round(statistics.median(fwd), 2)
        out["bare_forward_p99_ms"] = round(float(np.percentile(fwd, 99)), 2)
        out["c1"] = {"concurrency": 1, "requests": len(req), "errors": 0, "p50_ms": round(statistics.median(req), 2),
                     "p99_ms": round(float(np.percentile(req, 99)), 2), "throughput_rps": round(1000 * len(req) / sum(req), 2)}
        out["c4"] = load(srv.url, jpeg, 4, n_requests=args.requests)
        out["locate_p50_over_forward_p50"] = round(out["c1"]["p50_ms"] / out["bare_forward_p50_ms"], 3)
    finally:
        srv.stop()
    if args.soak_s > 0:
        srv = Server(make_bundle(tmp / "soak", "tiny", args.cells), args.threads)
        try:
            load(srv.url, jpeg, args.soak_concurrency, seconds=min(20.0, args.soak_s / 4))  # settle allocators
            rss0 = srv.rss_mb()
            soak = load(srv.url, jpeg, args.soak_concurrency, seconds=args.soak_s)
            rss1 = srv.rss_mb()
            soak.update(seconds=args.soak_s, rss_start_mb=round(rss0, 1), rss_end_mb=round(rss1, 1), rss_growth_pct=round(100 * (rss1 - rss0) / rss0, 2))
            out["soak_tiny"] = soak
        finally:
            srv.stop()
    return out


def bare_batch_forward(bb, jpeg: bytes, batch: int, n: int) -> list[float]:
    """ms of `n` bare forwards (`encode_image`, no grad) over `batch` copies of the preprocessed image (one warm-up first)."""
    import torch

    from pigeon.api.uploads import decode_image

    x = bb.preprocess(decode_image(jpeg).image).unsqueeze(0).repeat(batch, 1, 1, 1)
    out = []
    with torch.no_grad():
        bb.encode_image(x)
        for _ in range(n):
            t = time.perf_counter()
            bb.encode_image(x)
            out.append((time.perf_counter() - t) * 1000)
    return out


def server_batches(url: str) -> dict:
    """The server's batch sizes, from its /metrics (prometheus_client's parser): forwards, mean images and
    requests per forward, and how many forwards served one request alone."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)
               for s in f.samples}
    n = samples.get(("pigeon_batch_images_count", None), 0)
    return {"forwards": int(n), "mean_images": round(samples.get(("pigeon_batch_images_sum", None), 0) / n, 2) if n else None,
            "mean_requests": round(samples.get(("pigeon_batch_requests_sum", None), 0) / n, 2) if n else None,
            "forwards_of_one_request": int(samples.get(("pigeon_batch_requests_bucket", "1.0"), 0)),
            "forward_s": samples.get(("pigeon_forward_seconds_sum", None), 0.0)}


def run_batch(args: argparse.Namespace, tmp: Path, jpeg: bytes) -> dict:
    """The batch mode: /locate at 1 client against the bare batch-1 forward, at `--clients` against the bare
    batch-`--clients` forward (images/s), then 4 clients; the server's batch sizes from /metrics."""
    from pigeon.backbones import create_backbone

    k = args.clients
    bundle = make_bundle(tmp / "batch", args.backbone, args.cells)
    env = {"PIGEON_MAX_BATCH_IMAGES": str(args.max_batch_images), "PIGEON_BATCH_WAIT_MS": str(args.batch_wait_ms),
           "PIGEON_MAX_QUEUE": str(max(16, 2 * k))}
    srv = Server(bundle, args.threads, env)
    bb = create_backbone(args.backbone)
    out: dict = {"clients": k, "max_batch_images": args.max_batch_images, "batch_wait_ms": args.batch_wait_ms}
    try:
        fwd, req = interleaved_c1(srv.url, args.backbone, jpeg, n=args.requests, bb=bb)
        out["c1"] = {"bare_forward_b1_p50_ms": round(statistics.median(fwd), 2), "locate_p50_ms": round(statistics.median(req), 2),
                     "locate_p99_ms": round(float(np.percentile(req, 99)), 2)}
        out["c1"]["locate_p50_over_forward_p50"] = round(out["c1"]["locate_p50_ms"] / out["c1"]["bare_forward_b1_p50_ms"], 3)
        load(srv.url, jpeg, k, n_requests=k)  # warm-up at this concurrency
        bare_ms: list[float] = []
        rounds: list[dict] = []
        batches0 = server_batches(srv.url)
        for _ in range(args.rounds):  # a bare forward (the server idle), then a load round: both under the same background load
            bare_ms += bare_batch_forward(bb, jpeg, k, 1)
            t0 = time.perf_counter()
            rnd = load(srv.url, jpeg, k, n_requests=args.batch_requests // args.rounds)
            rnd["wall_s"] = time.perf_counter() - t0
            rounds.append(rnd)
        batches1 = server_batches(srv.url)
        n_req = sum(r["requests"] for r in rounds)
        wall = sum(r["wall_s"] for r in rounds)
        n_fwd = batches1["forwards"] - batches0["forwards"]
        bare = statistics.median(bare_ms)
        out[f"c{k}"] = {"requests": n_req, "errors": sum(r["errors"] for r in rounds), "first_error": next((r["first_error"] for r in rounds if r["errors"]), None),
                        "throughput_rps": round(n_req / wall, 2), "p50_ms_per_round": [r["p50_ms"] for r in rounds],
                        "rps_per_round": [r["throughput_rps"] for r in rounds],
                        f"bare_forward_b{k}_ms": [round(t, 1) for t in bare_ms], "bare_images_per_s": round(1000 * k / bare, 2),
                        "forwards": n_fwd, "mean_images_per_forward": round(n_req / n_fwd, 2) if n_fwd else None,
                        "forwards_of_one_request": batches1["forwards_of_one_request"] - batches0["forwards_of_one_request"],
                        "forward_busy_share": round((batches1["forward_s"] - batches0["forward_s"]) / wall, 3)}
        out[f"c{k}"]["rps_over_bare_images_per_s"] = round(out[f"c{k}"]["throughput_rps"] / out[f"c{k}"]["bare_images_per_s"], 3)
        out["c4"] = load(srv.url, jpeg, 4, n_requests=args.c4_requests)
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("timing", "overload", "memory", "batch"), default="timing")
    ap.add_argument("--backbone", default="open_clip:ViT-B-32:none")
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in the server and for the bare forward (1: on a shared machine two OpenMP threads stall each other)")
    ap.add_argument("--soak-s", type=float, default=120.0, help="soak duration on `tiny` (0 to skip)")
    ap.add_argument("--soak-concurrency", type=int, default=2)
    ap.add_argument("--overload-s", type=float, default=20.0, help="seconds per client count in --mode overload")
    ap.add_argument("--overload-clients", default="1,4,64", help="client counts in --mode overload")
    ap.add_argument("--connection", choices=("keepalive", "reconnect", "both"), default="both",
                    help="--mode overload: one keep-alive connection per client, a new one per request, or both in turn")
    ap.add_argument("--client-nice", type=int, default=0, help="nice increment of the load generator in --mode overload (0: same priority as the server)")
    ap.add_argument("--clients", type=int, default=16, help="--mode batch: concurrent clients (and the bare forward's batch)")
    ap.add_argument("--batch-requests", type=int, default=192, help="--mode batch: requests at --clients clients, over all rounds")
    ap.add_argument("--c4-requests", type=int, default=24, help="--mode batch: requests at 4 clients")
    ap.add_argument("--rounds", type=int, default=4, help="--mode batch: rounds of (one bare batched forward, then --batch-requests/rounds requests)")
    ap.add_argument("--max-batch-images", type=int, default=16, help="--mode batch: the server's PIGEON_MAX_BATCH_IMAGES")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0, help="--mode batch: the server's PIGEON_BATCH_WAIT_MS")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    jpeg = test_jpeg()
    out: dict = {"mode": args.mode, "backbone": args.backbone if args.mode in ("timing", "batch") else "tiny", "cells": args.cells,
                 "image": "1024x768 JPEG", "threads": args.threads}
    run = {"timing": run_timing, "overload": run_overload, "memory": run_memory, "batch": run_batch}[args.mode]
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-serve-") as tmp:
        out.update(run(args, Path(tmp), jpeg))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
