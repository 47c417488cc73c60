"""`pigeon evaluate`: how far off a bundle's guesses are on a manifest split.

Refuses photos that are in the bundle's gallery (they would answer with their own positions) unless
told otherwise; scores the bundle's recorded refinement mode, one given, or every mode side by side
(`refine="all"`). Writes metrics.json (the field's standard figures at the given thresholds, and how
often the 50% / 90% uncertainty circles hold the truth), per_country.csv (n, median km, country
accuracy, share within 25 km per true country), predictions.csv, error_cdf.png and world_map.png
(guesses vs truths over the bundled admin-1 outlines). Country and admin-1 accuracy compare the
guess's and the truth's admin-1 polygons (bundled Natural Earth), so they do not depend on how the
cells were drawn. Where the model fails (PIGEON's analyses): the figures by the truth's area type
(urban / suburban / rural, `pigeon.towns.area_types`), per true country, and the worst answers with
their top cells, in metrics.json and failures.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from pigeon.core.io import atomic_path, check_writable
from pigeon.core.sphere import chord_to_km, haversine_km, spherical_mean, to_xyz

from .calibration import coverage
from .core.errors import UserError
from .core.splits import TEST, TRAIN, VAL, normalise as normalise_splits, parse as parse_splits, rows_of
from .datasets.sources import open_source
from .embed import cached_embeddings, open_embeddings
from .index import MODES, RefineConfig
from .metrics import CITY_KM, THRESHOLDS_KM, geo_metrics, reverse_geocode
from .places import check_combine, group_column, place_truths
from .predictor import Predictor
from .towns import AREA_TYPES, area_type_rule, area_types

WORST_N = 20          # answers listed in `worst`
WORST_TOP_CELLS = 5   # cells listed with each of them
FIGURE_COUNTRIES = 15  # countries (most photos first) drawn in failures.png


def evaluate(
    bundle_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    split: str | Sequence[str] | None = TEST,
    out: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    plots: bool = True,
    embeddings: str | os.PathLike | None = None,
    workers: int = 0,
    refine: str | None = None,
    max_refinement_km: float | None = None,
    temperature: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS_KM,
    allow_gallery_overlap: bool = False,
    group_by: str | None = None,
    combine: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate the bundle on the `split` rows of `data` (any data source; all rows if None), or of the
    embedding folder `embeddings`; returns the metrics dict.

    refine / max_refinement_km / temperature: as `pigeon locate` (None: the bundle's recorded mode and
    RefineConfig's defaults); refine "all" scores every mode (`by_refine_mode`), the top-level figures
    staying those of the recorded mode. Photos that are in the bundle's gallery are refused unless
    `allow_gallery_overlap` (their answers would be their own positions). `group_by` (e.g. location_id):
    also one answer per place, its photos combined as views by `combine`, scored in `per_place`.
    `precision`: the backbone forwards' when `data` is embedded (auto/None: bf16 on CUDA, fp32 on CPU);
    the metrics' `precision` is the embeddings' (the folder's header). Where the answers fail, last:
    by_area_type, area_type_rule, per_country and worst (`failure_breakdown`)."""
    if out is not None:
        check_writable(Path(out) / "metrics.json", flag="--out")  # before the slow part, not after it
    if data is None and embeddings is None:
        raise UserError("`pigeon evaluate` needs --data SOURCE or --embeddings FOLDER")
    thresholds = checked_thresholds(thresholds)
    splits = parse_splits(split, "--split")
    split = ",".join(splits) if splits else "all"
    _check_place_options(group_by, combine)
    every = refine is not None and refine.strip().lower() == "all"
    pred = Predictor.from_bundle(bundle_dir, device=device, precision=precision,
                                 refine=RefineConfig.from_options(None if every else refine, max_refinement_km, temperature=temperature))
    if every and pred.gallery is None:
        raise UserError(f"--refine all: bundle {bundle_dir} has no gallery index, so every mode answers the top cell's centre; "
                        f"build one with `pigeon build-index`, or drop --refine")
    if embeddings is not None:
        store = open_embeddings(embeddings, backbone_hash=pred.backbone.hash)
    else:
        store, _ = cached_embeddings(open_source(data), pred.backbone, cache_dir, workers=workers, progress=progress)
    sel = _split_rows(store, splits, embeddings or data)
    keys, rows = store.keys(sel), store.rows.iloc[sel]
    tlat, tlon = rows["lat"].to_numpy(np.float64), rows["lon"].to_numpy(np.float64)
    overlap = gallery_overlap(pred, keys, rows.get("id"), tlat, tlon)
    if overlap.any() and not allow_gallery_overlap:
        raise UserError(f"{int(overlap.sum())} of the {len(sel)} {split} photos of {embeddings or data} are in bundle {bundle_dir}'s "
                        f"gallery (same key or id and place, e.g. {keys[np.flatnonzero(overlap)[0]]}): refinement would answer with their own "
                        f"positions. Rebuild the index from other photos (`pigeon build-index --splits train`), or pass --allow-gallery-overlap")
    emb = store.take(sel)
    p = pred.predict_embeddings(emb, top_k=1)
    m, preds, table, failures = _score(pred, p, keys, tlat, tlon, thresholds)
    m.update(_baselines(pred, store.rows, tlat, tlon), **retrieval_baseline(pred, emb, tlat, tlon, thresholds),
             refine_mode=pred.refine.mode if pred.gallery is not None else "none",
             gallery_overlap=int(overlap.sum()), split=split, bundle=str(bundle_dir), precision=store.precision)
    if every:
        m["by_refine_mode"] = _by_refine_mode(pred, emb, p["probs"], tlat, tlon, thresholds)
    if group_by is not None:
        m["per_place"] = per_place_metrics(pred, emb, rows, group_by, combine, thresholds, embeddings or data)
    m.update(failures)
    if out is not None:
        _write_outputs(Path(out), m, table, preds, plots, thresholds)
    return m


