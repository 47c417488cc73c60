"""Coverage of the uncertainty circles: how often the truth lies within radius_km_50 / radius_km_90.

A calibrated 50% circle holds the truth for half of the held-out photos, a 90% circle for nine in
ten. For each data set: cells from `geocells.build_cells` on the training photos' points, a head
trained with `pigeon.train` (which fits each cell's spread on the train photos and the radii's scale
factors on the val photos), then `pigeon.evaluate` on held-out photos (`share_within_radius_50/90`).

- the synthetic world (`pigeon.datasets.synthetic.make_world(n_images, image_size=64, seed)`, the
  demo's world, `tiny`): its own train/val/test split, one world per `--seeds` seed.
- streetview_mini (../shared/data/real/streetview_mini, `lite`): 4 views at each of 100 locations,
  split by location_id, never by image, into `--folds` folds; fold f is the test set, fold f+1 the
  validation set, the rest trains; every location is tested once and the coverage is pooled.

Prints one JSON line: per run and pooled, the coverage of both circles (and, for comparison, of the
mixture's radii before the scale factors), the fitted factors, the median radii and the median error.

    .venv/bin/python bench/radii.py [--seeds 0 1 2] [--n-images 2000] [--folds 5] [--skip-real] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pigeon.bundle import Bundle
from pigeon.datasets.synthetic import make_world
from pigeon.evaluate import evaluate
from pigeon.geocells import build_cells
from pigeon.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
STREETVIEW = ROOT.parent / "shared" / "data" / "real" / "streetview_mini"


def one_run(manifest: Path, bundle_dir: Path, backbone: str, min_size: int, max_size: int, cache: Path) -> dict:
    """Cells on the train rows, a trained head, evaluation on the test rows: the coverage figures."""
    df = pd.read_csv(manifest)
    tr = df[df["split"] == "train"]
    cells = build_cells(tr["lat"].to_numpy(), tr["lon"].to_numpy(), min_size=min_size, max_size=max_size, progress=False)
    b = Bundle(bundle_dir, create=True)
    b.write_part("cells", cells.save)
    rep = train(manifest, b.path, backbone=backbone, config=TrainConfig(epochs=60, patience=10, cache_dir=str(cache), progress=False))
    m = evaluate(b.path, manifest, split="test", out=bundle_dir / "eval", cache_dir=str(cache), progress=False, plots=False)
    pr = pd.read_csv(bundle_dir / "eval" / "predictions.csv")
    scales = rep.get("radius_scales", [1.0, 1.0])          # the radii are the mixture's times these factors
    unscaled = [float(np.mean(pr["km"] <= pr[f"radius_km_{p}"] / s)) for p, s in zip((50, 90), scales)]
    return {
        "n_test": m["n"], "n_val": rep["n_val"], "cells": rep["n_cells"],
        "share_within_radius_50": round(m["share_within_radius_50"], 3), "share_within_radius_90": round(m["share_within_radius_90"], 3),
        "test_coverage_unscaled": [round(c, 3) for c in unscaled],
        "radius_scales": [round(s, 3) for s in rep.get("radius_scales", [])],
        "val_coverage_unscaled": [round(c, 3) for c in rep.get("val_coverage_unscaled", [])],
        "median_radius_km_50": round(m["median_radius_km_50"], 1), "median_radius_km_90": round(m["median_radius_km_90"], 1),
        "median_km": round(m["median_km"], 1), "calibrated": m["radii_calibrated"],
    }


def pooled(runs: list[dict]) -> dict:
    """Coverage over all runs' test photos together (each run weighted by its test photos)."""
    n = np.array([r["n_test"] for r in runs], dtype=np.float64)
    out = {"n_test": int(n.sum())}
    for k in ("share_within_radius_50", "share_within_radius_90"):
        out[k] = round(float(np.sum(n * [r[k] for r in runs]) / n.sum()), 3)
    out["test_coverage_unscaled"] = [round(float(np.sum(n * [r["test_coverage_unscaled"][j] for r in runs]) / n.sum()), 3) for j in (0, 1)]
    return out


def synthetic(tmp: Path, seeds: list[int], n_images: int) -> dict:
    runs = []
    for seed in seeds:
        manifest = make_world(tmp / f"world{seed}", n_images=n_images, image_size=64, seed=seed)
        runs.append({"seed": seed, **one_run(Path(manifest), tmp / f"syn{seed}", "tiny", 20, 40, tmp / "cache")})
    return {"synthetic_tiny": {"pooled": pooled(runs), "runs": runs}}


def streetview(tmp: Path, folds: int) -> dict:
    df = pd.read_csv(STREETVIEW / "manifest.csv")
    df["image"] = [str(STREETVIEW / p) for p in df["image"]]
    locs = np.random.default_rng(0).permutation(df["location_id"].unique())
    fold_of = {loc: i % folds for i, loc in enumerate(locs)}
    runs = []
    for f in range(folds):
        fold = df["location_id"].map(fold_of)
        split = np.where(fold == f, "test", np.where(fold == (f + 1) % folds, "val", "train"))
        manifest = tmp / f"sv_fold{f}.csv"
        df.assign(split=split).to_csv(manifest, index=False)
        runs.append({"fold": f, "test_locations": int(sum(v == f for v in fold_of.values())),
                     **one_run(manifest, tmp / f"sv{f}", "lite", 8, 16, tmp / "cache")})
    return {"streetview_mini_lite": {"pooled": pooled(runs), "runs": runs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="synthetic worlds")
    ap.add_argument("--n-images", type=int, default=2000, help="synthetic world size")
    ap.add_argument("--folds", type=int, default=5, help="streetview_mini location folds")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    res: dict = {"bench": "radii"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not a.skip_synthetic:
            res.update(synthetic(tmp, a.seeds, a.n_images))
        if not a.skip_real:
            res.update(streetview(tmp, a.folds))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
