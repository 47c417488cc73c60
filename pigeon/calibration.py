"""Calibration: temperature scaling (Guo et al. 2017), expected calibration error (ECE), and the
uncertainty radii of an answer with their calibration.

Why: the Predictor reports a confidence and uncertainty radii from the cell probabilities; those
only mean something if a 70% answer is right about 70% of the time. One scalar temperature,
fitted on the validation split, fixes most of a head's over-confidence without changing its ranking.

Radii: the truth is modelled as a mixture over cells, weighted by the cell probabilities, each cell
spreading its photos around its centre as its training photos do (`cell_spread_km`: quantiles of
their distance to the centre, each quantile a ring around the centre with a uniform bearing). The
r-level radius around the answer is the distance within which that mixture holds the level's mass
(`mixture_radii`: exact on the sphere for the rings; a compiled bisection). One scale factor per level, fitted on the
validation photos (`fit_radius_scales`), makes the circles hold the truth as often as they claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import shapely
import torch
from numba import njit

from pigeon.core.sphere import EARTH_RADIUS_KM, haversine_km, to_xyz

RADIUS_LEVELS: tuple[float, ...] = (0.5, 0.9)
N_RINGS = 16                 # quantile rings per cell: (k + 0.5) / N_RINGS of its photos' distances
MIN_SPREAD_KM = 0.5          # no cell is a point: a photo is never exactly at a cell's centre
MIN_CALIBRATION_PHOTOS = 20  # fewer validation photos than this: radii stay uncalibrated
EXACT_CELLS = 16             # the most probable cells get their spread; the rest count at their centres
_BISECT_STEPS = 20          # on log r over [_MIN_KM, _MAX_KM]: 0.002% precision
_MIN_KM = 0.05
_MAX_KM = 20100.0            # beyond half the Earth's circumference: every mixture holds all its mass
_GRID = 256                  # log-spaced distances at which the point-mass part is tabulated
_LOG_MIN = float(np.log(_MIN_KM))
_LOG_STEP = float(np.log(_MAX_KM / _MIN_KM) / (_GRID - 1))


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction: Σ_b |B|/n · |acc(B) - conf(B)|, equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / max(len(conf), 1))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (validation) labels."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, 1e-2, 1e2)) if np.isfinite(t) else 1.0


# -- uncertainty radii ---------------------------------------------------------------------------
@dataclass
class RadiusModel:
    """Each cell's spread and the per-level scale factors: what the Predictor needs for its radii.

    `spread_km` (C, K): ring radii, ascending per row, each ring holding 1/K of the cell's photos;
    `scales` (L,): the factor each level's mixture radius is multiplied by (1 = uncalibrated).
    Stored in head.safetensors (`to_tensors` / `from_tensors`).
    """

    spread_km: np.ndarray
    levels: np.ndarray = field(default_factory=lambda: np.asarray(RADIUS_LEVELS, np.float64))
    scales: np.ndarray = field(default_factory=lambda: np.ones(len(RADIUS_LEVELS)))
    calibrated: bool = False

    def scale_at(self, levels: Sequence[float]) -> np.ndarray:
        """Scale factor at each of `levels` (linear between the fitted levels, constant beyond them)."""
        return np.interp(np.asarray(levels, np.float64), self.levels, self.scales)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "radius_spread_km": torch.as_tensor(np.ascontiguousarray(self.spread_km, dtype=np.float32)),
            "radius_levels": torch.as_tensor(np.asarray(self.levels, np.float32)),
            "radius_scales": torch.as_tensor(np.asarray(self.scales, np.float32)),
            "radius_calibrated": torch.tensor([1.0 if self.calibrated else 0.0]),
        }

    @classmethod
    def from_tensors(cls, t: Mapping[str, Any]) -> "RadiusModel | None":
        """The model saved by `to_tensors`, or None for a head saved without one."""
        if "radius_spread_km" not in t:
            return None
        spread, levels, scales, flag = (_float64(t[k]) for k in ("radius_spread_km", "radius_levels", "radius_scales", "radius_calibrated"))
        return cls(spread, levels, scales, bool(flag[0] > 0.5))


def _float64(x: Any) -> np.ndarray:
    return np.asarray(x.float().numpy() if isinstance(x, torch.Tensor) else x, np.float64)


def _ring_levels(n_rings: int) -> np.ndarray:
    """(n_rings,) the quantile level of each ring: (k + 0.5) / n_rings."""
    return (np.arange(n_rings) + 0.5) / n_rings


def cell_spread_km(lat: np.ndarray, lon: np.ndarray, cell: np.ndarray, centres: np.ndarray,
                   fallback: np.ndarray | None = None, n_rings: int = N_RINGS) -> np.ndarray:
    """(C, n_rings) quantiles of the photos' distances to their cell's centre, per cell (vectorised).

    Cells without photos take `fallback`'s row (e.g. `geometric_spread_km`), else the median over
    the other cells; every ring is at least MIN_SPREAD_KM.
    """
    cell = np.asarray(cell, np.int64)
    C = len(centres)
    rho = haversine_km(lat, lon, centres[cell, 0], centres[cell, 1])
    order = np.lexsort((rho, cell))
    rho_s = rho[order]
    counts = np.bincount(cell, minlength=C)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.maximum(counts - 1, 0)[:, None] * _ring_levels(n_rings)   # positions in each cell's sorted distances
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(counts - 1, 0)[:, None])
    frac = pos - lo
    have = counts > 0
    out = np.zeros((C, n_rings))
    if len(rho_s):
        idx_lo = np.minimum(start[:, None] + lo, len(rho_s) - 1)
        idx_hi = np.minimum(start[:, None] + hi, len(rho_s) - 1)
        out = rho_s[idx_lo] * (1 - frac) + rho_s[idx_hi] * frac
    if fallback is not None:
        out[~have] = fallback[~have]
    elif have.any():
        out[~have] = np.median(out[have], axis=0)
    return np.maximum(out, MIN_SPREAD_KM)


def geometric_spread_km(geoms: np.ndarray, centres: np.ndarray, n_rings: int = N_RINGS) -> np.ndarray:
    """(C, n_rings) ring radii of photos spread evenly over a disk of each cell's area.

    The fallback when no photos say how a cell spreads (a zero-shot head, a cell without training
    photos): area from the polygon in degrees², times the km² of a degree² at the centre's latitude.
    """
    km2 = shapely.area(np.asarray(geoms, dtype=object)) * (np.pi * EARTH_RADIUS_KM / 180.0) ** 2 * np.cos(np.radians(centres[:, 0]))
    radius = np.sqrt(np.maximum(km2, 0.0) / np.pi)
    return np.maximum(radius[:, None] * np.sqrt(_ring_levels(n_rings))[None, :], MIN_SPREAD_KM)   # uniform in a disk


@njit(cache=True, nogil=True)
def _point_mass_grid(ans_xyz: np.ndarray, centres_xyz: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """(n, _GRID) mass of `rest` (n, C), placed at the cells' centres, within each grid distance of
    each answer: one weighted histogram per answer over _GRID log-spaced distances, cumulated.

    No sort; read back by linear interpolation in log r, so a point mass is smeared over one grid
    step (±2%): these cells hold little mass or lie far away, and their own spread is wider."""
    n, C = rest.shape
    out = np.zeros((n, _GRID))
    for i in range(n):
        for c in range(C):
            w = rest[i, c]
            if w == 0.0:
                continue
            dx = ans_xyz[i, 0] - centres_xyz[c, 0]
            dy = ans_xyz[i, 1] - centres_xyz[c, 1]
            dz = ans_xyz[i, 2] - centres_xyz[c, 2]
            km = 2.0 * EARTH_RADIUS_KM * np.arcsin(min(0.5 * np.sqrt(dx * dx + dy * dy + dz * dz), 1.0))
            j = int(np.ceil((np.log(max(km, _MIN_KM)) - _LOG_MIN) / _LOG_STEP))   # bin j: km in (r_{j-1}, r_j]
            out[i, min(max(j, 0), _GRID - 1)] += w
        for j in range(1, _GRID):
            out[i, j] += out[i, j - 1]
    return out


@njit(cache=True, nogil=True)
def _ring_cdf(i: int, r: float, log_r: float, a: np.ndarray, sin_b: np.ndarray, hav_ab: np.ndarray,
              b: np.ndarray, p: np.ndarray, rest: np.ndarray) -> float:
    """Mixture mass within angular distance r (rad) of answer i: its exact cells' rings, then the rest's grid."""
    m, K = b.shape[1], b.shape[2]
    hav_r = np.sin(0.5 * r) ** 2
    f = 0.0
    for j in range(m):
        A, w = a[i, j], p[i, j] / K
        for k in range(K):
            bk = b[i, j, k]
            if r >= A + bk:                          # the whole ring is within r
                f += w
            elif r > abs(A - bk):                    # part of it: the bearings within r
                t = 1.0 - 2.0 * (hav_r - hav_ab[i, j, k]) / max(np.sin(A) * sin_b[i, j, k], 1e-300)
                f += w * np.arccos(min(max(t, -1.0), 1.0)) / np.pi
    x = min(max((log_r - _LOG_MIN) / _LOG_STEP, 0.0), _GRID - 1.0)
    g = min(int(x), _GRID - 2)
    return f + rest[i, g] * (g + 1.0 - x) + rest[i, g + 1] * (x - g)


@njit(cache=True, nogil=True)
def _radii_kernel(a: np.ndarray, b: np.ndarray, p: np.ndarray, rest: np.ndarray, levels: np.ndarray, out: np.ndarray) -> None:
    """Bisection on log r (km) per answer and level; out (L, n) km. Rings that lie wholly inside or
    outside r cost a comparison; only those r cuts through need the arccos."""
    sin_b = np.sin(b)
    hav_ab = np.sin(0.5 * (np.expand_dims(a, 2) - b)) ** 2
    log_max = np.log(_MAX_KM)
    for i in range(a.shape[0]):
        for li in range(levels.shape[0]):
            lo, hi = _LOG_MIN, log_max
            for _ in range(_BISECT_STEPS):
                mid = 0.5 * (lo + hi)
                if _ring_cdf(i, np.exp(mid) / EARTH_RADIUS_KM, mid, a, sin_b, hav_ab, b, p, rest) >= levels[li] - 1e-9:
                    hi = mid
                else:
                    lo = mid
            out[li, i] = np.exp(hi)


def mixture_radii(ans_xyz: np.ndarray, probs: np.ndarray, centres_xyz: np.ndarray, spread_km: np.ndarray,
                  levels: Sequence[float] = RADIUS_LEVELS, exact_cells: int = EXACT_CELLS) -> np.ndarray:
    """(L, n) km from each answer within which the cell mixture holds each level of its mass (unscaled).

    The `exact_cells` most probable cells of each answer spread as their rings (a ring of angular
    radius b around a centre at angular distance A from the answer, bearing uniform: the share
    within r is arccos(1 − 2·(hav r − hav(A − b)) / (sin A sin b)) / π, the law of cosines in
    haversine form, precise at small distances); the remaining cells, which hold little mass or lie
    far away, count at their centres. A compiled bisection on log r per answer and level.
    """
    probs = np.asarray(probs, np.float64)
    n, C = probs.shape
    ans_xyz = np.asarray(ans_xyz, np.float64)
    m = min(C, exact_cells)
    top = np.argpartition(-probs, m - 1, axis=1)[:, :m] if m < C else np.broadcast_to(np.arange(C), (n, C))
    p_top = np.ascontiguousarray(np.take_along_axis(probs, top, 1))                          # (n, m)
    a = np.ascontiguousarray(_angle(ans_xyz[:, None, :], centres_xyz[top]))                  # (n, m) rad
    b = np.ascontiguousarray(spread_km[top], dtype=np.float64) / EARTH_RADIUS_KM              # (n, m, K) rad
    rest = np.zeros((n, _GRID))
    if m < C:
        others = probs.copy()
        np.put_along_axis(others, top, 0.0, 1)
        rest = _point_mass_grid(ans_xyz, np.ascontiguousarray(centres_xyz, dtype=np.float64), others)
    out = np.empty((len(levels), n))
    _radii_kernel(a, b, p_top, rest, np.asarray(levels, np.float64), out)
    return out


def _angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle in radians between unit vectors (last axis), precise at small angles (via the chord)."""
    return 2.0 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2.0, 0.0, 1.0))


