"""GPU benchmark (issue 19): what pigeon costs on one GPU, each figure next to the bare forward pass.

One script that finishes in about 4 minutes on a single GPU and downloads nothing: the backbone is a
random-weight open_clip ViT-L-14-336 (`open_clip:ViT-L-14-336:none`: speed does not depend on the
weights' values), the photos are synthetic 512-px JPEGs written here as WebDataset shards.

Parts (one JSON object at the end, and a table on stderr):
- `forward`: the bare backbone forward (`encode_image` on preprocessed tensors, no grad) in
  images/s at batch 1, 64 and 256, in fp32 and bf16 (autocast);
- `embed`: `pigeon embed`'s images/s (decode in DataLoader workers, forward, write the shards) with
  0 / 4 / 8 / 16 loader workers, as a ratio of the bare bf16 forward at the same batch;
- `serve`: `/locate` p50 at 1 client over the bare batch-1 forward, and req/s at 64 clients over
  the bare forward at the server's batch (`max_batch_images`); the server is uvicorn in a
  subprocess on 127.0.0.1 (bench/serve.py's `Server`);
- `pretrain`: `pigeon pretrain` optimizer steps/s at batch 64 (bf16 autocast) and the peak GPU memory;
- `head`: head-training seconds per step on 5M x 768 memory-mapped synthetic embeddings (float16
  shards, written here).

`--smoke` runs the same code on the CPU with the `tiny` backbone and small sizes in well under a
minute: `make test` runs it (tests/test_gpu_bench.py), so the script cannot rot.

    .venv/bin/python bench/gpu.py                 # on a GPU machine
    .venv/bin/python bench/gpu.py --smoke         # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

FULL = dict(backbone="open_clip:ViT-L-14-336:none", batches=(1, 64, 256), embed_batch=256, workers=(0, 4, 8, 16),
            photos=4096, per_shard=256, image_px=512, serve_clients=64, serve_requests=640, serve_batch=64,
            pretrain_batch=64, pretrain_steps=12, head_rows=5_000_000, head_dim=768, head_steps=40, head_batch=4096,
            forward_seconds=4.0, cells=300)
SMOKE = dict(backbone="tiny", batches=(1, 8), embed_batch=8, workers=(0, 2), photos=32, per_shard=8, image_px=64,
             serve_clients=4, serve_requests=12, serve_batch=4, pretrain_batch=8, pretrain_steps=2, head_rows=20_000,
             head_dim=32, head_steps=5, head_batch=1024, forward_seconds=0.3, cells=40)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device_of(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    """The autocast context of a precision ("fp32": none)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- forward --------------------------------------------------------------------------------------
def bare_forward(bb: Any, device: str, batch: int, precision: str, seconds: float) -> float:
    """Images/s of `encode_image` on a preprocessed batch already on the device (no grad)."""
    import torch

    size = int(getattr(bb, "image_size", 224) or 224)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad(), autocast(device, precision):
        for _ in range(2):
            bb.encode_image(x)  # warm-up (kernels, autotuning)
        sync(device)
        n, t0 = 0, time.perf_counter()
        while True:
            bb.encode_image(x)
            n += 1
            sync(device)
            if time.perf_counter() - t0 >= seconds and n >= 3:
                break
    return n * batch / (time.perf_counter() - t0)


def part_forward(bb: Any, device: str, cfg: dict) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        for b in cfg["batches"]:
            out[f"{precision}_b{b}"] = round(bare_forward(bb, device, b, precision, cfg["forward_seconds"]), 1)
            log(f"forward {precision} batch {b}: {out[f'{precision}_b{b}']} images/s")
    return out


