"""Benchmark the zero-shot world bundle (`pigeon world`, issue 12) on streetview_mini with `lite`.

For `lite` as shipped and for `lite` after `pigeon pretrain` on streetview_mini's training places (split
by location_id, 25% of the 100 places held out, seed 0: the split and settings of bench/pretrain.py),
writes world bundles with `pigeon.world.build_world` for several cell sets and prompt-template counts
and scores each with `pigeon.evaluate` on the held-out photos (and, for `lite` as shipped, on all 400):
median km, share within 25 / 200 / 750 / 2500 km, country accuracy, and the oracle bound (the true
cell's centre). Cell sets: the bundled world cells (min 50 photos per cell inside a country), the same
recipe at 15 and 200, and plain `build_cells` on all MP-16 points at 100/200 (cells may cross borders
and split regions). Text embeddings are memoised per backbone (the same caption is embedded once).

Prints one JSON line per row and a markdown table.

    .venv/bin/python bench/world.py [--pretrain-epochs 4] [--pretrained DIR] [--skip-pretrain] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = SHARED / "real" / "streetview_mini"
KEYS = ("median_km", "within_25km", "within_200km", "within_750km", "within_2500km", "country_accuracy", "oracle_cell_median_km")


def split_manifest(tmp: Path) -> Path:
    """streetview_mini with absolute image paths and a split by place: 25% of locations test (seed 0)."""
    df = pd.read_csv(DATA / "manifest.csv")
    df["image"] = [str(DATA / p) for p in df["image"]]
    locs = np.sort(df["location_id"].unique())
    test = set(np.random.default_rng(0).choice(locs, size=len(locs) // 4, replace=False))
    df["split"] = np.where(df["location_id"].isin(test), "test", "train")
    path = tmp / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def cell_sets() -> dict[str, Any]:
    """The cell sets compared: the bundled world cells, the same recipe at other sizes, plain build_cells."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_bundled_data import world_cells  # the script that makes the bundled file

    from pigeon.geocells import build_cells

    pts = pd.read_csv(SHARED / "mp16_gps_100k.csv")
    lat, lon = pts["LAT"].to_numpy(np.float64), pts["LON"].to_numpy(np.float64)
    return {
        "world min 50 (bundled)": None,
        "world min 15": world_cells(lat, lon, min_size=15),
        "world min 200": world_cells(lat, lon, min_size=200),
        "build_cells 100/200": build_cells(lat, lon, min_size=100, max_size=200, progress=False),
    }


def memoise_texts(bb) -> None:
    """Make `bb.embed_texts` embed each distinct caption once (variants share most captions)."""
    cache: dict[str, np.ndarray] = {}
    embed = bb.embed_texts

    def embed_texts(texts, batch_size: int = 256) -> np.ndarray:
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            cache.update(zip(new, embed(new, batch_size=batch_size)))
        return np.stack([cache[t] for t in texts])

    bb.embed_texts = embed_texts


def pretrained_backbone(tmp: Path, manifest: Path, epochs: int) -> tuple[Path, float]:
    """`pigeon pretrain` of lite on the training places (cells 8/40 on their points), as bench/pretrain.py."""
    from pigeon.datasets import read_manifest
    from pigeon.geocells import build_cells
    from pigeon.pretrain import PretrainConfig, pretrain

    train = read_manifest(manifest)
    train = train[train["split"] == "train"]
    cells = build_cells(train["lat"].to_numpy(), train["lon"].to_numpy(), min_size=8, max_size=40, progress=False)
    cells.save(tmp / "pretrain-cells.parquet")
    t0 = time.perf_counter()
    pretrain(manifest, tmp / "pretrain-cells.parquet", "lite", tmp / "pretrained",
             PretrainConfig(epochs=epochs, batch_size=32, lr=1e-4, unfreeze_last=2, warmup=0.1), progress=False)
    return tmp / "pretrained", time.perf_counter() - t0


def score(tmp: Path, manifest: Path, bb, pretrained: Path | None, cells, name: str, templates: str, splits: list[str | None]) -> list[dict]:
    """One world bundle (build_world), scored on each split; the bundle is removed afterwards."""
    from pigeon.evaluate import evaluate
    from pigeon.world import build_world

    out = tmp / "bundle"
    t0 = time.perf_counter()
    rep = build_world(out, backbone=bb, templates=templates, pretrained=pretrained, cells=cells, force=True)
    build_s = time.perf_counter() - t0
    rows = []
    for split in splits:
        m = evaluate(out, manifest, split=split, cache_dir=str(tmp / "cache"), progress=False, plots=False)
        rows.append({"backbone": "lite + pretrain" if pretrained else "lite", "cells": name, "n_cells": rep["n_cells"],
                     "templates": rep["templates"], "split": split or "all", "n": m["n"], "build_s": round(build_s, 1),
                     **{k: round(m[k], 4) for k in KEYS}})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def variants(sets: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(cell set name, cells or None for the bundled ones, templates) to score."""
    out = [("world min 50 (bundled)", None, t) for t in ("1", "2", "4", "all")]
    for name in ("world min 15", "world min 200", "build_cells 100/200"):
        out += [(name, sets[name], t) for t in ("1", "all")]
    return out


def table(rows: list[dict]) -> str:
    head = "| backbone | cells | n cells | templates | photos | median km | ≤25 km | ≤200 km | ≤750 km | ≤2500 km | country acc. | oracle median km |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['cells']} | {r['n_cells']} | {r['templates']} | {r['n']} ({r['split']}) | {r['median_km']:.0f} | "
                     f"{r['within_25km']:.1%} | {r['within_200km']:.1%} | {r['within_750km']:.1%} | {r['within_2500km']:.1%} | "
                     f"{r['country_accuracy']:.1%} | {r['oracle_cell_median_km']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--pretrained", type=Path, default=None, help="reuse a `pigeon pretrain` bundle made on the same split")
    ap.add_argument("--skip-pretrain", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from pigeon.backbones import backbone_from_bundle, create_backbone
    from pigeon.bundle import Bundle

    if not (DATA / "manifest.csv").exists():
        sys.exit(f"no {DATA}; this benchmark needs ../shared/data/real/streetview_mini")
    tmp = Path(tempfile.mkdtemp(prefix="pigeon-bench-world-"))
    manifest = split_manifest(tmp)
    sets = cell_sets()
    rows: list[dict] = []
    bb = create_backbone("lite")
    memoise_texts(bb)
    for name, cells, t in variants(sets):
        rows += score(tmp, manifest, bb, None, cells, name, t, ["test", None] if cells is None else ["test"])
    if not args.skip_pretrain:
        pre, secs = (args.pretrained, 0.0) if args.pretrained else pretrained_backbone(tmp, manifest, args.pretrain_epochs)
        print(json.dumps({"pretrain_seconds": round(secs, 1), "pretrained": str(pre)}), flush=True)
        tuned = backbone_from_bundle(Bundle(pre))
        memoise_texts(tuned)
        for name, cells, t in variants(sets):
            rows += score(tmp, manifest, tuned, pre, cells, name, t, ["test"])
    print(table(rows))


if __name__ == "__main__":
    main()
