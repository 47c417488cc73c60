"""Make geocells' bundled run-time data from ../shared/data (run by `make data`).

Writes into geocells/data/:
- admin1.parquet: Natural Earth 10m admin-1 polygons (public domain), made valid, simplified as a
  coverage (shared borders stay shared: no gaps or overlaps appear) with a 0.01 degree tolerance
  (about 1.1 km at the equator, less than the width of the smallest cells the 30/60 sizes give
  outside city centres, where cells are cut by Voronoi edges anyway, not by admin borders);
  columns adm0_a3, iso_a2, country, admin1, geometry.
- driving_side.csv: adm0_a3, iso_a2, country, driving_side (from Wikidata, CC0).
- cities.parquet: GeoNames places with >= 1000 people (CC BY 4.0): lat, lon, name, admin1, cc.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pigeon.geocells.geometry import polygonal

TOLERANCE_DEG = 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared/data", help="folder with the source data")
    ap.add_argument("--out", default="geocells/data", help="output folder (package data)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE_DEG, help="simplification tolerance in degrees")
    a = ap.parse_args()
    src, out = Path(a.shared), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = pd.read_csv(src / "driving_side.csv", keep_default_na=False, na_values=[""])
    ds["iso_a2"] = ds["iso_a2"].fillna("")
    # pandas reads Namibia's "NA" as missing unless told otherwise; keep_default_na=False does.
    ds = ds.rename(columns={"admin": "country"})[["adm0_a3", "iso_a2", "country", "driving_side"]]
    ds.to_csv(out / "driving_side.csv", index=False)

    g = gpd.read_parquet(src / "ne_10m_admin1.parquet")
    geom = shapely.make_valid(g.geometry.values)
    geom = shapely.coverage_simplify(geom, a.tolerance)
    geom = shapely.make_valid(geom)
    # keep only polygonal parts (make_valid can leave lines where a sliver collapsed)
    geom = np.array([polygonal(x) for x in geom], dtype=object)
    admin1 = g["name_en"].where(g["name_en"].astype(str).str.len() > 0, g["name"]).fillna(g["name"])
    iso = g["iso_a2"].where(g["iso_a2"].str.len() == 2, g["adm0_a3"].map(dict(zip(ds.adm0_a3, ds.iso_a2))))
    b = gpd.GeoDataFrame(
        {"adm0_a3": g["adm0_a3"].values, "iso_a2": iso.fillna("").values, "country": g["admin"].values, "admin1": admin1.values},
        geometry=geom, crs="EPSG:4326",
    )
    b = b[~b.geometry.is_empty].reset_index(drop=True)
    b.to_parquet(out / "admin1.parquet", compression="zstd", index=False)

    c = pd.read_csv(src / "geonames_cities1000.csv", keep_default_na=False, na_values=[""])
    c = c[["lat", "lon", "name", "admin1", "cc"]].copy()
    c["lat"] = c["lat"].astype("float32")
    c["lon"] = c["lon"].astype("float32")
    for col in ("name", "admin1", "cc"):
        c[col] = c[col].fillna("").astype(str)
    c.to_parquet(out / "cities.parquet", compression="zstd", index=False)

    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB")
    print(f"admin-1: {len(b)} polygons, {shapely.get_num_coordinates(b.geometry.values).sum()} vertices; cities: {len(c)}")


if __name__ == "__main__":
    main()
