"""Benchmark `build_cells` on MP-16 coordinates: 100K points at 30/60 (PIGEON) and 1M at 300/600.

Each case runs in a fresh subprocess so its peak resident memory is its own. Prints one JSON line
per case and a final JSON line with all of them.

    python bench/build_cells.py [--points ../shared/data/mp16_gps_100k.csv] [--cases 100k,1m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_case(points: str, scale: int, min_size: int, max_size: int, jitter_km: float, seed: int = 0) -> dict:
    import numpy as np

    from pigeon.geocells import build_cells, load_boundaries, load_points
    from pigeon.core.sphere import EARTH_RADIUS_KM, haversine_km

    p = load_points(points)
    lat, lon = p.lat, p.lon
    if scale > 1:
        # resample `scale` times with ~jitter_km of Gaussian jitter (a denser world with the same shape)
        rng = np.random.default_rng(seed)
        lat = np.repeat(lat, scale)
        lon = np.repeat(lon, scale)
        s = np.degrees(jitter_km / EARTH_RADIUS_KM)
        lat = np.clip(lat + rng.normal(0, s, len(lat)), -90, 90)
        lon = lon + rng.normal(0, s, len(lon)) / np.maximum(np.cos(np.radians(lat)), 0.05)
    b = load_boundaries("bundled")
    t = time.perf_counter()
    cells = build_cells(lat, lon, b, min_size=min_size, max_size=max_size, progress=False)
    wall = time.perf_counter() - t
    c = cells.gdf["count"].to_numpy()
    cen = cells.centres[cells.labels_]
    d = haversine_km(lat, (lon + 180) % 360 - 180, cen[:, 0], cen[:, 1])
    st = cells.stats_
    return {
        "case": f"{len(lat) // 1000}K points, {min_size}/{max_size}",
        "points": int(len(lat)),
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cells": int(len(cells)),
        "size_min": int(c.min()),
        "size_median": float(np.median(c)),
        "size_max": int(c.max()),
        "cells_outside_bounds": int(((c < min_size) | (c > max_size)).sum()),
        "unsplittable": len(st.unsplittable),
        "points_lost": int(len(lat) - c.sum()),
        "km_to_centre_mean": round(float(d.mean()), 1),
        "km_to_centre_median": round(float(np.median(d)), 1),
        "stage_s": {k: round(v, 2) for k, v in st.seconds.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default=str(ROOT.parent / "shared" / "data" / "mp16_gps_100k.csv"))
    ap.add_argument("--cases", default="100k,1m")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cases = {"100k": (1, 30, 60, 0.0), "1m": (10, 300, 600, 1.0)}
    if a.case:
        print(json.dumps(run_case(a.points, *cases[a.case])))
        return
    results = []
    for name in a.cases.split(","):
        r = subprocess.run([sys.executable, __file__, "--points", a.points, "--case", name], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            raise SystemExit(r.returncode)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        results.append(res)
    print(json.dumps({"bench": "build_cells", "machine": f"{platform.machine()}, {os.cpu_count()} cores", "results": results}))


if __name__ == "__main__":
    main()