# -- embed ----------------------------------------------------------------------------------------
def write_shards(folder: Path, n: int, per_shard: int, px: int) -> Path:
    """`n` seeded synthetic JPEGs of px x px (gradients and noise) as WebDataset shards with coordinates."""
    import pandas as pd
    from PIL import Image

    from pigeon.datasets.shards import write_webdataset

    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        base = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        im = Image.fromarray(base).resize((px, px), Image.BILINEAR)
        arr = np.clip(np.asarray(im, np.float32) + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    frame = pd.DataFrame({"image": images, "lat": rng.uniform(-60, 70, n).round(5), "lon": rng.uniform(-180, 180, n).round(5),
                          "key": [f"{i:07d}" for i in range(n)]})
    write_webdataset(frame, folder, per_shard=per_shard)
    return folder


def part_embed(bb: Any, device: str, cfg: dict, work: Path, forward: dict) -> dict:
    from pigeon.datasets.sources import open_source
    from pigeon.embed import embed_source

    shards = write_shards(work / "shards", cfg["photos"], cfg["per_shard"], cfg["image_px"])
    bare = forward.get(f"bf16_b{cfg['embed_batch']}") or bare_forward(bb, device, cfg["embed_batch"], "bf16", cfg["forward_seconds"])
    out = {"photos": cfg["photos"], "batch": cfg["embed_batch"], "bare_bf16_images_per_s": round(bare, 1)}
    before = bb.precision
    bb.set_precision("bf16")   # as `pigeon embed --precision bf16`
    for w in cfg["workers"]:
        t0 = time.perf_counter()
        rep = embed_source(open_source(shards), bb, work / f"emb-w{w}", batch_size=cfg["embed_batch"], workers=w, progress=False)
        sync(device)
        seconds = time.perf_counter() - t0
        rate = cfg["photos"] / seconds
        out[f"workers_{w}"] = {"images_per_s": round(rate, 1), "over_bare_bf16": round(rate / bare, 3),
                               "embedded": int(rep.get("images", cfg["photos"]) if isinstance(rep, dict) else cfg["photos"])}
        log(f"embed workers {w}: {rate:.1f} images/s = {rate / bare:.2f} x bare bf16")
    bb.set_precision(before)
    return out


# -- serve ----------------------------------------------------------------------------------------
def part_serve(bb: Any, device: str, cfg: dict, work: Path, smoke: bool) -> dict:
    import httpx

    from serve import Server, make_bundle, test_jpeg

    bundle = make_bundle(work / "bundle", cfg["backbone"], cfg["cells"])
    jpeg = test_jpeg(640, 480)
    env = {"PIGEON_DEVICE": device, "PIGEON_PRECISION": "auto", "PIGEON_MAX_BATCH_IMAGES": str(cfg["serve_batch"]), "PIGEON_BATCH_WAIT_MS": "2",
           "PIGEON_MAX_CONCURRENCY": "1", "PIGEON_MAX_QUEUE": str(cfg["serve_clients"] * 2)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        srv = Server(bundle, threads=os.cpu_count() or 1)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            one = []
            for i in range(cfg["serve_requests"] // 4 + 3):
                t = time.perf_counter()
                r = c.post("/locate", files={"image": ("b.jpg", jpeg, "image/jpeg")})
                if r.status_code != 200:
                    raise RuntimeError(f"/locate answered {r.status_code}: {r.text[:300]}")
                if i >= 3:
                    one.append((time.perf_counter() - t) * 1000)
        many = concurrent_load(srv.url, jpeg, cfg["serve_clients"], cfg["serve_requests"])
    finally:
        srv.stop()
    bare1 = 1000.0 / bare_forward(bb, device, 1, "bf16" if device.startswith("cuda") else "fp32", cfg["forward_seconds"])
    bare_b = bare_forward(bb, device, cfg["serve_batch"], "bf16" if device.startswith("cuda") else "fp32", cfg["forward_seconds"])
    p50 = statistics.median(one)
    return {"p50_ms_1_client": round(p50, 2), "bare_b1_ms": round(bare1, 2), "p50_over_bare_b1": round(p50 / bare1, 3),
            "clients": cfg["serve_clients"], "rps": round(many["rps"], 1), "errors": many["errors"],
            "bare_batched_images_per_s": round(bare_b, 1), "rps_over_bare_batched": round(many["rps"] / bare_b, 3)}


def concurrent_load(url: str, jpeg: bytes, clients: int, requests: int) -> dict:
    """`requests` POST /locate from `clients` threads (bounded); req/s of 200s and the non-200 count."""
    import threading

    import httpx

    left = [requests]
    lock = threading.Lock()
    ok, errors = [0], [0]

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                r = c.post("/locate", files={"image": ("b.jpg", jpeg, "image/jpeg")})
                with lock:
                    if r.status_code == 200:
                        ok[0] += 1
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": ok[0] / (time.perf_counter() - t0), "errors": errors[0]}


# -- pretrain -------------------------------------------------------------------------------------
def part_pretrain(device: str, cfg: dict, work: Path) -> dict:
    import torch

    from pigeon.geocells import GeoCells
    from pigeon.pretrain import PretrainConfig, pretrain

    from pigeon.bundle import Bundle

    if not (work / "bundle" / "manifest.json").exists():
        from serve import make_bundle
        make_bundle(work / "bundle", cfg["backbone"], cfg["cells"])
    cells = GeoCells.load(Bundle(work / "bundle").part_path("cells"))
    steps = cfg["pretrain_steps"]
    need = cfg["pretrain_batch"] * steps
    shards = work / "shards" if (work / "shards").exists() and cfg["photos"] >= need else write_shards(work / "pre_shards", need, cfg["per_shard"], cfg["image_px"])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    pc = PretrainConfig(epochs=1, batch_size=cfg["pretrain_batch"], max_steps=steps, warmup=1, unfreeze_last=-1, amp=device.startswith("cuda"),
                        samples_per_epoch=need, shuffle_buffer=64, checkpoint_every=10_000)
    res = pretrain(shards, cells, cfg["backbone"], work / "pretrained", config=pc, progress=False, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"batch": cfg["pretrain_batch"], "steps": res.steps, "steps_per_s": round(res.steps / res.seconds, 3) if res.seconds else None,
            "images_per_s": round(res.images_per_s, 1), "peak_gpu_gib": round(peak, 2) if peak is not None else None,
            "final_loss": round(float(res.losses[-1]), 4) if res.losses else None}


# -- head training --------------------------------------------------------------------------------
def part_head(device: str, cfg: dict, work: Path, spec: str, backbone_hash: str) -> dict:
    """Seconds per head-training step (batch `head_batch`) over `head_rows` x `head_dim` float16
    embeddings memory-mapped from shards (random unit vectors: the step's cost does not depend on
    them), over the serve bundle's cells; the bundle names the benchmark's backbone (`head_dim` is its
    width), which train loads for the text prototypes of cells without photos."""
    import torch

    from pigeon.bundle import Bundle
    from pigeon.embeddings import ShardFiles, write_header
    from pigeon.train import TrainConfig, train

    import pandas as pd

    bundle = work / "head_bundle"
    src = Bundle(work / "bundle")
    b = Bundle(bundle, create=True)
    b.write_part("cells", lambda tmp: tmp.write_bytes(src.part_path("cells").read_bytes()))
    b.set_backbone(spec, backbone_hash)
    folder = work / "head_emb"
    n, dim = cfg["head_rows"], cfg["head_dim"]
    per = min(n, 500_000)
    shards = (n + per - 1) // per
    rng = np.random.default_rng(0)
    write_header(folder, {"backbone_spec": spec, "backbone_hash": backbone_hash, "dim": dim, "view": "plain",
                          "source": {"kind": "synthetic", "spec": f"bench/gpu.py n={n}", "id": f"gpu-{n}-{dim}"},
                          "shards": [f"synthetic {i}" for i in range(shards)]})
    for i in range(shards):
        m = min(per, n - i * per)
        e = rng.standard_normal((m, dim), dtype=np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        rows = pd.DataFrame({"pos": np.arange(m), "key": [f"{i}:{j}" for j in range(m)], "lat": rng.uniform(-60, 70, m),
                             "lon": rng.uniform(-180, 180, m), "split": np.where(rng.random(m) < 0.99, "train", "val")})
        ShardFiles(folder, i).write(e.astype(np.float16), rows, {"shard": f"synthetic {i}", "fingerprint": "synthetic", "skipped": {}})
    examples = cfg["head_batch"] * cfg["head_steps"]
    t0 = time.perf_counter()
    rep = train(None, bundle, config=TrainConfig(epochs=1, batch_size=cfg["head_batch"], embeddings=str(folder), progress=False,
                                                 samples_per_epoch=examples, calibration_rows=2000), device=device)
    total = time.perf_counter() - t0
    steps = max(1, examples // cfg["head_batch"])
    return {"rows": n, "dim": dim, "batch": cfg["head_batch"], "steps": steps, "seconds_per_step": round(rep["train_seconds"] / steps, 4),
            "run_seconds": round(total, 1), "device": device, "torch_threads": torch.get_num_threads()}


# -- main -----------------------------------------------------------------------------------------
PARTS: dict[str, Callable] = {}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU with `tiny` and small sizes (< 1 min)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    ap.add_argument("--parts", default="forward,embed,serve,pretrain,head", help="comma list of parts to run")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    device = "cpu" if args.smoke and not args.device else device_of(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    import torch

    from pigeon.backbones import create_backbone

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    result: dict[str, Any] = {"device": gpu_name(device), "backbone": cfg["backbone"], "smoke": bool(args.smoke),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bb = create_backbone(cfg["backbone"], device=device)
        bb.model.eval()
        spec, bb_hash, dim = bb.spec, bb.hash, bb.embed_dim
        cfg["head_dim"] = dim
        forward = part_forward(bb, device, cfg) if "forward" in parts else {}
        if forward:
            result["forward_images_per_s"] = forward
        if "embed" in parts:
            result["embed"] = part_embed(bb, device, cfg, work, forward)
        if "serve" in parts:
            result["serve"] = part_serve(bb, device, cfg, work, args.smoke)
        del bb
        if "pretrain" in parts:
            result["pretrain"] = part_pretrain(device, cfg, work)
        if "head" in parts:
            if not (work / "bundle" / "manifest.json").exists():
                from serve import make_bundle
                make_bundle(work / "bundle", cfg["backbone"], cfg["cells"])
            result["head"] = part_head(device, cfg, work, spec, bb_hash)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    table(result)
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.write_text(text)
    return result


def table(r: dict) -> None:
    """The figures as a Markdown table on stderr (docs/benchmarks.md takes it as it is)."""
    rows = [("device", r["device"]), ("backbone", r["backbone"])]
    for k, v in r.get("forward_images_per_s", {}).items():
        rows.append((f"bare forward {k.replace('_b', ' batch ')}", f"{v} images/s"))
    for k, v in r.get("embed", {}).items():
        if k.startswith("workers_"):
            rows.append((f"pigeon embed, {k.split('_')[1]} loader workers", f"{v['images_per_s']} images/s = {v['over_bare_bf16']} x bare bf16"))
    s = r.get("serve")
    if s:
        rows.append(("/locate p50, 1 client", f"{s['p50_ms_1_client']} ms = {s['p50_over_bare_b1']} x bare batch-1 forward"))
        rows.append((f"/locate, {s['clients']} clients", f"{s['rps']} req/s = {s['rps_over_bare_batched']} x bare batched forward"))
    p = r.get("pretrain")
    if p:
        rows.append((f"pretrain, batch {p['batch']}", f"{p['steps_per_s']} steps/s, peak {p['peak_gpu_gib']} GiB"))
    h = r.get("head")
    if h:
        rows.append((f"head training, {h['rows']:,} x {h['dim']}", f"{h['seconds_per_step']} s/step at batch {h['batch']}"))
    log("| figure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows))


if __name__ == "__main__":
    main()
