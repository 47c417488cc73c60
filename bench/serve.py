"""Benchmark `pigeon serve`: /locate latency and throughput next to the bare backbone forward pass.

Builds a zero-shot bundle (cells = a seeded sample of the bundled admin-1 regions, head = their
captions through the text tower) for the timing backbone (default `open_clip:ViT-B-32:none`,
random weights: speed does not depend on the weights' values), starts uvicorn on 127.0.0.1 in a
subprocess, and drives it with a bounded load generator (httpx, one client per thread, a fixed
number of requests). At concurrency 1 it alternates one bare forward pass (`encode_image` on the
preprocessed image, no grad, in this process) with one request, so both see the same background
load; concurrency 4 follows. Then a soak on `tiny`:
constant load for `--soak-s` seconds, counting errors and the server's resident memory.

Prints one JSON line. Example:
    .venv/bin/python bench/serve.py --soak-s 120
"""

from __future__ import annotations

import argparse
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


def interleaved_c1(url: str, spec: str, jpeg: bytes, n: int) -> tuple[list[float], list[float]]:
    """Concurrency 1, alternating one bare forward pass here with one POST /locate to the idle server.

    The bare pass is `encode_image` on the preprocessed image (same size the server uses), no
    grad. Alternating puts both under the same background load on a shared machine.
    """
    import httpx
    import torch

    from pigeon.api.uploads import decode_image
    from pigeon.backbones import create_backbone

    bb = create_backbone(spec)
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

    def __init__(self, bundle: Path, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # the JSON request log; a pipe nobody reads would fill and stall the server
        env = {**os.environ, "PIGEON_BUNDLE": str(bundle), "OMP_NUM_THREADS": str(threads), "PIGEON_MAX_QUEUE": "16"}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="open_clip:ViT-B-32:none")
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in the server and for the bare forward (1: on a shared machine two OpenMP threads stall each other)")
    ap.add_argument("--soak-s", type=float, default=120.0, help="soak duration on `tiny` (0 to skip)")
    ap.add_argument("--soak-concurrency", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    jpeg = test_jpeg()
    out: dict = {"backbone": args.backbone, "cells": args.cells, "image": "1024x768 JPEG", "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-serve-") as tmp:
        bundle = make_bundle(Path(tmp) / "timing", args.backbone, args.cells)
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
            tiny = make_bundle(Path(tmp) / "soak", "tiny", args.cells)
            srv = Server(tiny, args.threads)
            try:
                load(srv.url, jpeg, args.soak_concurrency, seconds=min(20.0, args.soak_s / 4))  # settle allocators
                rss0 = srv.rss_mb()
                soak = load(srv.url, jpeg, args.soak_concurrency, seconds=args.soak_s)
                rss1 = srv.rss_mb()
                soak.update(seconds=args.soak_s, rss_start_mb=round(rss0, 1), rss_end_mb=round(rss1, 1), rss_growth_pct=round(100 * (rss1 - rss0) / rss0, 2))
                out["soak_tiny"] = soak
            finally:
                srv.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
