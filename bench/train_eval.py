"""Benchmark: the head on the synthetic world (tiny) and on streetview_mini (lite), zero-shot and trained.

Prints one JSON line. Synthetic: median km and 25/200/750 km shares of `tiny` against the oracle
bound (the true cell's centre) and the centroid baseline; head-training speed in training examples/s.
streetview_mini (../shared/data/real/streetview_mini, split by location_id): median km and country
accuracy of `lite`, zero-shot and trained.

    .venv/bin/python bench/train_eval.py [--n-images 2000] [--skip-real]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bundle(path: Path, lat, lon, min_size: int, max_size: int):
    from pigeon.geocells import build_cells
    from pigeon.bundle import Bundle

    cells = build_cells(lat, lon, min_size=min_size, max_size=max_size, progress=False)
    b = Bundle(path, create=True)
    b.write_part("cells", cells.save)
    return b


def synthetic(tmp: Path, n_images: int) -> dict:
    import pandas as pd

    from pigeon.datasets.synthetic import make_world
    from pigeon.evaluate import evaluate
    from pigeon.train import TrainConfig, train

    t = time.perf_counter()
    manifest = make_world(tmp / "world", n_images=n_images, image_size=64, seed=0)
    t_world = time.perf_counter() - t
    df = pd.read_csv(manifest)
    tr = df[df["split"] == "train"]
    b = _bundle(tmp / "syn", tr["lat"].to_numpy(), tr["lon"].to_numpy(), 20, 40)
    rep = train(manifest, b.path, backbone="tiny", config=TrainConfig(epochs=60, patience=10, cache_dir=str(tmp / "cache"), progress=False))
    m = evaluate(b.path, manifest, split="test", cache_dir=str(tmp / "cache"), progress=False)
    return {
        "synthetic_images": n_images, "synthetic_world_s": round(t_world, 2), "synthetic_cells": rep["n_cells"],
        "tiny_median_km": round(m["median_km"], 1), "tiny_within_25km": round(m["within_25km"], 3),
        "tiny_within_200km": round(m["within_200km"], 3), "tiny_within_750km": round(m["within_750km"], 3),
        "tiny_country_acc": round(m["country_accuracy"], 3),
        "oracle_cell_median_km": round(m["oracle_cell_median_km"], 1), "centroid_median_km": round(m["baseline_centroid_median_km"], 1),
        "ece_before": round(rep["ece_before"], 3), "ece_after": round(rep["ece_after"], 3),
        "head_train_examples_per_s": round(rep["head_examples_per_s"]),
    }


def streetview(tmp: Path) -> dict:
    import numpy as np
    import pandas as pd

    from pigeon.evaluate import evaluate
    from pigeon.train import TrainConfig, train, train_zero_shot

    src = ROOT.parent / "shared" / "data" / "real" / "streetview_mini"
    df = pd.read_csv(src / "manifest.csv")
    locs = df["location_id"].unique()
    rng = np.random.default_rng(0)
    perm = rng.permutation(locs)
    n = len(perm)
    split = {l: "train" for l in perm[: int(0.6 * n)]} | {l: "val" for l in perm[int(0.6 * n): int(0.7 * n)]} | {l: "test" for l in perm[int(0.7 * n):]}
    df["split"] = df["location_id"].map(split)
    df["image"] = [str(src / p) for p in df["image"]]
    manifest = tmp / "sv.csv"
    df.to_csv(manifest, index=False)
    tr = df[df["split"] == "train"]
    out = {"sv_images": len(df), "sv_test_images": int((df["split"] == "test").sum())}
    b = _bundle(tmp / "sv_zs", tr["lat"].to_numpy(), tr["lon"].to_numpy(), 8, 16)
    train_zero_shot(b.path, backbone="lite")
    m = evaluate(b.path, manifest, split="test", cache_dir=str(tmp / "cache"), progress=False)
    out.update(sv_cells=int(len(__import__("pigeon.geocells", fromlist=["GeoCells"]).GeoCells.load(b.part_path("cells")))),
               lite_zero_shot_median_km=round(m["median_km"], 1), lite_zero_shot_country_acc=round(m["country_accuracy"], 3),
               sv_centroid_median_km=round(m["baseline_centroid_median_km"], 1), sv_oracle_cell_median_km=round(m["oracle_cell_median_km"], 1))
    b2 = _bundle(tmp / "sv_tr", tr["lat"].to_numpy(), tr["lon"].to_numpy(), 8, 16)
    rep = train(manifest, b2.path, backbone="lite", config=TrainConfig(epochs=60, patience=10, cache_dir=str(tmp / "cache"), progress=False))
    m = evaluate(b2.path, manifest, split="test", cache_dir=str(tmp / "cache"), progress=False)
    out.update(lite_trained_median_km=round(m["median_km"], 1), lite_trained_country_acc=round(m["country_accuracy"], 3),
               lite_trained_within_25km=round(m["within_25km"], 3), lite_embed_images_s=round(rep["embed_seconds"], 1))
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = synthetic(tmp, args.n_images)
        if not args.skip_real:
            res.update(streetview(tmp))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