def fit_radius_scales(err_km: np.ndarray, radii: np.ndarray, levels: Sequence[float] = RADIUS_LEVELS) -> np.ndarray:
    """(L,) factors s with share(err <= s · r_level) = level on these photos: the level-quantile of err / r."""
    ratio = np.asarray(err_km, np.float64)[None, :] / np.maximum(np.asarray(radii, np.float64), 1e-9)
    return np.array([np.quantile(ratio[i], lv) for i, lv in enumerate(levels)])


def coverage(err_km: np.ndarray, radius_km: np.ndarray) -> float:
    """Share of photos whose error is within their radius."""
    return float(np.mean(np.asarray(err_km) <= np.asarray(radius_km)))


def calibrate_radii(spread_km: np.ndarray, probs: np.ndarray, true_lat: np.ndarray, true_lon: np.ndarray,
                    centres: np.ndarray, levels: Sequence[float] = RADIUS_LEVELS) -> tuple[RadiusModel, dict[str, Any]]:
    """Fit the per-level scale factors on validation photos answered at their top cell's centre.

    Returns the model and a report: levels, scales, coverage on these photos before scaling; with
    fewer than MIN_CALIBRATION_PHOTOS photos the scales stay 1 and the report says so.
    """
    n = len(true_lat)
    if n < MIN_CALIBRATION_PHOTOS:
        note = f"uncalibrated: {n} validation photos, calibrating the radii needs at least {MIN_CALIBRATION_PHOTOS}"
        return RadiusModel(spread_km), {"radius_calibration": note}
    ans = centres[np.asarray(probs).argmax(1)]
    r = mixture_radii(to_xyz(ans[:, 0], ans[:, 1]), probs, to_xyz(centres[:, 0], centres[:, 1]), spread_km, levels)
    err = haversine_km(ans[:, 0], ans[:, 1], true_lat, true_lon)
    scales = fit_radius_scales(err, r, levels)
    model = RadiusModel(spread_km, np.asarray(levels, np.float64), scales, calibrated=True)
    rep = {"radius_calibration": f"calibrated on {n} validation photos", "radius_levels": list(map(float, levels)),
           "radius_scales": [float(s) for s in scales],
           "val_coverage_unscaled": [coverage(err, r[i]) for i in range(len(levels))]}
    return model, rep


__all__ = [
    "ece", "softmax", "fit_temperature", "RadiusModel", "RADIUS_LEVELS", "MIN_CALIBRATION_PHOTOS",
    "cell_spread_km", "geometric_spread_km", "mixture_radii", "fit_radius_scales", "coverage", "calibrate_radii",
]