def _check_place_options(group_by: str | None, combine: str | None) -> None:
    """Refuse --combine without --group-by, or an unknown one, before anything slow."""
    if combine is not None:
        if group_by is None:
            raise UserError(f"--combine {combine} only applies to places: add --group-by COLUMN (e.g. location_id)")
        check_combine(combine, "--combine")


def per_place_metrics(pred: Predictor, emb: np.ndarray, rows: pd.DataFrame, group_by: str, combine: str | None,
                      thresholds: Sequence[float], name: Any) -> dict[str, Any]:
    """The figures of one answer per place: rows with the same `group_by` value are views of one place,
    combined by `combine` (`Predictor.predict_places`; a row without a place is a place of its own); a
    place's truth is its rows' spherical mean. Where it fails too: by_area_type, per_country and the
    worst places, as for photos."""
    col = group_column(rows.columns, group_by, f"data {name}")
    if col is None:
        raise UserError(f"--group-by {group_by}: data {name} has no place column to group by; name one, e.g. --group-by location_id")
    pp = pred.predict_places(emb, rows[col], combine=combine, top_k=1)
    p, labels, counts = pp.arrays, pp.labels, pp.views
    tlat, tlon = place_truths(rows["lat"].to_numpy(), rows["lon"].to_numpy(), pp.codes, len(labels))
    retrieval = retrieval_baseline(pred, pp.mean_embeddings, tlat, tlon, thresholds)
    t_iso, t_country, t_adm = reverse_geocode(tlat, tlon)
    p_iso, _, p_adm = reverse_geocode(p["lat"], p["lon"])
    m = geo_metrics(p["lat"], p["lon"], tlat, tlon, p_iso, t_iso, p_adm, t_adm, thresholds=thresholds)
    km = haversine_km(p["lat"], p["lon"], tlat, tlon)
    m.update(radius_coverage(km, p["radius_km_50"], p["radius_km_90"]), group_by=group_by, combine=pp.combine,
             n_places=int(len(labels)), views_per_place_mean=float(counts.mean()), views_per_place_max=int(counts.max()), **retrieval)
    failures, _, _ = failure_breakdown(p, km, pred.cells.cell_of(tlat, tlon), labels, "place", tlat, tlon,
                                       (t_iso, t_country, t_adm), (p_iso, p_adm), thresholds)
    m.update(failures)
    return m


