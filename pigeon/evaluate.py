"""`pigeon evaluate`: how far off a bundle's guesses are on a manifest split.

Writes metrics.json (the field's standard figures, and how often the 50% / 90% uncertainty circles
hold the truth), per_country.csv (n, median km, country
accuracy per true country), predictions.csv, error_cdf.png and world_map.png (guesses vs truths
over the bundled admin-1 outlines). Country and admin-1 accuracy compare the guess's and the truth's
admin-1 polygons (bundled Natural Earth), so they do not depend on how the cells were drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pigeon.core.io import atomic_path, check_writable
from pigeon.core.sphere import haversine_km, spherical_mean

from .calibration import coverage
from .core.errors import UserError
from .datasets.sources import open_source
from .embed import cached_embeddings, open_embeddings
from .metrics import THRESHOLDS_KM, geo_metrics, reverse_geocode
from .predictor import Predictor


def evaluate(
    bundle_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    split: str | None = "test",
    out: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    plots: bool = True,
    embeddings: str | os.PathLike | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Evaluate the bundle on the `split` rows of `data` (any data source; all rows if None), or of the
    embedding folder `embeddings`; returns the metrics dict."""
    if out is not None:
        check_writable(Path(out) / "metrics.json", flag="--out")  # before the slow part, not after it
    if data is None and embeddings is None:
        raise UserError("`pigeon evaluate` needs --data SOURCE or --embeddings FOLDER")
    pred = Predictor.from_bundle(bundle_dir, device=device)
    if embeddings is not None:
        store = open_embeddings(embeddings, backbone_hash=pred.backbone.hash)
    else:
        store, _ = cached_embeddings(open_source(data), pred.backbone, cache_dir, workers=workers, progress=progress)
    rows = store.rows
    sel = np.arange(len(rows))
    if split:
        sel = np.flatnonzero(rows["split"].astype(str).str.lower().to_numpy() == split.lower())
        if len(sel) == 0:
            raise UserError(f"data {embeddings or data} has no rows with split {split!r}; pick another --split or give `--split all`")
    df = pd.DataFrame({"image": store.keys(sel), "lat": rows["lat"].to_numpy()[sel], "lon": rows["lon"].to_numpy()[sel]})
    p = pred.predict_embeddings(store.take(sel), top_k=1)
    tlat, tlon = df["lat"].to_numpy(), df["lon"].to_numpy()
    t_iso, t_country, t_adm = reverse_geocode(tlat, tlon)
    p_iso, p_country, p_adm = reverse_geocode(p["lat"], p["lon"])
    m = geo_metrics(p["lat"], p["lon"], tlat, tlon, p_iso, t_iso, p_adm, t_adm)
    # Baselines that say what the figures are worth on this data: always answering the centroid of the
    # training photos (never of the photos scored), and the true cell's centre.
    is_train = rows["split"].astype(str).str.lower().to_numpy() == "train"
    base = is_train if is_train.any() else np.ones(len(rows), bool)
    clat, clon = spherical_mean(rows["lat"].to_numpy()[base], rows["lon"].to_numpy()[base])
    m["baseline_centroid_median_km"] = float(np.median(haversine_km(clat, clon, tlat, tlon)))
    m["baseline_centroid_of"] = "train rows" if is_train.any() else "all rows (the data has no train rows)"
    true_cell = pred.cells.cell_of(tlat, tlon)
    m["oracle_cell_median_km"] = float(np.median(haversine_km(pred.centres[true_cell, 0], pred.centres[true_cell, 1], tlat, tlon)))
    m["cell_accuracy"] = float(np.mean(p["top_cells"][:, 0] == true_cell))
    km = haversine_km(p["lat"], p["lon"], tlat, tlon)
    m.update(radius_coverage(km, p["radius_km_50"], p["radius_km_90"]), radii_calibrated=bool(pred.radius_model.calibrated))
    per = pd.DataFrame({"iso_a2": t_iso, "country": t_country, "km": km, "ok": p_iso == t_iso})
    table = per.groupby(["iso_a2", "country"]).agg(n=("km", "size"), median_km=("km", "median"), country_accuracy=("ok", "mean")).reset_index()
    table = table.sort_values("n", ascending=False).reset_index(drop=True)
    m["split"] = split or "all"
    m["bundle"] = str(bundle_dir)
    if out is not None:
        preds = pd.DataFrame({"image": df["image"], "lat": tlat, "lon": tlon, "pred_lat": p["lat"], "pred_lon": p["lon"],
                              "km": km, "confidence": p["confidence"], "radius_km_50": p["radius_km_50"],
                              "radius_km_90": p["radius_km_90"], "true_country": t_iso, "pred_country": p_iso})
        _write_outputs(Path(out), m, table, preds, plots)
    m["per_country"] = table.to_dict(orient="records")
    return m


