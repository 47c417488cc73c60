"""`pigeon build-cells` end to end, and every bad input: one line, exit code 2, no traceback, no output file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import geopandas as gpd
import shapely

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pigeon.cli", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def boundaries_file(tmp_path_factory) -> Path:
    """Four 1-degree squares in two countries (fast to build on)."""
    d = tmp_path_factory.mktemp("b")
    g = gpd.GeoDataFrame(
        {"adm0_a3": ["FRA", "FRA", "DEU", "DEU"], "admin1": ["a", "b", "c", "d"]},
        geometry=[shapely.box(x, 45, x + 1, 46) for x in range(4)], crs="EPSG:4326",
    )
    p = d / "squares.geojson"
    g.to_file(p, driver="GeoJSON")
    return p


def _points(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"latitude": rng.uniform(45.05, 45.95, n), "longitude": rng.uniform(0.05, 3.95, n)})


def test_build_cells_cli_writes_bundle_and_map(tmp_path, boundaries_file):
    pts = tmp_path / "pts.csv"
    df = _points()
    df.loc[5, "latitude"] = np.nan  # an unusable row: skipped and counted
    df.to_csv(pts, index=False)
    out = tmp_path / "bundle" / "cells.parquet"
    r = run_cli("build-cells", "--points", str(pts), "--out", str(out), "--boundaries", str(boundaries_file),
                "--min-size", "20", "--max-size", "40", "--plot", str(tmp_path / "map.png"), "--geojson", str(tmp_path / "c.geojson"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["points"] == 299 and summary["skipped_rows"] == 1
    assert 20 <= summary["size_min"] and summary["size_max"] <= 40
    assert summary["cells"] >= 299 // 40
    assert "cells from 299 points (1 rows skipped" in r.stderr
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["parts"]["cells"]["min_size"] == 20
    from pigeon.geocells import GeoCells

    assert GeoCells.load(out).gdf["count"].sum() == 299
    assert (tmp_path / "map.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "c.geojson").read_text())["features"]) == summary["cells"]


def _bad(tmp_path: Path, args: list[str], expect: str):
    out = tmp_path / "out" / "cells.parquet"
    r = run_cli("build-cells", *args, "--out", str(out))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.strip().splitlines() if l.startswith("pigeon: error:")]
    assert len(err) == 1, r.stderr
    assert expect in err[0], err[0]
    assert not out.exists() and not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    return err[0]


def test_missing_file(tmp_path):
    _bad(tmp_path, ["--points", str(tmp_path / "nope.csv")], "nope.csv does not exist")


def test_missing_columns(tmp_path):
    p = tmp_path / "p.csv"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(p, index=False)
    msg = _bad(tmp_path, ["--points", str(p)], "has no latitude column")
    assert "--lat-col" in msg


def test_misnamed_given_column(tmp_path):
    p = tmp_path / "p.csv"
    _points(10).to_csv(p, index=False)
    _bad(tmp_path, ["--points", str(p), "--lat-col", "LAT_WGS"], "no latitude column 'LAT_WGS'")


def test_latitude_out_of_range(tmp_path, boundaries_file):
    p = tmp_path / "p.csv"
    df = _points(10)
    df.loc[3, "latitude"] = 123.0
    df.to_csv(p, index=False)
    msg = _bad(tmp_path, ["--points", str(p), "--boundaries", str(boundaries_file)], "latitude 123.0 is outside [-90, 90]")
    assert "row 5" in msg  # CSV line 5: header + rows 0..3


def test_text_in_number_column(tmp_path):
    p = tmp_path / "p.csv"
    df = _points(10).astype(object)
    df.loc[2, "longitude"] = "east"
    df.to_csv(p, index=False)
    _bad(tmp_path, ["--points", str(p)], "is not a number")


def test_empty_file_and_header_only(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    _bad(tmp_path, ["--points", str(p)], "is empty")
    h = tmp_path / "header.csv"
    h.write_text("lat,lon\n")
    _bad(tmp_path, ["--points", str(h)], "has no rows")


def test_all_rows_nan(tmp_path):
    p = tmp_path / "nan.csv"
    p.write_text("lat,lon\n,\nnan,1\n")
    _bad(tmp_path, ["--points", str(p)], "no usable rows")


def test_boundaries_without_polygons(tmp_path):
    pts = tmp_path / "p.csv"
    _points(50).to_csv(pts, index=False)
    b = gpd.GeoDataFrame({"adm0_a3": ["FRA"]}, geometry=[shapely.Point(1, 45)], crs="EPSG:4326")
    bp = tmp_path / "points_only.geojson"
    b.to_file(bp, driver="GeoJSON")
    _bad(tmp_path, ["--points", str(pts), "--boundaries", str(bp)], "holds no polygons")
    _bad(tmp_path, ["--points", str(pts), "--boundaries", str(tmp_path / "missing.gpkg")], "missing.gpkg does not exist")


def test_bad_sizes(tmp_path, boundaries_file):
    pts = tmp_path / "p.csv"
    _points(50).to_csv(pts, index=False)
    _bad(tmp_path, ["--points", str(pts), "--boundaries", str(boundaries_file), "--min-size", "30", "--max-size", "40"], "max >= 2*min")


def test_existing_output_kept_on_failure(tmp_path, boundaries_file):
    """A failed run never replaces or truncates an existing cells file."""
    out = tmp_path / "cells.parquet"
    out.write_bytes(b"previous")
    p = tmp_path / "p.csv"
    p.write_text("lat,lon\n100,1\n")
    r = run_cli("build-cells", "--points", str(p), "--out", str(out))
    assert r.returncode == 2 and out.read_bytes() == b"previous"