def checked_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct thresholds in km; UserError unless each is a number > 0."""
    try:
        t = sorted({float(x) for x in thresholds})
    except (TypeError, ValueError) as e:
        raise UserError(f"--thresholds {thresholds}: give distances in km, e.g. 1,25,50,200,750,2500") from e
    if not t or not all(np.isfinite(x) and x > 0 for x in t):
        raise UserError(f"--thresholds {','.join(f'{x:g}' for x in t)}: give distances > 0 km, e.g. 1,25,50,200,750,2500")
    return tuple(t)


def _split_rows(store: Any, splits: tuple[str, ...] | None, name: Any) -> np.ndarray:
    """Store rows of `splits` (`pigeon.core.splits`; None: all)."""
    if len(store.rows) == 0:
        raise UserError(f"no photo of data {name} could be read; check its image paths (relative to the manifest's folder) and files")
    return rows_of(store.rows["split"], splits, f"data {name}", flag="--split")


def gallery_overlap(pred: Predictor, keys: np.ndarray, ids: Any, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n,) bool: photos that are in the predictor's gallery: the same source key (the gallery's `image`)
    or, when the data has an `id` column, the same id, at the same place (within 100 m)."""
    hit = np.zeros(len(keys), bool)
    if pred.gallery is None or not len(keys):
        return hit
    f = pred.gallery.gallery.frame
    glat, glon = f["lat"].to_numpy(np.float64), f["lon"].to_numpy(np.float64)
    pairs = [(f["image"].astype(str), pd.Series(keys).astype(str))]
    if ids is not None and "id" in f.columns:
        pairs.append((_id_text(f["id"]), _id_text(ids)))
    for gallery_side, ours in pairs:
        first = pd.Index(gallery_side).drop_duplicates()
        pos = pd.Index(gallery_side).get_indexer(first)   # first gallery row of each distinct value
        at = first.get_indexer(ours)
        ok = at >= 0
        row = pos[at[ok]]
        hit[np.flatnonzero(ok)] |= haversine_km(lat[ok], lon[ok], glat[row], glon[row]) < 0.1
    return hit


def _id_text(ids: Any) -> pd.Series:
    """Ids as text, integers without a decimal point (12, not 12.0), so ids of either dtype compare."""
    s = pd.Series(np.asarray(ids))
    n = pd.to_numeric(s, errors="coerce")
    return n.astype("Int64").astype(str) if n.notna().all() and (n == n.round()).all() else s.astype(str)