def _write_outputs(o: Path, m: dict[str, Any], table: pd.DataFrame, preds: pd.DataFrame, plots: bool) -> None:
    """metrics.json, per_country.csv, predictions.csv and (with `plots`) the two figures, each written atomically."""
    o.mkdir(parents=True, exist_ok=True)
    with atomic_path(o / "metrics.json") as tmp:
        tmp.write_text(json.dumps(m, indent=2))
    with atomic_path(o / "per_country.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4g")
    with atomic_path(o / "predictions.csv") as tmp:
        preds.to_csv(tmp, index=False, float_format="%.6g")
    if plots:
        km = preds["km"].to_numpy()
        plot_error_cdf(km, o / "error_cdf.png")
        plot_world_map(preds["lat"].to_numpy(), preds["lon"].to_numpy(), preds["pred_lat"].to_numpy(), preds["pred_lon"].to_numpy(), o / "world_map.png")


def radius_coverage(km: np.ndarray, r50: np.ndarray, r90: np.ndarray) -> dict[str, float]:
    """Share of photos whose error is within their 50% / 90% radius (nominal 0.5 / 0.9), and the median radii."""
    return {"share_within_radius_50": coverage(km, r50), "share_within_radius_90": coverage(km, r90),
            "median_radius_km_50": float(np.median(r50)), "median_radius_km_90": float(np.median(r90))}


def plot_error_cdf(km: np.ndarray, dest: Path) -> None:
    """Share of guesses within d km, log x axis, with the standard thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    xs = np.sort(np.maximum(km, 0.1))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
        ax.text(t, 1.01, f"{t:g}", ha="center", va="bottom", fontsize=7, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(0.5, 20000)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("error (km)")
    ax.set_ylabel("share of photos within")
    ax.set_title(f"error CDF (n={len(km)}, median {np.median(km):.0f} km)", fontsize=10)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_world_map(tlat, tlon, plat, plon, dest: Path, max_lines: int = 2000) -> None:
    """Truths (dots) and guesses (crosses) joined by lines, over the bundled admin-1 outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shapely
    from matplotlib.collections import LineCollection

    from pigeon.geocells import bundled

    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    geoms = shapely.simplify(bundled.admin1().geometry.values, 0.1)
    rings = shapely.get_exterior_ring(shapely.get_parts(geoms))
    coords = [np.asarray(shapely.get_coordinates(r)) for r in rings if r is not None]
    ax.add_collection(LineCollection(coords, colors="0.75", linewidths=0.3))
    n = min(len(tlat), max_lines)
    segs = np.stack([np.stack([tlon[:n], tlat[:n]], 1), np.stack([plon[:n], plat[:n]], 1)], 1)
    segs = segs[np.abs(segs[:, 0, 0] - segs[:, 1, 0]) < 180]  # no lines across the whole map
    ax.add_collection(LineCollection(segs, colors="tab:red", linewidths=0.4, alpha=0.4))
    ax.scatter(tlon[:n], tlat[:n], s=5, c="tab:blue", label="truth")
    ax.scatter(plon[:n], plat[:n], s=12, c="tab:red", marker="x", label="guess")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("guesses vs truths", fontsize=10)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["evaluate", "radius_coverage", "plot_error_cdf", "plot_world_map"]
