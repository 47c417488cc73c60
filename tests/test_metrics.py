"""Metric formulas on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pigeon.calibration import ece, fit_temperature, softmax
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
