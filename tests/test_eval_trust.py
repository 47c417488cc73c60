"""Evaluation a user can trust (issue 12): the gallery holds train photos only, evaluate refuses photos
in the gallery, scores every refinement mode side by side with the given thresholds; cells stop at
`max_reach_km` from the training points; the answer names the region at its own point; the cells'
map zooms to the points."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely

from pigeon.core.errors import UserError
from pigeon.core.sphere import chord_to_km, to_xyz
from pigeon.geocells import GeoCells, build_cells, load_boundaries
from pigeon.geocells.reach import DEFAULT_MAX_REACH_KM, area_km2, circles, clip_to_reach


# -- a bundle with a gallery ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A zero-shot `tiny` bundle over a synthetic world, gallery built with the defaults (train rows;
    val rows choose the refinement mode)."""
    from worlds import world_bundle

    from pigeon.indexing import build_index

    root = tmp_path_factory.mktemp("trust")
    manifest, df, bpath, _ = world_bundle(root, n_images=160, image_size=48, seed=5, min_size=8, max_size=16)
    rep = build_index(manifest, bpath, progress=False, batch_size=40)
    return root, manifest, df, bpath, rep


def test_gallery_takes_train_rows_only(world):
    from pigeon.bundle_gallery import load_gallery
    from pigeon.bundle import Bundle

    root, manifest, df, bpath, rep = world
    n = df["split"].value_counts()
    assert rep["images"] == rep["total"] == n["train"]
    assert rep["held_out_val"] == n["val"] and rep["left_out_rows"] == n["test"] and rep["splits"] == ["train"]
    assert "refine_mode" in rep   # the val rows still chose the mode
    images = set(load_gallery(Bundle(bpath)).frame["image"])
    assert images == set(df.loc[df["split"] == "train", "image"])


def test_evaluate_refuses_gallery_photos_by_name(world, tmp_path):
    import shutil

    from pigeon.indexing import build_index
    from pigeon.evaluate import evaluate

    root, manifest, df, bpath, _ = world
    leaky = tmp_path / "leaky"
    shutil.copytree(bpath, leaky)
    rep = build_index(manifest, leaky, progress=False, batch_size=40, splits=["train", "test"])
    n_test = int((df["split"] == "test").sum())
    assert rep["images"] == int(df["split"].isin(["train", "test"]).sum())
    with pytest.raises(UserError, match=rf"{n_test} of the {n_test} test photos .* are in bundle .*gallery .*e\.g\. images/.*--allow-gallery-overlap"):
        evaluate(leaky, manifest, progress=False, plots=False)
    m = evaluate(leaky, manifest, progress=False, plots=False, allow_gallery_overlap=True)
    assert m["gallery_overlap"] == n_test == m["n"]
    assert evaluate(bpath, manifest, progress=False, plots=False)["gallery_overlap"] == 0


def test_overlap_is_found_by_id_when_keys_differ(world, tmp_path):
    """The same photos under other keys (absolute paths) with the same `id` are still refused."""
    from pigeon.indexing import build_index
    from pigeon.evaluate import evaluate

    root, manifest, df, bpath, _ = world
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bpath, b)
    ided = df.assign(id=np.arange(len(df)) + 1000)
    ided.to_csv(root / "world" / "ided.csv", index=False)
    build_index(root / "world" / "ided.csv", b, progress=False, batch_size=40, splits=["train", "test"])
    other = ided.assign(image=[str(root / "world" / p) for p in ided["image"]])
    other.to_csv(tmp_path / "abs.csv", index=False)
    with pytest.raises(UserError, match="are in bundle"):
        evaluate(b, tmp_path / "abs.csv", progress=False, plots=False)
    # different ids at the same keys' places are not the same photos: keys decide then
    other.assign(id=other["id"] + 10**6).to_csv(tmp_path / "abs2.csv", index=False)
    assert evaluate(b, tmp_path / "abs2.csv", progress=False, plots=False)["gallery_overlap"] == 0