def _score(pred: Predictor, p: dict[str, Any], keys: np.ndarray, tlat: np.ndarray, tlon: np.ndarray,
           thresholds: Sequence[float]) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The metrics of the predictor's answers, the predictions table, the per-country table and
    where the answers fail (`failure_breakdown`)."""
    t_iso, t_country, t_adm = reverse_geocode(tlat, tlon)
    p_iso, _, p_adm = reverse_geocode(p["lat"], p["lon"])
    m: dict[str, Any] = geo_metrics(p["lat"], p["lon"], tlat, tlon, p_iso, t_iso, p_adm, t_adm, thresholds=thresholds)
    true_cell = pred.cells.cell_of(tlat, tlon)
    m["oracle_cell_median_km"] = float(np.median(haversine_km(pred.centres[true_cell, 0], pred.centres[true_cell, 1], tlat, tlon)))
    m["cell_accuracy"] = float(np.mean(p["top_cells"][:, 0] == true_cell))
    km = haversine_km(p["lat"], p["lon"], tlat, tlon)
    m.update(radius_coverage(km, p["radius_km_50"], p["radius_km_90"]), radii_calibrated=bool(pred.radius_model.calibrated))
    failures, table, area = failure_breakdown(p, km, true_cell, keys, "image", tlat, tlon, (t_iso, t_country, t_adm),
                                              (p_iso, p_adm), thresholds)
    preds = pd.DataFrame({"image": keys, "lat": tlat, "lon": tlon, "pred_lat": p["lat"], "pred_lon": p["lon"],
                          "km": km, "confidence": p["confidence"], "radius_km_50": p["radius_km_50"],
                          "radius_km_90": p["radius_km_90"], "true_country": t_iso, "pred_country": p_iso, "area_type": area})
    return m, preds, table, failures


def failure_breakdown(p: dict[str, Any], km: np.ndarray, true_cell: np.ndarray, labels: np.ndarray, label_key: str,
                      tlat: np.ndarray, tlon: np.ndarray, truth_regions: tuple[np.ndarray, ...],
                      answer_regions: tuple[np.ndarray, ...], thresholds: Sequence[float]) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray]:
    """Where the answers `p` (predict_embeddings' arrays) fail, as PIGEON analyses it: the figures by the
    truth's area type (`by_area_type`, with the `area_type_rule`), per true country (`per_country`, also
    returned as the table) and the WORST_N farthest answers (`worst`). `truth_regions` is
    reverse_geocode's (iso, country, admin-1 key) of the truths, `answer_regions` (iso, admin-1 key) of
    the answers. Returns (those keys, the per-country table, each truth's area type)."""
    t_iso, t_country, t_adm = truth_regions
    p_iso, p_adm = answer_regions
    area = area_types(tlat, tlon)
    by_area = {}
    for kind in AREA_TYPES:
        k = area == kind
        by_area[kind] = (geo_metrics(p["lat"][k], p["lon"][k], tlat[k], tlon[k], p_iso[k], t_iso[k], p_adm[k], t_adm[k], thresholds=thresholds)
                         if k.any() else {"n": 0})
    table = country_table(t_iso, t_country, km, p_iso == t_iso)
    worst = worst_answers(p, km, true_cell, labels, label_key, tlat, tlon, t_iso, p_iso, area)
    out = {"by_area_type": by_area, "area_type_rule": area_type_rule(), "per_country": table.to_dict(orient="records"), "worst": worst}
    return out, table, area


def country_table(t_iso: np.ndarray, t_country: np.ndarray, km: np.ndarray, country_ok: np.ndarray) -> pd.DataFrame:
    """Per true country, most photos first: iso_a2, country, n, median_km, country_accuracy and
    within_25km (the share within PIGEON's city-level CITY_KM)."""
    per = pd.DataFrame({"iso_a2": t_iso, "country": t_country, "km": km, "ok": country_ok, "city": km <= CITY_KM})
    table = per.groupby(["iso_a2", "country"]).agg(n=("km", "size"), median_km=("km", "median"), country_accuracy=("ok", "mean"),
                                                   within_25km=("city", "mean")).reset_index()
    return table.sort_values("n", ascending=False).reset_index(drop=True)


def worst_answers(p: dict[str, Any], km: np.ndarray, true_cell: np.ndarray, labels: np.ndarray, label_key: str,
                  tlat: np.ndarray, tlon: np.ndarray, t_iso: np.ndarray, p_iso: np.ndarray, area: np.ndarray,
                  n: int = WORST_N, top_k: int = WORST_TOP_CELLS) -> list[dict[str, Any]]:
    """The `n` answers farthest from their truths, farthest first (ties in input order): label, truth,
    answer, km, countries, the truth's area type, the true cell and its probability, and the `top_k`
    most probable cells (cell_id, probability): did the head miss the place, or refinement?"""
    probs = p["probs"]
    idx = np.argsort(-km, kind="stable")[:n]
    top = np.argsort(-probs[idx], axis=1, kind="stable")[:, :top_k]
    return [{label_key: str(labels[i]), "lat": float(tlat[i]), "lon": float(tlon[i]), "pred_lat": float(p["lat"][i]),
             "pred_lon": float(p["lon"][i]), "km": float(km[i]), "true_country": str(t_iso[i]), "pred_country": str(p_iso[i]),
             "area_type": str(area[i]), "true_cell": int(true_cell[i]), "true_cell_probability": float(probs[i, true_cell[i]]),
             "top_cells": [{"cell_id": int(c), "probability": float(probs[i, c])} for c in cells]}
            for i, cells in zip(idx, top)]


def _baselines(pred: Predictor, rows: pd.DataFrame, tlat: np.ndarray, tlon: np.ndarray) -> dict[str, Any]:
    """What the figures are worth on this data: always answering the centroid of the training photos
    (never of the photos scored); and how many truths lie beyond the cells' reach (farther than
    max_reach_km from every train/val photo of the data: no cell covers where they were taken)."""
    split = normalise_splits(rows["split"])
    is_train = split == TRAIN
    base = is_train if is_train.any() else np.ones(len(rows), bool)
    clat, clon = spherical_mean(rows["lat"].to_numpy()[base], rows["lon"].to_numpy()[base])
    out: dict[str, Any] = {"baseline_centroid_median_km": float(np.median(haversine_km(clat, clon, tlat, tlon))),
                           "baseline_centroid_of": "train rows" if is_train.any() else "all rows (the data has no train rows)"}
    seen = np.isin(split, (TRAIN, VAL))
    reach = pred.cells.max_reach_km
    if reach is not None and seen.any():
        d, _ = cKDTree(to_xyz(rows["lat"].to_numpy()[seen], rows["lon"].to_numpy()[seen])).query(to_xyz(tlat, tlon))
        out.update(max_reach_km=reach, beyond_reach_share=float(np.mean(chord_to_km(d) > reach)))
    return out


def retrieval_baseline(pred: Predictor, emb: np.ndarray, tlat: np.ndarray, tlon: np.ndarray,
                       thresholds: Sequence[float]) -> dict[str, Any]:
    """What plain nearest-neighbour retrieval scores on the same photos: the position of the most
    similar gallery photo anywhere (no head, no cells). {} without a gallery. The pipeline should
    at least match it; docs/benchmarks.md (views) shows where it did not and why."""
    if pred.gallery is None or not len(emb):
        return {}
    lat, lon, _ = pred.gallery.gallery.nearest(emb)
    km = haversine_km(lat, lon, tlat, tlon)
    out = {"median_km": float(np.median(km))}
    out.update({f"within_{t:g}km": float(np.mean(km <= t)) for t in thresholds})
    return {"baseline_retrieval": out}


def _by_refine_mode(pred: Predictor, emb: np.ndarray, probs: np.ndarray, tlat: np.ndarray, tlon: np.ndarray,
                    thresholds: Sequence[float]) -> dict[str, dict[str, float]]:
    """The distance and country/admin-1 figures of every refinement mode, the same photos and cell
    probabilities (one batched refinement per mode)."""
    t_iso, _, t_adm = reverse_geocode(tlat, tlon)
    out = {}
    for mode in MODES:
        r = pred.gallery.answer(emb, probs, dataclasses.replace(pred.refine, mode=mode))
        lat, lon = r.lat, r.lon
        p_iso, _, p_adm = reverse_geocode(lat, lon)
        out[mode] = geo_metrics(lat, lon, tlat, tlon, p_iso, t_iso, p_adm, t_adm, thresholds=thresholds)
    return out


def _write_outputs(o: Path, m: dict[str, Any], table: pd.DataFrame, preds: pd.DataFrame, plots: bool,
                   thresholds: Sequence[float] = THRESHOLDS_KM) -> None:
    """metrics.json, per_country.csv, predictions.csv and (with `plots`) the three figures, each written atomically."""
    o.mkdir(parents=True, exist_ok=True)
    with atomic_path(o / "metrics.json") as tmp:
        tmp.write_text(json.dumps(m, indent=2))
    with atomic_path(o / "per_country.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4g")
    with atomic_path(o / "predictions.csv") as tmp:
        preds.to_csv(tmp, index=False, float_format="%.6g")
    if plots:
        km = preds["km"].to_numpy()
        plot_error_cdf(km, o / "error_cdf.png", thresholds)
        plot_world_map(preds["lat"].to_numpy(), preds["lon"].to_numpy(), preds["pred_lat"].to_numpy(), preds["pred_lon"].to_numpy(), o / "world_map.png")
        plot_failures(m["by_area_type"], table, o / "failures.png")


def radius_coverage(km: np.ndarray, r50: np.ndarray, r90: np.ndarray) -> dict[str, float]:
    """Share of photos whose error is within their 50% / 90% radius (nominal 0.5 / 0.9), and the median radii."""
    return {"share_within_radius_50": coverage(km, r50), "share_within_radius_90": coverage(km, r90),
            "median_radius_km_50": float(np.median(r50)), "median_radius_km_90": float(np.median(r90))}


def plot_error_cdf(km: np.ndarray, dest: Path, thresholds: Sequence[float] = THRESHOLDS_KM) -> None:
    """Share of guesses within d km, log x axis, with the thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    xs = np.sort(np.maximum(km, 0.1))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
    for t in thresholds:
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


def plot_failures(by_area: dict[str, dict[str, Any]], table: pd.DataFrame, dest: Path, countries: int = FIGURE_COUNTRIES) -> None:
    """Where the model fails: median error by the truth's area type, and by true country (the
    `countries` with the most photos), each bar labelled with n and the share within 25 km."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = table.head(countries)
    fig, (ax_a, ax_c) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.3 * len(top) + 1.5)), dpi=110,
                                     gridspec_kw={"width_ratios": [1, 1.6]})
    kinds = [k for k in AREA_TYPES if by_area[k]["n"]]
    med = [by_area[k]["median_km"] for k in kinds]
    ax_a.bar(kinds, med, color=["tab:purple", "tab:orange", "tab:green"][:len(kinds)])
    city = f"within_{CITY_KM:g}km"   # absent when --thresholds leaves 25 km out
    for i, k in enumerate(kinds):
        share = f"\n{by_area[k][city]:.0%} <{CITY_KM:g} km" if city in by_area[k] else ""
        ax_a.text(i, med[i], f"n={by_area[k]['n']}{share}", ha="center", va="bottom", fontsize=7)
    ax_a.set_ylabel("median error (km)")
    ax_a.set_title("by area type of the truth (distance to a town of 100K / 10K)", fontsize=9)
    ax_a.margins(y=0.2)
    y = np.arange(len(top))[::-1]
    ax_c.barh(y, top["median_km"].to_numpy(), color="tab:blue")
    ax_c.set_yticks(y, [f"{c} ({iso})" for c, iso in zip(top["country"], top["iso_a2"])], fontsize=7)
    for yy, (n, w, v) in zip(y, zip(top["n"], top["within_25km"], top["median_km"])):
        ax_c.text(v, yy, f" n={n}, {w:.0%} <{CITY_KM:g} km", va="center", fontsize=7)
    ax_c.set_xlabel("median error (km)")
    ax_c.set_title(f"by true country (the {len(top)} with the most photos)", fontsize=9)
    ax_c.margins(x=0.25)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["evaluate", "checked_thresholds", "gallery_overlap", "radius_coverage", "plot_error_cdf", "plot_world_map",
           "failure_breakdown", "country_table", "worst_answers", "plot_failures"]
