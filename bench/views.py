"""Several views of one place, end to end on streetview_mini: the pipeline against plain retrieval.

For each of `--seeds` splits of ../shared/data/real/streetview_mini by place (`location_id`: 75% of
the 100 places train+val, a tenth of those val; 25% test), the whole pipeline as a user runs it:
`build_cells` on the train+val photos, `train` (`lite`; splits by place, the view combination chosen
on val places), `build_index` (gallery = train photos; val chooses the refinement mode), then
`evaluate --split test --group-by location_id`. Reported per photo and per place (4 views combined):
median km and the shares within 1/25/200 km, next to plain nearest-neighbour retrieval over the same
gallery with the same (combined) embedding (`baseline_retrieval`), and every refinement mode on the
same test photos (`photo_MODE`, `place_MODE`: what validation's choice left on the table). Each `--tau` value is a variant
(`auto` = half the cells' spacing, the default; 65 = PIGEOTTO's). Figures pool the test photos
(places) of all splits; `median_km_per_split` shows the spread. Prints one JSON line.

    .venv/bin/python bench/views.py [--seeds 10] [--tau auto,65]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "real" / "streetview_mini"
SHARES = (1, 25, 200)


def _split(df, seed: int):
    perm = np.random.default_rng(seed).permutation(df["location_id"].unique())
    n_gal = int(round(0.75 * len(perm)))
    n_val = max(1, n_gal // 10)
    side = {p: "train" for p in perm[: n_gal - n_val]} | {p: "val" for p in perm[n_gal - n_val: n_gal]} | {p: "test" for p in perm[n_gal:]}
    return df.assign(split=df["location_id"].map(side))


def one_split(df, seed: int, tau: float | None, tmp: Path) -> dict:
    """The pipeline on one split; per-photo and per-place errors (km) of the pipeline and of retrieval."""
    from pigeon.indexing import build_index
    from pigeon.bundle import Bundle
    from pigeon.core.sphere import haversine_km
    from pigeon.evaluate import evaluate
    from pigeon.geocells import build_cells
    from pigeon.places import place_truths
    from pigeon.predictor import Predictor
    from pigeon.train import TrainConfig, train

    d = _split(df, seed)
    manifest = tmp / f"split{seed}.csv"
    d.to_csv(manifest, index=False)
    seen = d[d["split"] != "test"]
    cells = build_cells(seen["lat"].to_numpy(), seen["lon"].to_numpy(), min_size=8, max_size=40, progress=False)
    bundle = tmp / f"bundle{seed}-{tau}"
    Bundle(bundle, create=True).write_part("cells", cells.save)
    cache = str(tmp / "cache")
    t0 = time.perf_counter()
    rep = train(manifest, bundle, backbone="lite", config=TrainConfig(epochs=60, patience=10, tau=tau, seed=seed, cache_dir=cache, progress=False))
    idx = build_index(manifest, bundle, cache_dir=cache, progress=False)
    m = evaluate(bundle, manifest, split="test", cache_dir=cache, progress=False, plots=False, group_by="location_id", thresholds=SHARES)
    seconds = time.perf_counter() - t0
    # the per-row errors behind evaluate's figures, to pool the splits (evaluate reports summaries)
    from pigeon.datasets import open_source
    from pigeon.embed import cached_embeddings

    pred = Predictor.from_bundle(bundle)
    store, _ = cached_embeddings(open_source(manifest), pred.backbone, cache, progress=False)
    rows = store.rows
    sel = np.flatnonzero(rows["split"].astype(str).to_numpy() == "test")
    emb, tlat, tlon = store.take(sel), rows["lat"].to_numpy()[sel], rows["lon"].to_numpy()[sel]
    places = rows["location_id"].astype(str).to_numpy()[sel]
    p = pred.predict_embeddings(emb, top_k=1)
    placed = pred.predict_places(emb, places, top_k=1)
    pp, codes, labels = placed.arrays, placed.codes, placed.labels
    plat, plon = place_truths(tlat, tlon, codes, len(labels))
    def retrieval(q, la, lo):
        glat, glon, _ = pred.gallery.gallery.nearest(q)
        return haversine_km(glat, glon, la, lo)

    pe = placed.mean_embeddings
    out = {
        "photo": haversine_km(p["lat"], p["lon"], tlat, tlon), "place": haversine_km(pp["lat"], pp["lon"], plat, plon),
        "photo_retrieval": retrieval(emb, tlat, tlon), "place_retrieval": retrieval(pe, plat, plon),
    }
    # every refinement mode on the same test photos and places (validation picked one of them)
    import dataclasses

    from pigeon.index.refine import MODES

    for mode in MODES:
        cfg = dataclasses.replace(pred.refine, mode=mode)
        r = pred.gallery.answer(emb, p["probs"], cfg)
        out[f"photo_{mode}"] = haversine_km(r.lat, r.lon, tlat, tlon)
        r = pred.gallery.answer(pe, pp["probs"], cfg)
        out[f"place_{mode}"] = haversine_km(r.lat, r.lon, plat, plon)
    # the pooled errors must be evaluate's own figures on this split
    assert abs(float(np.median(out["photo"])) - m["median_km"]) < 1e-6 and abs(float(np.median(out["place"])) - m["per_place"]["median_km"]) < 1e-6
    assert abs(float(np.median(out["place_retrieval"])) - m["per_place"]["baseline_retrieval"]["median_km"]) < 1e-6
    meta = {"tau_km": rep["tau_km"], "combine_mode": rep.get("combine_mode"), "refine_mode": idx.get("refine_mode"),
            "cells": len(cells), "top_cell_accuracy_photo": m.get("cell_accuracy"), "seconds": round(seconds, 1)}
    return {"errors": out, "meta": meta}


def _summary(km: np.ndarray) -> dict:
    out = {"median_km": round(float(np.median(km)), 1)}
    out.update({f"within_{d}km": round(float(np.mean(km <= d)), 3) for d in SHARES})
    return out


def main() -> None:
    import pandas as pd
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="place splits")
    ap.add_argument("--tau", default="auto,65", help="comma-separated label smoothing variants: auto or km")
    a = ap.parse_args()
    torch.set_num_threads(2)
    df = pd.read_csv(DATA / "manifest.csv")
    df["image"] = [str(DATA / p) for p in df["image"]]
    res: dict = {"bench": "views", "data": "streetview_mini (400 photos, 4 views x 100 places)", "backbone": "lite", "seeds": a.seeds}
    with tempfile.TemporaryDirectory() as d:
        for t in a.tau.split(","):
            tau = None if t.strip() == "auto" else float(t)
            runs = [one_split(df, s, tau, Path(d)) for s in range(a.seeds)]
            var: dict = {}
            for key in runs[0]["errors"]:
                km = np.concatenate([r["errors"][key] for r in runs])
                var[key] = _summary(km) | {"n": int(len(km)), "median_km_per_split": [round(float(np.median(r["errors"][key])), 1) for r in runs]}
            var["runs"] = [r["meta"] for r in runs]
            res[f"tau={t.strip()}"] = var
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