def test_every_refine_mode_side_by_side(world):
    from pigeon.bundle import Bundle
    from pigeon.evaluate import evaluate
    from pigeon.index import MODES

    root, manifest, df, bpath, _ = world
    m = evaluate(bpath, manifest, progress=False, plots=False, refine="all", thresholds=[1, 25, 50, 200, 750, 2500])
    recorded = Bundle(bpath).meta("index")["refine_mode"]
    assert m["refine_mode"] == recorded and set(m["by_refine_mode"]) == set(MODES)
    for key in ("n", "median_km", "within_50km", "within_2500km", "country_accuracy", "geoguessr_score"):
        assert m[key] == pytest.approx(m["by_refine_mode"][recorded][key])  # top level = the recorded mode
    for mode in MODES:   # each column is what `--refine MODE` alone gives
        one = evaluate(bpath, manifest, progress=False, plots=False, refine=mode)
        assert one["refine_mode"] == mode
        assert one["median_km"] == pytest.approx(m["by_refine_mode"][mode]["median_km"])
        assert one["within_25km"] == pytest.approx(m["by_refine_mode"][mode]["within_25km"])
    assert len({round(v["median_km"], 6) for v in m["by_refine_mode"].values()}) > 1   # the modes do differ


def test_thresholds_and_refine_options(world, tmp_path, capsys):
    from worlds import cli

    from pigeon.evaluate import evaluate
    from pigeon.core.sphere import haversine_km

    root, manifest, df, bpath, _ = world
    m = evaluate(bpath, manifest, progress=False, plots=False, thresholds=[3000, 10, 10])
    assert [k for k in m if k.startswith("within_")] == ["within_10km", "within_3000km"]
    assert "within_50km" in evaluate(bpath, manifest, progress=False, plots=False)
    assert cli(["evaluate", "--bundle", str(bpath), "--data", str(manifest), "--refine", "nn", "--max-refinement-km", "inf",
                "--temperature", "0.6", "--thresholds", "1,50", "--out", str(tmp_path / "eval")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["refine_mode"] == "nn" and "within_50km" in out and "within_25km" not in out
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    km = haversine_km(preds["lat"], preds["lon"], preds["pred_lat"], preds["pred_lon"])
    assert out["within_50km"] == pytest.approx(float(np.mean(km <= 50)))
    for bad in (["--thresholds", "1,x"], ["--thresholds", "0,25"], ["--refine", "best"], ["--temperature", "0"]):
        assert cli(["evaluate", "--bundle", str(bpath), "--data", str(manifest), *bad]) == 2
        assert bad[1] in capsys.readouterr().err


def test_evaluate_reports_the_reach(world):
    from pigeon.evaluate import evaluate
    from pigeon.predictor import Predictor

    root, manifest, df, bpath, _ = world
    m = evaluate(bpath, manifest, progress=False, plots=False)
    seen = df[df["split"].isin(["train", "val"])]
    test = df[df["split"] == "test"]
    d, _ = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree(to_xyz(seen["lat"], seen["lon"])).query(to_xyz(test["lat"], test["lon"]))
    assert Predictor.from_bundle(bpath).cells.max_reach_km == m["max_reach_km"] == DEFAULT_MAX_REACH_KM
    assert m["beyond_reach_share"] == pytest.approx(float(np.mean(chord_to_km(d) > DEFAULT_MAX_REACH_KM)))


# -- the answer: the region at its point, the reach ----------------------------------------------------
def test_answer_names_the_region_at_its_point(world):
    from pigeon.api.schemas import Location
    from pigeon.metrics import regions_at
    from pigeon.predictor import Predictor

    root, manifest, df, bpath, _ = world
    pred = Predictor.from_bundle(bpath)
    test = df[df["split"] == "test"]
    answers = pred.locate([str(root / "world" / p) for p in test["image"][:6]], top_k=3)
    here = regions_at(np.array([a["lat"] for a in answers]), np.array([a["lon"] for a in answers]))
    edge = pred.cells.at_reach_edge
    for i, a in enumerate(answers):
        assert a["region_at_answer"] == {"admin1": here["admin1"][i], "country": here["country"][i],
                                         "iso_a2": here["iso_a2"][i], "at_sea": bool(here["at_sea"][i])}
        assert a["reach"]["max_reach_km"] == DEFAULT_MAX_REACH_KM and 0.0 <= a["reach"]["edge_probability"] <= 1.0 + 1e-6
        Location.model_validate({**a, "exif_gps_present": False, "image": {"format": "png", "width": 48, "height": 48}})
    # the case: an answer at (43.46, 16.92) lies in Split-Dalmatia, whatever the ranked list says
    emb = pred.embed([str(root / "world" / test["image"].iloc[0])])
    p = pred.predict_embeddings(emb, top_k=3)
    p["lat"], p["lon"] = np.array([43.46]), np.array([16.92])
    [a] = pred.format(p, top_k=3)
    assert a["region_at_answer"] == {"admin1": "Split-Dalmatia", "country": "Croatia", "iso_a2": "HR", "at_sea": False}
    assert a["reach"]["edge_probability"] == pytest.approx(float(p["probs"][0] @ edge))


# -- cells stop at max_reach_km ----------------------------------------------------------------------
CROATIA = ["HRV", "SVN", "BIH", "HUN", "SRB", "MNE", "AUT", "ITA", "USA", "CAN"]


@pytest.fixture(scope="module")
def croatia():
    """Points only in Croatia; boundaries of Croatia, its neighbours and North America."""
    b = load_boundaries("bundled")
    sub = b[b["adm0_a3"].isin(CROATIA)].reset_index(drop=True)
    hr = shapely.union_all(sub.geometry.values[sub["adm0_a3"].to_numpy() == "HRV"])
    rng = np.random.default_rng(1)
    x0, y0, x1, y1 = hr.bounds
    xs, ys = rng.uniform(x0, x1, 6000), rng.uniform(y0, y1, 6000)
    keep = shapely.contains_xy(hr, xs, ys)
    lat, lon = ys[keep][:600], xs[keep][:600]
    return sub, lat, lon


def test_cells_stop_at_the_reach(croatia):
    sub, lat, lon = croatia
    whole = build_cells(lat, lon, sub, min_size=30, max_size=60, progress=False, max_reach_km=None)
    cells = build_cells(lat, lon, sub, min_size=30, max_size=60, progress=False, max_reach_km=500)
    a_whole, a = area_km2(whole.geoms), area_km2(cells.geoms)
    # without a limit some Croatian cell takes in North America; with it, nothing reaches past 500 km
    assert a_whole.max() > 5e6 and a.max() < 5e5 and a.sum() < 2.5e6   # 2.5 M km²: Croatia's 57K widened by 500 km
    assert cells.max_reach_km == 500 and whole.max_reach_km is None
    assert cells.stats_.reach_cut_cells == int(cells.at_reach_edge.sum()) > 0
    assert cells.stats_.reach_cut_km2 == pytest.approx(a_whole.sum() - a.sum(), rel=1e-3)
    assert shapely.is_valid(cells.geoms).all() and not shapely.is_empty(cells.geoms).any()
    assert (cells.gdf["count"].to_numpy() == whole.gdf["count"].to_numpy()).all() and cells.hash != whole.hash
    # every point stays in its own cell; Washington DC is in no cell (cell_of still gives the nearest)
    assert shapely.covers(cells.geoms[cells.labels_], shapely.points(lon, lat)).all()
    dc = shapely.Point(-77.04, 38.9)
    assert shapely.covers(whole.geoms, dc).any() and not shapely.covers(cells.geoms, dc).any()
    assert 0 <= int(cells.cell_of(38.9, -77.04)[0]) < len(cells)
    _kept_land_is_within_reach(cells, whole, lat, lon, 500.0)


def _kept_land_is_within_reach(cells, whole, lat, lon, r):
    """Land kept lies within r of a point; land cut lies beyond 0.94 r (the documented accuracy)."""
    rng = np.random.default_rng(2)
    u = shapely.union_all(whole.geoms)
    x0, y0, x1, y1 = 5.0, 38.0, 30.0, 52.0   # around Croatia: where the cut passes
    xs, ys = rng.uniform(x0, x1, 20000), rng.uniform(y0, y1, 20000)
    land = shapely.contains_xy(u, xs, ys)
    xs, ys = xs[land], ys[land]
    kept = shapely.contains_xy(shapely.union_all(cells.geoms), xs, ys)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(to_xyz(lat, lon)).query(to_xyz(ys, xs))
    d = chord_to_km(d)
    assert kept.any() and (~kept).any()
    assert d[kept].max() <= r + 1.0 and d[~kept].min() > 0.94 * r


def test_reach_round_trip_and_old_files(croatia, tmp_path):
    sub, lat, lon = croatia
    cells = build_cells(lat, lon, sub, min_size=30, max_size=60, progress=False)
    assert cells.max_reach_km == DEFAULT_MAX_REACH_KM
    back = GeoCells.load(cells.save(tmp_path / "c.parquet"))
    assert back.max_reach_km == DEFAULT_MAX_REACH_KM and (back.at_reach_edge == cells.at_reach_edge).all()
    old = cells.gdf.drop(columns=["reach_km", "reach_cut_km2"])
    old.to_parquet(tmp_path / "old.parquet")
    o = GeoCells.load(tmp_path / "old.parquet")
    assert o.max_reach_km is None and not o.at_reach_edge.any()
    assert GeoCells.from_frame(old).max_reach_km is None
    with pytest.raises(UserError, match="--max-reach-km"):
        build_cells(lat, lon, sub, min_size=30, max_size=60, progress=False, max_reach_km=0)


def test_circles_across_the_antimeridian_and_around_a_pole():
    pts = to_xyz(np.array([-16.8, -89.9, 89.0]), np.array([179.8, 30.0, 0.0]))
    g = circles(pts, 300.0)
    u = shapely.union_all(g)
    # a point 250 km east of Fiji's (across 180°), the South Pole region on every side, the North Pole
    assert shapely.covers(u, shapely.points([-177.85, -150.0, 100.0, 0.0], [-16.8, -88.0, -88.0, 89.9])).all()
    assert not shapely.covers(u, shapely.points([-176.0, 0.0, 60.0], [-16.8, -86.0, 85.0])).any()
    assert shapely.is_valid(g).all()
    # a cell holding the South Pole keeps the land within reach of a point near it, on every side
    cap = shapely.box(-180, -90, 180, -80)
    (clipped,), cut = clip_to_reach(np.array([cap], dtype=object), to_xyz(np.array([-89.5]), np.array([0.0])), 500.0)
    assert 0 < cut[0] and shapely.covers(clipped, shapely.points([-170.0, 10.0, 170.0], [-86.5, -86.5, -86.5])).all()
    assert not shapely.covers(clipped, shapely.Point(0.0, -84.0))


def test_build_cells_cli_reach_and_zoomed_plot(croatia, tmp_path, capsys):
    from worlds import cli

    from pigeon.commands.cells import DEFAULT_MAX_REACH_KM as CLI_DEFAULT
    from pigeon.geocells.plot import plot_extent

    sub, lat, lon = croatia
    assert CLI_DEFAULT == DEFAULT_MAX_REACH_KM
    pd.DataFrame({"lat": lat, "lon": lon}).to_csv(tmp_path / "p.csv", index=False)
    sub.to_parquet(tmp_path / "b.parquet")
    args = ["build-cells", "--points", str(tmp_path / "p.csv"), "--boundaries", str(tmp_path / "b.parquet"), "-q"]
    assert cli([*args, "--out", str(tmp_path / "bundle" / "cells.parquet"), "--max-reach-km", "300", "--plot", str(tmp_path / "m.png")]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["max_reach_km"] == 300 and s["reach_cut_cells"] > 0 and s["reach_cut_km2"] > 1e6
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["parts"]["cells"]["max_reach_km"] == 300
    assert (tmp_path / "m.png").stat().st_size > 0
    assert cli([*args, "--out", str(tmp_path / "c2.parquet"), "--max-reach-km", "inf"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_reach_km"] is None
    assert cli([*args, "--out", str(tmp_path / "c3.parquet"), "--max-reach-km", "-5"]) == 2
    assert "--max-reach-km" in capsys.readouterr().err
    # the map shows Croatia, not the world
    x0, x1, y0, y1 = plot_extent(GeoCells.load(tmp_path / "bundle" / "cells.parquet"), lat, lon)
    assert 12 < x0 < 14 and 19 < x1 < 21 and 41 < y0 < 43 and 46 < y1 < 48


def test_build_index_splits_option(world, tmp_path, capsys):
    import shutil

    from worlds import cli

    root, manifest, df, bpath, _ = world
    b = tmp_path / "b"
    shutil.copytree(bpath, b)
    assert cli(["build-index", "--bundle", str(b), "--images", str(manifest), "--splits", "all", "--no-validate"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == len(df)
    assert cli(["build-index", "--bundle", str(b), "--images", str(manifest), "--splits", "holdout"]) == 2
    assert "no rows with split in holdout" in capsys.readouterr().err


def test_evaluate_with_no_readable_photo_is_one_line(world, tmp_path, capsys):
    from worlds import cli

    root, manifest, df, bpath, _ = world
    gone = tmp_path / "gone.csv"
    df.head(5).assign(image=[f"missing{i}.jpg" for i in range(5)], split="test").to_csv(gone, index=False)
    for split in ("all", "test"):
        assert cli(["evaluate", "--bundle", str(bpath), "--data", str(gone), "--split", split, "--cache-dir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the progress bar
        assert "no photo of data" in last and "gone.csv could be read" in last and "Traceback" not in err, err
