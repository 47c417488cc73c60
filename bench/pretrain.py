"""Benchmark `pigeon pretrain`: images/s for `tiny` and `lite`, and zero-shot country accuracy of `lite`
on streetview_mini (4 countries; 75% of locations to pretrain on, 25% held out) before and after.

Prints one JSON line. Usage: .venv/bin/python bench/pretrain.py [--epochs 4 --lr 1e-4 --batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "real" / "streetview_mini"


def zero_shot_country_accuracy(bb, df: pd.DataFrame, countries: list[str]) -> float:
    from pigeon.datasets import load_image

    img = bb.embed_images([load_image(p) for p in df["path"]], batch_size=32)
    txt = bb.embed_texts([f"A photo in {c}." for c in countries])
    pred = np.asarray(countries)[np.argmax(img @ txt.T, axis=1)]
    return float((pred == df["country_name"].to_numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--unfreeze-last", type=int, default=2)
    ap.add_argument("--speed-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pigeon.geocells import build_cells
    from pigeon.backbones import backbone_from_bundle, create_backbone
    from pigeon.bundle import Bundle
    from pigeon.datasets import read_manifest
    from pigeon.pretrain import PretrainConfig, pretrain

    if not (DATA / "manifest.csv").exists():
        sys.exit(f"no {DATA}; this benchmark needs ../shared/data/real/streetview_mini")
    tmp = Path(tempfile.mkdtemp(prefix="pigeon-bench-pretrain-"))
    df = pd.read_csv(DATA / "manifest.csv")
    df["image"] = [str(DATA / p) for p in df["image"]]
    locs = np.sort(df["location_id"].unique())
    rng = np.random.default_rng(0)
    test_locs = set(rng.choice(locs, size=len(locs) // 4, replace=False))
    df["split"] = np.where(df["location_id"].isin(test_locs), "test", "train")
    manifest = tmp / "manifest.csv"
    df.to_csv(manifest, index=False)
    full = read_manifest(manifest)
    train = full[full["split"] == "train"]
    cells = build_cells(train["lat"].to_numpy(), train["lon"].to_numpy(), min_size=8, max_size=40, progress=False)
    cells.save(tmp / "cells.parquet")
    test = full[full["split"] == "test"].copy()
    test["country_name"] = cells.gdf["country"].to_numpy()[cells.cell_of(test["lat"], test["lon"])]
    countries = sorted(cells.gdf["country"].unique())

    out: dict = {"bench": "pretrain", "train_images": int(len(train)), "test_images": int(len(test)), "cells": len(cells), "countries": countries,
                 "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "unfreeze_last": args.unfreeze_last, "threads": args.threads}
    # speed: a few steps each (first step excluded by measuring a separate warm run is not worth it; steps are long)
    for spec in ("tiny", "lite"):
        r = pretrain(manifest, tmp / "cells.parquet", spec, tmp / f"speed-{spec}",
                     PretrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, unfreeze_last=args.unfreeze_last, max_steps=args.speed_steps),
                     progress=False)
        out[f"{spec}_images_per_s"] = round(r.images_per_s, 2)

    lite = create_backbone("lite")
    out["lite_zero_shot_country_acc_before"] = round(zero_shot_country_accuracy(lite, test, countries), 4)
    t0 = time.perf_counter()
    r = pretrain(manifest, tmp / "cells.parquet", "lite", tmp / "lite",
                 PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, unfreeze_last=args.unfreeze_last, warmup=0.1),
                 progress=True)
    out["lite_pretrain_seconds"] = round(time.perf_counter() - t0, 1)
    out["lite_pretrain_images_per_s"] = round(r.images_per_s, 2)
    out["lite_loss_first_last"] = [round(r.losses[0], 4), round(float(np.mean(r.losses[-3:])), 4)]
    tuned = backbone_from_bundle(Bundle(tmp / "lite"))
    out["lite_zero_shot_country_acc_after"] = round(zero_shot_country_accuracy(tuned, test, countries), 4)
    out["chance"] = round(1 / len(countries), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
