"""Metric formulas on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pigeon.calibration import (
    MIN_SPREAD_KM, RadiusModel, calibrate_radii, cell_spread_km, coverage, ece, fit_temperature, mixture_radii, softmax,
)
from pigeon.core.sphere import EARTH_RADIUS_KM, haversine_km, to_xyz
from pigeon.evaluate import radius_coverage
from pigeon.metrics import distance_metrics, geo_metrics, geoguessr_score, reverse_geocode


def test_distance_metrics_hand_computed():
    km = np.array([0.0, 10.0, 100.0, 500.0, 1000.0, 3000.0])
    m = distance_metrics(km)
    assert m["n"] == 6
    assert m["within_1km"] == pytest.approx(1 / 6)
    assert m["within_25km"] == pytest.approx(2 / 6)
    assert m["within_200km"] == pytest.approx(3 / 6)
    assert m["within_750km"] == pytest.approx(4 / 6)
    assert m["within_2500km"] == pytest.approx(5 / 6)
    assert m["median_km"] == pytest.approx(300.0)
    assert m["mean_km"] == pytest.approx(4610.0 / 6)
    expect = 5000 * np.mean(np.exp(-km / 1492.7))
    assert m["geoguessr_score"] == pytest.approx(expect)


def test_geoguessr_score_points():
    assert geoguessr_score(0.0) == pytest.approx(5000.0)
    assert geoguessr_score(1492.7) == pytest.approx(5000.0 / math.e)
    assert geoguessr_score(20000.0) < 1.0


def test_geo_metrics_one_degree_on_equator_and_accuracy():
    # 1 degree of longitude on the equator = R * pi / 180 = 111.195 km
    m = geo_metrics(np.array([0.0, 10.0]), np.array([1.0, 20.0]), np.array([0.0, 10.0]), np.array([0.0, 20.0]),
                    pred_country=np.array(["A", "B"]), true_country=np.array(["A", "C"]),
                    pred_admin1=np.array(["x", "y"]), true_admin1=np.array(["z", "y"]))
    assert m["mean_km"] == pytest.approx(111.195 / 2, abs=1e-2)
    assert m["within_1km"] == pytest.approx(0.5)
    assert m["within_200km"] == pytest.approx(1.0)
    assert m["country_accuracy"] == pytest.approx(0.5)
    assert m["admin1_accuracy"] == pytest.approx(0.5)


def test_distance_metrics_empty_refused():
    with pytest.raises(ValueError):
        distance_metrics(np.array([]))


def test_reverse_geocode_land_and_sea():
    # Paris, Sydney, and a point in the sea 5 km off Sydney's coast (goes to the nearest polygon)
    iso, country, key = reverse_geocode(np.array([48.8566, -33.8688, -33.87]), np.array([2.3522, 151.2093, 151.33]))
    assert list(iso) == ["FR", "AU", "AU"]
    assert key[1] == key[2] and "New South Wales" in key[1]


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    # first: conf 0.9, correct -> |1 - 0.9| ; second: conf 0.6, wrong -> |0 - 0.6|; each with weight 1/2
    assert ece(probs, np.array([0, 1])) == pytest.approx(0.35)
    assert ece(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def test_temperature_scaling_lowers_ece_on_held_out():
    rng = np.random.default_rng(0)
    n, c = 4000, 10
    y = rng.integers(0, c, n)
    base = rng.normal(size=(n, c))
    base[np.arange(n), y] += 1.0
    logits = 6.0 * base  # an over-confident model
    t = fit_temperature(logits[:2000], y[:2000])
    assert t > 2.0
    before = ece(softmax(logits[2000:]), y[2000:])
    after = ece(softmax(logits[2000:], t), y[2000:])
    assert after < 0.5 * before


# -- uncertainty radii ------------------------------------------------------------------------------
def _destination(lat, lon, km, bearing):
    """The point `km` from (lat, lon) along `bearing` (radians) on the sphere."""
    la, lo, d = np.radians(lat), np.radians(lon), np.asarray(km) / EARTH_RADIUS_KM
    la2 = np.arcsin(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(bearing))
    lo2 = lo + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(la2))
    return np.degrees(la2), (np.degrees(lo2) + 180) % 360 - 180


def _sample_truths(rng, probs, centres, rings_km):
    """Truths from the radius model itself: a cell by its probability, a ring, a uniform bearing."""
    u = rng.random(len(probs))[:, None]
    cell = np.minimum((probs.cumsum(1) < u).sum(1), len(centres) - 1)
    k = rng.integers(0, rings_km.shape[1], len(probs))
    return _destination(centres[cell, 0], centres[cell, 1], rings_km[cell, k], rng.uniform(0, 2 * np.pi, len(probs)))


def test_cell_spread_quantiles_hand_computed():
    centres = np.array([[0.0, 0.0], [10.0, 10.0], [-20.0, 30.0]])
    step = 111.19508 / 10                                 # 0.1 degree of latitude in km
    lat = np.array([0.0, 0.1, 0.2, 0.3, 10.0])           # cell 0: 0, 11.1, 22.2, 33.4 km; cell 1: one photo at its centre
    spread = cell_spread_km(lat, np.array([0.0, 0.0, 0.0, 0.0, 10.0]), np.array([0, 0, 0, 0, 1]), centres,
                            fallback=np.full((3, 16), 77.0))
    assert spread.shape == (3, 16)
    # ring k is the (k + 0.5)/16 quantile (linear interpolation): position (k + 0.5)/16 * 3 among the 4 sorted distances
    np.testing.assert_allclose(spread[0], (np.arange(16) + 0.5) / 16 * 3 * step, rtol=1e-4)
    np.testing.assert_allclose(spread[1], MIN_SPREAD_KM)  # a photo at the centre: the floor, never 0
    np.testing.assert_allclose(spread[2], 77.0)           # no photos: the fallback


def test_mixture_radii_one_ring_hand_computed():
    centres = np.array([[0.0, 0.0]])
    rings = np.full((1, 16), 100.0)
    probs = np.ones((2, 1))
    east = 100.0 / 111.19508                              # the answer 100 km east of the centre
    r = mixture_radii(to_xyz(np.array([0.0, 0.0]), np.array([0.0, east])), probs, to_xyz(centres[:, 0], centres[:, 1]), rings)
    np.testing.assert_allclose(r[:, 0], [100.0, 100.0], rtol=1e-3)  # at the centre: every photo 100 km away
    # 100 km off a 100 km ring: d = 200 sin(θ/2) km for a uniform bearing θ, so r_p = 200 sin(pπ/2)
    np.testing.assert_allclose(r[:, 1], [200 * math.sin(math.pi / 4), 200 * math.sin(0.45 * math.pi)], rtol=2e-3)


@pytest.mark.parametrize("n_cells", [6, 60])
def test_mixture_radii_match_sampling(n_cells):
    """Against Monte Carlo of the same mixture; 60 cells exercises the point-mass part (beyond 16 cells)."""
    rng = np.random.default_rng(n_cells)
    centres = np.column_stack([rng.uniform(30, 60, n_cells), rng.uniform(-10, 40, n_cells)])
    rings = np.sort(rng.uniform(10, 400, (n_cells, 16)), axis=1)
    probs = rng.dirichlet(np.full(n_cells, 0.3), size=4)
    ans = centres[probs.argmax(1)]
    r = mixture_radii(to_xyz(ans[:, 0], ans[:, 1]), probs, to_xyz(centres[:, 0], centres[:, 1]), rings)
    for i in range(4):
        m = 200_000
        tl, tn = _sample_truths(rng, np.repeat(probs[i:i + 1], m, 0), centres, rings)
        d = haversine_km(ans[i, 0], ans[i, 1], tl, tn)
        # The sampled share within each radius reaches its level there (compared as shares: the CDF
        # jumps at a ring when the answer sits on a centre). Cells beyond the 16 most probable count
        # at their centres, hence the wider tolerance.
        tol = 0.004 if n_cells <= 16 else 0.02
        for j, level in enumerate((0.5, 0.9)):
            assert np.mean(d < r[j, i] * 0.999) - tol <= level <= np.mean(d <= r[j, i] * 1.001) + tol


def test_calibration_factors_recover_nominal_coverage():
    """Radii from spreads half the true size cover too little; the factors fitted on one sample restore
    50% / 90% coverage on another."""
    rng = np.random.default_rng(3)
    n_cells, n = 12, 4000
    centres = np.column_stack([rng.uniform(-40, 60, n_cells), rng.uniform(-100, 100, n_cells)])
    rings = np.sort(rng.uniform(20, 400, (n_cells, 16)), axis=1)
    logits = rng.normal(size=(2 * n, n_cells)) * 2.5
    probs = softmax(logits)
    lat, lon = _sample_truths(rng, probs, centres, rings * rng.uniform(0.8, 1.2, (1, 16)))
    model, rep = calibrate_radii(rings * 0.5, probs[:n], lat[:n], lon[:n], centres)
    assert model.calibrated and rep["radius_scales"][0] > 1.2
    ans = centres[probs[n:].argmax(1)]
    raw = mixture_radii(to_xyz(ans[:, 0], ans[:, 1]), probs[n:], to_xyz(centres[:, 0], centres[:, 1]), rings * 0.5)
    err = haversine_km(ans[:, 0], ans[:, 1], lat[n:], lon[n:])
    assert coverage(err, raw[0]) < 0.42                    # uncalibrated: the 50% circle holds the truth too rarely
    scaled = raw * model.scale_at([0.5, 0.9])[:, None]
    assert coverage(err, scaled[0]) == pytest.approx(0.5, abs=0.03)
    assert coverage(err, scaled[1]) == pytest.approx(0.9, abs=0.03)
    few, rep_few = calibrate_radii(rings, probs[:5], lat[:5], lon[:5], centres)
    assert not few.calibrated and "uncalibrated" in rep_few["radius_calibration"]
    np.testing.assert_allclose(few.scale_at([0.5, 0.9]), 1.0)


def test_radius_model_tensors_round_trip():
    m = RadiusModel(np.arange(32, dtype=np.float64).reshape(2, 16) + 1, np.array([0.5, 0.9]), np.array([1.3, 0.8]), calibrated=True)
    back = RadiusModel.from_tensors(m.to_tensors())
    np.testing.assert_allclose(back.spread_km, m.spread_km)
    assert back.calibrated and back.scale_at([0.5, 0.7, 0.9]) == pytest.approx([1.3, 1.05, 0.8])
    assert RadiusModel.from_tensors({}) is None


def test_radius_coverage_hand_computed():
    km = np.array([5.0, 50.0, 150.0, 900.0])
    cov = radius_coverage(km, np.array([10.0, 10.0, 200.0, 100.0]), np.array([20.0, 60.0, 300.0, 1000.0]))
    assert cov["share_within_radius_50"] == pytest.approx(0.5) and cov["share_within_radius_90"] == pytest.approx(1.0)
    assert cov["median_radius_km_50"] == pytest.approx(55.0)


def test_median_wins_paired_bootstrap():
    from pigeon.metrics import median_wins

    rng = np.random.default_rng(1)
    ref = rng.uniform(1, 100, 200)
    assert median_wins(ref * 0.5, ref) == 1.0 and median_wins(ref * 2, ref) == 0.0
    assert median_wins(ref, ref) == 0.0  # equal medians are not a win
    coin = np.where(rng.random(200) < 0.5, ref * 0.95, ref * 1.05)
    assert 0.05 < median_wins(coin, ref, seed=3) < 0.95  # a coin flip per photo: not sure either way
    assert median_wins(coin, ref, seed=3) == median_wins(coin, ref, seed=3)  # seeded
    big = rng.uniform(1, 100, 10000)
    assert median_wins(big * 0.9, big, most=500) == 1.0 and median_wins(np.array([]), np.array([])) == 0.0
