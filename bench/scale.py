"""Scale benchmark (issue 11): head training from embedding shards, and `pigeon embed` throughput and resume.

Parts (each prints JSON lines; run them one at a time on a shared machine):

- `train`: synthetic 512-d embeddings clustered by place (each photo's embedding is its place's
  direction plus its cell's plus noise, as bench/index.py makes them), coordinates resampled from
  ../shared/data/mp16_gps_100k.csv with a little jitter, written as embedding shards (float16,
  500K rows a shard); ~2,500 cells built from the 100K MP-16 points; then `train` (1 epoch) from
  the folder in a fresh process per size: peak RSS (ru_maxrss) and seconds per epoch (an epoch capped
  at --samples-per-epoch examples, so time per million examples shows whether the cost is linear).
- `embed`: a WebDataset of generated photos (`pigeon.datasets.synthetic`, 64 px PNG, 1,000 a
  shard); `pigeon embed --backbone tiny` with 1 and 2 processes (torchrun, gloo) and 0 / 2 loader
  workers: images/s; then a run killed with SIGKILL midway and resumed: time lost against an
  uninterrupted run, in shards.

    .venv/bin/python bench/scale.py train --sizes 100000 1000000 5000000 --samples-per-epoch 1000000
    .venv/bin/python bench/scale.py embed --photos 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MP16 = ROOT.parent / "shared" / "data" / "mp16_gps_100k.csv"
BACKBONE = "open_clip:ViT-B-32:none"   # 512-d, seeded random weights: its hash ties the folder to the bundle
SHARD_ROWS = 500_000


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- train ------------------------------------------------------------------------------------------
def make_bundle(work: Path) -> tuple[Path, str]:
    """A bundle with ~2,500 cells from the 100K MP-16 points, naming the 512-d backbone; its hash."""
    from pigeon.backbones import create_backbone
    from pigeon.bundle import Bundle
    from pigeon.geocells import build_cells

    bundle = work / "bundle"
    bb = create_backbone(BACKBONE)
    if not (bundle / "manifest.json").exists():
        pts = pd.read_csv(MP16)
        cells = build_cells(pts["LAT"].to_numpy(), pts["LON"].to_numpy(), min_size=20, max_size=60, progress=False)
        b = Bundle(bundle, create=True)
        b.write_part("cells", cells.save)
        b.set_backbone(bb.spec, bb.hash)
    return bundle, bb.hash


def write_store(folder: Path, n: int, backbone_hash: str, dim: int = 512, seed: int = 0) -> None:
    """n synthetic photos as an embedding folder, shard by shard (never all in memory)."""
    from pigeon.embeddings import ShardFiles, write_header

    if (folder / "embeddings.json").exists():
        return
    pts = pd.read_csv(MP16)
    plat, plon = pts["LAT"].to_numpy(), pts["LON"].to_numpy()
    rng = np.random.default_rng(seed)
    place_dir = rng.standard_normal((len(pts), dim), dtype=np.float32) / np.sqrt(dim)
    region_dir = rng.standard_normal((64, dim), dtype=np.float32) / np.sqrt(dim)
    region = ((plat + 90) // 30 * 12 + (plon + 180) // 30).astype(np.int64) % 64
    n_shards = (n + SHARD_ROWS - 1) // SHARD_ROWS
    write_header(folder, {"backbone_spec": BACKBONE, "backbone_hash": backbone_hash, "dim": dim, "view": "plain",
                          "source": {"kind": "synthetic", "spec": f"bench/scale.py n={n}", "id": f"synthetic-{n}-{seed}"},
                          "shards": [f"synthetic {i}" for i in range(n_shards)]})
    for i in range(n_shards):
        m = min(SHARD_ROWS, n - i * SHARD_ROWS)
        p = rng.integers(0, len(pts), m)
        lat = np.clip(plat[p] + rng.normal(0, 0.02, m), -89.9, 89.9)
        lon = (plon[p] + rng.normal(0, 0.02, m) + 180) % 360 - 180
        e = place_dir[p] + 1.5 * region_dir[region[p]] + rng.standard_normal((m, dim), dtype=np.float32) * (1.0 / np.sqrt(dim))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        u = rng.random(m)
        split = np.where(u < 0.9, "train", np.where(u < 0.95, "val", "test"))
        rows = pd.DataFrame({"pos": np.arange(m), "key": [f"{i}:{j}" for j in range(m)], "lat": lat, "lon": lon, "split": split})
        ShardFiles(folder, i).write(e.astype(np.float16), rows, {"shard": f"synthetic {i}", "fingerprint": "synthetic", "skipped": {}})


def train_child(folder: str, bundle: str, per_epoch: str) -> None:
    """One training epoch from the folder (at most `per_epoch` examples), in this (fresh) process; prints its figures."""
    import torch

    from pigeon.train import TrainConfig, train

    torch.set_num_threads(2)
    t = time.perf_counter()
    cap = int(per_epoch) or None
    rep = train(None, bundle, config=TrainConfig(epochs=1, batch_size=1024, embeddings=folder, progress=False, samples_per_epoch=cap))
    seen = min(cap or rep["n_train"], rep["n_train"])
    print(json.dumps({"seconds_total": time.perf_counter() - t, "train_seconds_per_epoch": rep["train_seconds"],
                      "examples_per_epoch": seen, "seconds_per_million_examples": rep["train_seconds"] / seen * 1e6,
                      "n_train": rep["n_train"], "n_val": rep["n_val"], "n_cells": rep["n_cells"],
                      "val_median_km": rep["history"][-1].get("val_median_km"), "peak_rss_gib": peak_gib()}))


def bench_train(work: Path, sizes: list[int], per_epoch: int) -> None:
    bundle, bhash = make_bundle(work)
    for n in sizes:
        folder = work / f"emb-{n}"
        t = time.perf_counter()
        write_store(folder, n, bhash)
        made = time.perf_counter() - t
        p = subprocess.run([sys.executable, __file__, "_train", str(folder), str(bundle), str(per_epoch)], capture_output=True, text=True)
        if p.returncode:
            print(json.dumps({"n": n, "error": p.stderr[-2000:]}))
            continue
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
        print(json.dumps({"part": "train", "n": n, "folder_gib": round(disk, 2), "write_seconds": round(made, 1), **rec}), flush=True)


# -- embed ------------------------------------------------------------------------------------------
def make_wds(work: Path, photos: int) -> Path:
    from pigeon.datasets.shards import write_webdataset
    from pigeon.datasets.synthetic import make_world

    wds = work / f"wds-{photos}"
    if not wds.exists():
        manifest = make_world(work / f"world-{photos}", n_images=photos, image_size=64, seed=3)
        df = pd.read_csv(manifest)
        df["path"] = [str(manifest.parent / p) for p in df["image"]]
        write_webdataset(df, wds, per_shard=1000, image_format="png")
    return wds


def _embed_cmd(wds: Path, out: Path, procs: int, workers: int) -> list[str]:
    base = ["-m", "pigeon.cli", "embed", "--data", str(wds), "--backbone", "tiny", "--out", str(out),
            "--workers", str(workers), "--batch-size", "64", "-q"]
    if procs == 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port", "29731", *base]


def _timed(cmd: list[str], procs: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // procs))}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return time.perf_counter() - t


def bench_embed(work: Path, photos: int) -> None:
    import shutil

    wds = make_wds(work, photos)
    full = None
    for procs, workers in ((1, 0), (1, 2), (2, 0), (2, 1)):
        out = work / f"emb-wds-{procs}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        s = _timed(_embed_cmd(wds, out, procs, workers), procs)
        if (procs, workers) == (1, 2):
            full = s
        print(json.dumps({"part": "embed", "photos": photos, "processes": procs, "loader_workers": workers,
                          "seconds": round(s, 1), "images_per_s": round(photos / s, 1)}), flush=True)
    bench_resume(work, wds, full)


def bench_resume(work: Path, wds: Path, full: float | None) -> None:
    """kill -9 halfway through a shard after half the shards, then the same command again: how many
    shards the second run embeds beyond those missing at the kill (0 = only the shard in flight was
    lost), and the seconds (noisy on a shared machine: start-up and load differ between runs)."""
    import shutil

    out = work / "emb-wds-killed"
    shutil.rmtree(out, ignore_errors=True)
    n_shards = len(list(wds.glob("*.tar")))
    full = full or _timed(_embed_cmd(wds, work / "emb-wds-full", 1, 2), 1)
    t = time.perf_counter()
    proc = subprocess.Popen(_embed_cmd(wds, out, 1, 2), env={**os.environ, "OMP_NUM_THREADS": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(out.glob("shard-*.json"))) < n_shards // 2:
        time.sleep(0.05)
    time.sleep(0.5 * full / n_shards)                    # halfway through the next shard
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = time.perf_counter() - t
    kept = len(list(out.glob("shard-*.json")))
    t = time.perf_counter()
    p = subprocess.run(_embed_cmd(wds, out, 1, 2), env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
    again = time.perf_counter() - t
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps({"part": "embed-resume", "shards": n_shards, "shards_kept_at_kill": kept,
                      "shards_embedded_on_resume": rep["shards_embedded_here"], "shards_reused_on_resume": rep["shards_reused_here"],
                      "shards_redone": rep["shards_embedded_here"] - (n_shards - kept), "vectors": rep["vectors"],
                      "seconds_before_kill": round(before, 1), "seconds_resumed": round(again, 1),
                      "seconds_uninterrupted": round(full, 1), "seconds_per_shard": round(full / n_shards, 1),
                      "seconds_lost": round(before + again - full, 1)}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        return train_child(sys.argv[2], sys.argv[3], sys.argv[4])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("train", "embed", "resume"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--samples-per-epoch", type=int, default=0, help="train: cap an epoch at this many examples (0: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pigeon-scale"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.part == "train":
        bench_train(a.work, a.sizes, a.samples_per_epoch)
    elif a.part == "embed":
        bench_embed(a.work, a.photos)
    else:
        bench_resume(a.work, make_wds(a.work, a.photos), None)


if __name__ == "__main__":
    main()
