"""Accuracy of refinement on photos: median km and 1/25/200 km shares for each refinement mode.

For each data set: a head trained with `pigeon.train` on the gallery photos (cells from
`geocells.build_cells` on the gallery's points), the same photos as the refinement gallery
(`index.build_gallery`: FAISS + in-cell OPTICS clusters), and held-out query photos answered with
each mode: `none` (top cell's centre), `cluster` (best cluster's centre), `nn` (nearest gallery
photo in the top cell), `cluster+nn` (PIGEON: nearest photo in the best cluster). Also, as
reference points, the nearest gallery photo over the whole gallery (plain retrieval, no head) and
the true cell's centre (the best `none` can do).

- streetview_mini (../shared/data/real/streetview_mini, `lite`): split by location_id, 75% of the
  locations are the gallery and the head's training set (a tenth of them the head's validation),
  25% are held out; repeated over `--seeds` location splits.
- the synthetic world (`pigeon.datasets.synthetic.make_world`, `tiny`): its train+val photos are
  the gallery, its test photos the queries.

Prints one JSON line.

    .venv/bin/python bench/refine_accuracy.py [--seeds 3] [--n-images 2000] [--skip-real] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SHARES_KM = (1, 25, 200)


def _summary(km: np.ndarray) -> dict:
    out = {"median_km": round(float(np.median(km)), 1)}
    out.update({f"within_{d}km": round(float(np.mean(km <= d)), 3) for d in SHARES_KM})
    return out


def refinement_table(manifest: Path, bundle_dir: Path, backbone: str, min_size: int, max_size: int,
                     cache_dir: Path, temperature: float, epochs: int = 60) -> dict:
    """Cells + head on the gallery rows (split train/val), gallery = those rows, queries = test rows;
    returns {mode: summary} plus the reference points."""
    import pandas as pd

    from pigeon.geocells import build_cells
    from pigeon.core.sphere import haversine_km
    from pigeon.index import Refiner, build_gallery
    from pigeon.index.refine import MODES
    from pigeon.bundle import Bundle
    from pigeon.datasets import open_source
    from pigeon.embed import cached_embeddings
    from pigeon.predictor import Predictor
    from pigeon.train import TrainConfig, train

    df = pd.read_csv(manifest)
    gal = df[df["split"] != "test"].reset_index(drop=True)
    qry = df[df["split"] == "test"].reset_index(drop=True)
    cells = build_cells(gal["lat"].to_numpy(), gal["lon"].to_numpy(), min_size=min_size, max_size=max_size, progress=False)
    b = Bundle(bundle_dir, create=True)
    b.write_part("cells", cells.save)
    t = time.perf_counter()
    train(manifest, b.path, backbone=backbone, config=TrainConfig(epochs=epochs, patience=10, cache_dir=str(cache_dir), progress=False))
    train_s = time.perf_counter() - t
    pred = Predictor.from_bundle(b.path)
    store, _ = cached_embeddings(open_source(manifest), pred.backbone, cache_dir, progress=False)  # train filled it
    by_key = pd.Series(np.arange(len(store)), index=store.keys())
    g_emb = store.take(by_key[gal["image"].astype(str)].to_numpy())
    q_emb = store.take(by_key[qry["image"].astype(str)].to_numpy())
    glat, glon = gal["lat"].to_numpy(), gal["lon"].to_numpy()
    t = time.perf_counter()
    g = build_gallery(g_emb, np.arange(len(gal), dtype=np.int64), glat, glon, pred.cells.cell_of(glat, glon),
                      image=gal["image"].astype(str).tolist())
    gallery_s = time.perf_counter() - t
    ref = Refiner.from_index(pred.centres, g.clusters, g.frame, g.index)
    probs = pred.cell_probs(q_emb)
    tlat, tlon = qry["lat"].to_numpy(), qry["lon"].to_numpy()
    out: dict = {"gallery": len(gal), "queries": len(qry), "cells": len(pred.centres), "clusters": len(g.clusters),
                 "head_train_s": round(train_s, 1), "gallery_build_s": round(gallery_s, 2)}
    for mode in MODES:
        r = ref.refine(q_emb, probs, mode=mode, temperature=temperature)
        out[mode] = _summary(haversine_km(r.lat, r.lon, tlat, tlon))
        if mode == "cluster+nn":
            out[mode]["guard_fallbacks"] = int(np.sum(r.mode == "none"))
    nlat, nlon, _ = g.nearest(q_emb)                                   # plain retrieval over everything
    out["retrieval_nn_whole_gallery"] = _summary(haversine_km(nlat, nlon, tlat, tlon))
    true_cell = pred.cells.cell_of(tlat, tlon)
    out["oracle_true_cell_centre"] = _summary(haversine_km(pred.centres[true_cell, 0], pred.centres[true_cell, 1], tlat, tlon))
    out["top_cell_accuracy"] = round(float(np.mean(probs.argmax(1) == true_cell)), 3)
    return out


def streetview(tmp: Path, seeds: int) -> dict:
    import pandas as pd

    src = ROOT.parent / "shared" / "data" / "real" / "streetview_mini"
    df = pd.read_csv(src / "manifest.csv")
    df["image"] = [str(src / p) for p in df["image"]]
    runs = []
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(df["location_id"].unique())
        n = len(perm)
        n_gal = int(round(0.75 * n))
        n_val = max(1, n_gal // 10)
        split = {loc: "train" for loc in perm[: n_gal - n_val]} | {loc: "val" for loc in perm[n_gal - n_val: n_gal]}
        split |= {loc: "test" for loc in perm[n_gal:]}
        d = df.assign(split=df["location_id"].map(split))
        manifest = tmp / f"sv{seed}.csv"
        d.to_csv(manifest, index=False)
        runs.append(refinement_table(manifest, tmp / f"sv_bundle{seed}", "lite", 8, 40, tmp / "cache", 1.6))
    return {"streetview_mini_lite": _mean_runs(runs), "streetview_mini_lite_runs": runs}


def _mean_runs(runs: list[dict]) -> dict:
    """Per mode: the mean over runs of each figure (and the per-run medians, to show the spread)."""
    out: dict = {}
    for key, val in runs[0].items():
        if isinstance(val, dict):
            out[key] = {k: round(float(np.mean([r[key][k] for r in runs])), 3) for k in val}
            out[key]["median_km_per_run"] = [r[key]["median_km"] for r in runs]
        else:
            out[key] = round(float(np.mean([r[key] for r in runs])), 3)
    out["runs"] = len(runs)
    return out


def synthetic(tmp: Path, n_images: int) -> dict:
    from pigeon.datasets.synthetic import make_world

    manifest = make_world(tmp / "world", n_images=n_images, image_size=64, seed=0)
    return {"synthetic_tiny": refinement_table(Path(manifest), tmp / "syn_bundle", "tiny", 20, 40, tmp / "cache", 1.6)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="streetview_mini location splits")
    ap.add_argument("--n-images", type=int, default=2000, help="synthetic world size")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    res: dict = {"bench": "refine_accuracy"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not a.skip_synthetic:
            res.update(synthetic(tmp, a.n_images))
        if not a.skip_real:
            res.update(streetview(tmp, a.seeds))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
