"""Where the model fails (issue 18, item 5): `pigeon evaluate` breaks its figures down by the truth's
area type (urban / suburban / rural by the distance to the nearest bundled GeoNames place of 100K /
10K people), per true country, and lists the worst answers with their top cells; failures.png draws
the first two."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pigeon.core.sphere import haversine_km
from pigeon.towns import (AREA_TYPES, SUBURBAN_KM, SUBURBAN_MIN_POPULATION, URBAN_KM, URBAN_MIN_POPULATION, area_type_rule,
                          area_types, km_to_populated)

# central Paris, Manhattan, Naperville (a Chicago suburb of 150K people), Alice Springs and Mount Isa
# (outback towns of 26K and 18K, over 1000 km from any city of 100K), the Sahara, the mid-Atlantic,
# a Kansas wheat field, the Australian outback
POINTS = {"paris": (48.8566, 2.3522), "manhattan": (40.758, -73.9855), "naperville": (41.7508, -88.1535),
          "alice_springs": (-23.698, 133.8807), "mount_isa": (-20.7256, 139.4927), "sahara": (23.0, 12.0),
          "atlantic": (30.0, -40.0), "kansas": (38.5, -99.5), "outback": (-25.0, 134.0)}
EXPECTED = {"paris": "urban", "manhattan": "urban", "naperville": "urban", "alice_springs": "suburban", "mount_isa": "suburban",
            "sahara": "rural", "atlantic": "rural", "kansas": "rural", "outback": "rural"}


def test_area_type_of_hand_picked_points():
    lat, lon = np.array(list(POINTS.values())).T
    assert dict(zip(POINTS, area_types(lat, lon))) == EXPECTED
    from pigeon.geocells import bundled

    t = bundled.towns()
    assert t["population"].min() == SUBURBAN_MIN_POPULATION <= 10_000 and len(t) > 40_000
    alice = t[(t["name"] == "Alice Springs") & (t["cc"] == "AU")]
    assert len(alice) == 1 and 20_000 <= int(alice["population"].iloc[0]) <= 50_000
    # the distances the rule reads are the plain great-circle minima over the bundled places
    tlat, tlon = t["lat"].to_numpy(np.float64), t["lon"].to_numpy(np.float64)
    for pop in (URBAN_MIN_POPULATION, SUBURBAN_MIN_POPULATION):
        m = t["population"].to_numpy() >= pop
        brute = [float(haversine_km(tlat[m], tlon[m], a, b).min()) for a, b in zip(lat, lon)]
        assert km_to_populated(lat, lon, pop) == pytest.approx(brute, rel=1e-6, abs=1e-6)
    km100 = km_to_populated(lat, lon, URBAN_MIN_POPULATION)
    assert km100[0] < 1 and km100[3] > 1000   # Paris is its own point; Alice Springs is far from any city
    assert km_to_populated(lat, lon, SUBURBAN_MIN_POPULATION)[3] < 1
    with pytest.raises(ValueError, match="start at"):
        km_to_populated(lat, lon, 5000)       # the bundled towns do not go below 10K people


def test_area_type_boundaries():
    """Due north of Alice Springs' GeoNames point (26K people) a point is suburban up to SUBURBAN_KM,
    rural beyond; due north of Darwin's (140K, out at sea) urban up to URBAN_KM, rural beyond."""
    from pigeon.geocells import bundled

    t = bundled.towns().set_index("name")
    a_lat, a_lon = float(t.loc["Alice Springs", "lat"]), float(t.loc["Alice Springs", "lon"])
    deg = 1 / 111.195   # degrees of latitude per km on pigeon's sphere
    kinds = area_types(np.array([a_lat + (SUBURBAN_KM - 0.2) * deg, a_lat + (SUBURBAN_KM + 0.2) * deg]), np.array([a_lon, a_lon]))
    assert kinds.tolist() == ["suburban", "rural"]
    assert int(t.loc["Darwin", "population"]) >= URBAN_MIN_POPULATION
    d_lat, d_lon = float(t.loc["Darwin", "lat"]), float(t.loc["Darwin", "lon"])
    kinds = area_types(np.array([d_lat + (URBAN_KM - 0.2) * deg, d_lat + (URBAN_KM + 0.2) * deg]), np.array([d_lon, d_lon]))
    assert kinds.tolist() == ["urban", "rural"]
    assert area_type_rule() == {"places": area_type_rule()["places"], "urban": {"min_population": 100_000, "within_km": URBAN_KM},
                                "suburban": {"min_population": 10_000, "within_km": SUBURBAN_KM}, "rural": "neither"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A zero-shot `tiny` bundle over a synthetic world; every row has a place (three photos each)."""
    from worlds import world_bundle

    root = tmp_path_factory.mktemp("failures")
    manifest, df, bundle, _ = world_bundle(root, n_images=90, image_size=48, seed=21, min_size=8, max_size=16)
    df["location_id"] = [f"L{i // 3}" for i in range(len(df))]
    df.to_csv(manifest, index=False)
    return root, manifest, df, bundle


def test_evaluate_breaks_down_where_it_fails(world):
    from pigeon.evaluate import evaluate
    from pigeon.predictor import Predictor

    root, manifest, df, bundle = world
    out = root / "eval"
    m = evaluate(bundle, manifest, split=None, out=out, cache_dir=str(root / "cache"), progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert saved["n"] == m["n"] == len(df) == len(preds)

    # by area type: every photo in one class, the class its truth has, with that class's own figures
    assert preds["area_type"].tolist() == area_types(preds["lat"].to_numpy(), preds["lon"].to_numpy()).tolist()
    by_area = saved["by_area_type"]
    assert list(by_area) == list(AREA_TYPES) and sum(v["n"] for v in by_area.values()) == m["n"]
    for kind, v in by_area.items():
        km = preds.loc[preds["area_type"] == kind, "km"].to_numpy()
        assert v["n"] == len(km)
        if len(km):
            assert v["median_km"] == pytest.approx(np.median(km), rel=1e-4)
            assert v["within_25km"] == pytest.approx(np.mean(km <= 25), abs=1e-9)
    assert saved["area_type_rule"] == area_type_rule() and saved["area_type_rule"]["urban"]["within_km"] == URBAN_KM

    # per true country: counts add up to the photos scored; the figures are the predictions' own
    per = saved["per_country"]
    assert sum(r["n"] for r in per) == m["n"] and [r["n"] for r in per] == sorted((r["n"] for r in per), reverse=True)
    for r in per:
        km = preds.loc[preds["true_country"] == r["iso_a2"], "km"].to_numpy()
        assert r["n"] == len(km)
        assert r["median_km"] == pytest.approx(np.median(km), rel=1e-4)
        assert r["within_25km"] == pytest.approx(np.mean(km <= 25), abs=1e-9)
    csv = pd.read_csv(out / "per_country.csv", keep_default_na=False)
    assert csv.columns.tolist() == ["iso_a2", "country", "n", "median_km", "country_accuracy", "within_25km"]
    assert csv["n"].tolist() == [r["n"] for r in per] and csv["iso_a2"].tolist() == [r["iso_a2"] for r in per]

    # the worst answers: farthest first, the first one the largest error of predictions.csv
    worst = saved["worst"]
    assert len(worst) == 20
    km = [w["km"] for w in worst]
    assert km == sorted(km, reverse=True)
    assert km[0] == pytest.approx(preds["km"].max(), rel=1e-5)
    assert km[-1] >= np.sort(preds["km"].to_numpy())[-20] * (1 - 1e-5)
    pred = Predictor.from_bundle(bundle)
    row = preds.set_index("image").loc[worst[0]["image"]]
    assert (worst[0]["lat"], worst[0]["pred_lat"]) == (pytest.approx(row["lat"], abs=1e-4), pytest.approx(row["pred_lat"], abs=1e-4))
    for w in worst:
        probs = [c["probability"] for c in w["top_cells"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert w["true_cell"] == int(pred.cells.cell_of(np.array([w["lat"]]), np.array([w["lon"]]))[0])
        assert w["true_cell_probability"] <= probs[0] + 1e-9
        assert w["area_type"] in AREA_TYPES
    # the answer is the top cell's centre (no gallery here)
    top = worst[0]["top_cells"][0]["cell_id"]
    assert (worst[0]["pred_lat"], worst[0]["pred_lon"]) == (pytest.approx(pred.centres[top, 0], abs=1e-4), pytest.approx(pred.centres[top, 1], abs=1e-4))

    png = (out / "failures.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the dict returned is what metrics.json holds
    assert json.loads(json.dumps(m)) == saved


def test_failures_without_plots_and_per_place(world, tmp_path):
    from pigeon.evaluate import evaluate

    root, manifest, df, bundle = world
    m = evaluate(bundle, manifest, split=None, out=tmp_path, cache_dir=str(root / "cache"), progress=False, plots=False,
                 group_by="location_id", thresholds=[1, 50, 2500])
    assert not (tmp_path / "failures.png").exists() and (tmp_path / "metrics.json").exists()
    present = [v for v in m["by_area_type"].values() if v["n"]]
    assert present and all("within_50km" in v and "within_25km" not in v for v in present)   # the thresholds given
    assert all("within_25km" in r for r in m["per_country"])   # the city-level share, whatever the thresholds
    pp = m["per_place"]
    assert pp["n_places"] == 30
    assert sum(v["n"] for v in pp["by_area_type"].values()) == 30 == sum(r["n"] for r in pp["per_country"])
    assert len(pp["worst"]) == 20 and {w["place"] for w in pp["worst"]} <= set(df["location_id"])
    km = [w["km"] for w in pp["worst"]]
    assert km == sorted(km, reverse=True)
    # a place's truth is its photos' spherical mean
    from pigeon.core.sphere import spherical_mean

    w = pp["worst"][0]
    g = df[df["location_id"] == w["place"]]
    assert (w["lat"], w["lon"]) == pytest.approx(spherical_mean(g["lat"].to_numpy(), g["lon"].to_numpy()), abs=1e-6)


def test_cli_line_leaves_the_long_lists_to_metrics_json(world, tmp_path, capsys):
    from worlds import cli

    root, manifest, df, bundle = world
    assert cli(["evaluate", "--bundle", str(bundle), "--data", str(manifest), "--split", "all", "--out", str(tmp_path),
                "--cache-dir", str(root / "cache"), "--thresholds", "1,50,2500"]) == 0
    assert (tmp_path / "failures.png").stat().st_size > 5000   # drawn without a 25 km share per area type
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "per_country" not in line and "worst" not in line
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert line["by_area_type"] == saved["by_area_type"] and len(saved["worst"]) == 20
    assert {k: v for k, v in saved.items() if k not in ("per_country", "worst")} == line
