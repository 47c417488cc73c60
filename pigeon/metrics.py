"""Geolocation metrics as the field reports them (PIGEON/PIGEOTTO tables).

Share of guesses within 1 / 25 / 50 / 200 / 750 / 2500 km (street, city, metro area, region, country,
continent; other thresholds can be given),
median and mean error in km, the GeoGuessr score 5000·exp(-d/1492.7), and country / admin-1
accuracy (the guess lands in the same country / admin-1 region as the truth).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import shapely

from pigeon.core.sphere import haversine_km, wrap_lon
from pigeon.geocells import bundled
from pigeon.geocells.geometry import NearestIndex, assign_points

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 50.0, 200.0, 750.0, 2500.0)
CITY_KM = 25.0   # city level: the one share reported whatever the thresholds (choices on validation, per country)
GEOGUESSR_SCALE_KM = 1492.7


def geoguessr_score(km: np.ndarray) -> np.ndarray:
    """GeoGuessr points for an error in km (5000 at 0 km, ~0 beyond a few thousand)."""
    return 5000.0 * np.exp(-np.asarray(km, dtype=np.float64) / GEOGUESSR_SCALE_KM)


SWITCH_CONFIDENCE = 0.95  # a validated choice leaves PIGEON's default only when it wins this share of resamples


def median_wins(km: np.ndarray, km_ref: np.ndarray, seed: int = 0, resamples: int = 400, most: int = 4096) -> float:
    """Share of paired bootstrap resamples (the same photos for both) in which `km`'s median error is
    below `km_ref`'s: how sure a validation set is that one answer beats another (at most `most` photos
    per resample, a seeded subsample; chunks of 50 resamples: O(50 x most) memory)."""
    km, km_ref = np.asarray(km, np.float64), np.asarray(km_ref, np.float64)
    rng = np.random.default_rng(seed)
    n = len(km)
    if n == 0:
        return 0.0
    if n > most:
        keep = rng.choice(n, most, replace=False)
        km, km_ref, n = km[keep], km_ref[keep], most
    wins = 0
    for s in range(0, resamples, 50):
        idx = rng.integers(0, n, size=(min(50, resamples - s), n))
        wins += int(np.sum(np.median(km[idx], axis=1) < np.median(km_ref[idx], axis=1)))
    return wins / resamples


def choose_on_validation(km: Mapping[str, np.ndarray], default: str, order: Sequence[str] | None = None, seed: int = 0,
                         confidence: float = SWITCH_CONFIDENCE) -> dict[str, Any]:
    """The one rule for a choice made on validation photos (refinement mode, view combination): each
    option's errors `km` on the same photos; the lowest median wins (ties: the first in `order`, default
    the keys' order), but an option other than PIGEON's `default` is taken only when it beats the
    default's median in at least `confidence` of paired bootstrap resamples (`median_wins`): on a few
    dozen photos the lowest median is mostly noise.
    Returns {"choice", "median_km", "within_25km", "beats_default_share"} (the last: {choice: share}
    when a non-default option had the lowest median, else {})."""
    order = list(order or km)
    median = {m: float(np.median(km[m])) for m in km}
    within = {m: float(np.mean(np.asarray(km[m]) <= CITY_KM)) for m in km}
    best = min(median.values())
    choice = next(m for m in order if median[m] <= best + 1e-9)
    beats: dict[str, float] = {}
    if choice != default:
        beats[choice] = median_wins(km[choice], km[default], seed)
        if beats[choice] < confidence:
            choice = default
    return {"choice": choice, "median_km": median, "within_25km": within, "beats_default_share": beats}


def distance_metrics(km: np.ndarray, thresholds: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """Summary of an array of errors in km: n, median/mean km, share within each threshold, GeoGuessr score."""
    km = np.asarray(km, dtype=np.float64)
    if km.size == 0:
        raise ValueError("no errors to summarise")
    out: dict[str, float] = {"n": int(km.size), "median_km": float(np.median(km)), "mean_km": float(km.mean())}
    for t in thresholds:
        out[f"within_{t:g}km"] = float((km <= t).mean())
    out["geoguessr_score"] = float(geoguessr_score(km).mean())
    return out


def geo_metrics(
    pred_lat: np.ndarray,
    pred_lon: np.ndarray,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    pred_country: np.ndarray | None = None,
    true_country: np.ndarray | None = None,
    pred_admin1: np.ndarray | None = None,
    true_admin1: np.ndarray | None = None,
    thresholds: Sequence[float] = THRESHOLDS_KM,
) -> dict[str, float]:
    """All metrics for guesses vs truths; country/admin-1 accuracy when both sides' labels are given."""
    km = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    out = distance_metrics(km, thresholds)
    if pred_country is not None and true_country is not None:
        out["country_accuracy"] = float(np.mean(np.asarray(pred_country) == np.asarray(true_country)))
    if pred_admin1 is not None and true_admin1 is not None:
        out["admin1_accuracy"] = float(np.mean(np.asarray(pred_admin1) == np.asarray(true_admin1)))
    return out


def reverse_geocode(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ISO a2, country name and 'country/admin-1' key of each point from the bundled admin-1 polygons.

    A point at sea (or on a coast the simplified polygons miss) takes the nearest polygon on the
    sphere, so a guess on a beach still counts for its country: geocells' own point assignment.
    """
    r = regions_at(lat, lon)
    return r["iso_a2"], r["country"], (r["country"].astype(str) + "/" + r["admin1"].astype(str)).astype(object)


def regions_at(lat: np.ndarray, lon: np.ndarray) -> dict[str, np.ndarray]:
    """The bundled admin-1 region at each point: arrays `admin1`, `country`, `iso_a2` (object) and
    `at_sea` (bool: the point is in no polygon, and the region is the nearest one on the sphere)."""
    adm = bundled.admin1()
    idx, sea = region_index(lat, lon)
    return {"admin1": adm["admin1"].to_numpy(object)[idx], "country": adm["country"].to_numpy(object)[idx],
            "iso_a2": adm["iso_a2"].to_numpy(object)[idx], "at_sea": sea}


def region_index(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of `bundled.admin1()` at each point, at_sea): `regions_at`'s rule (a point in no polygon
    takes the nearest one on the sphere), as row numbers for callers that look up their own columns."""
    _, geoms, tree, nearest = _admin1_lookup()
    idx, _, _, sea = assign_points(np.asarray(lat, np.float64), wrap_lon(lon), geoms, tree, nearest)
    return idx, np.asarray(sea, bool)


@lru_cache(maxsize=1)
def _admin1_lookup():
    """The bundled admin-1 polygons with their STRtree and nearest-boundary index, built once per process."""
    adm = bundled.admin1()
    geoms = np.asarray(adm.geometry.values, dtype=object)
    return adm, geoms, shapely.STRtree(geoms), NearestIndex(geoms)


__all__ = ["THRESHOLDS_KM", "CITY_KM", "geoguessr_score", "distance_metrics", "geo_metrics", "reverse_geocode", "regions_at", "region_index", "median_wins", "choose_on_validation", "SWITCH_CONFIDENCE"]
