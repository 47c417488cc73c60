"""`pigeon build-cells`: geocells from training points and admin boundaries."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import typer

from pigeon.bundle import PART_FILES, Bundle
from pigeon.core.errors import UserError
from pigeon.core.io import atomic_path
from pigeon.core.splits import CELL_SPLITS, describe as describe_splits, parse as parse_splits


DEFAULT_MAX_REACH_KM = 500.0         # = pigeon.geocells.reach.DEFAULT_MAX_REACH_KM (not imported: shapely at start-up)
_SCHEME_OR_PATTERN = re.compile(r"[{*?\[]|^[A-Za-z][A-Za-z0-9+.-]+:")   # a brace/glob pattern, a URL or pipe:


def _has_image_bytes(path: Path) -> bool:
    """Whether a .parquet file holds image bytes (a binary or HF {bytes, path} column; GeoParquet
    geometry, also binary, does not count): such a file is a data source, not a points table."""
    import pyarrow as pa  # here, not at module top: only a .parquet --points needs it
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:
        return False   # unreadable: load_points says so
    if schema.metadata and b"geo" in schema.metadata:
        return False
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    for f in schema:
        if any(t(f.type) for t in binary) or (pa.types.is_struct(f.type) and any(c.name == "bytes" for c in f.type)):
            return True
    return False


def _is_points_table(points: str) -> bool:
    """Today's input, read by load_points exactly as before: a CSV or Parquet table of coordinates (a
    manifest among them), or a path that does not exist (load_points names it). Anything else (WebDataset
    shards, a folder, a pattern, a URL, Parquet with image bytes) is a data source."""
    p = Path(points)
    low = p.name.lower()
    if low.endswith((".csv", ".tsv", ".txt", ".geoparquet")):
        return True
    if low.endswith((".tar", ".tgz", ".tar.gz")) or p.is_dir() or (not p.exists() and _SCHEME_OR_PATTERN.search(points)):
        return False
    return not (p.is_file() and low.endswith((".parquet", ".pq")) and _has_image_bytes(p))


def read_points(points: str | Path, lat_col: str | None = None, lon_col: str | None = None,
                splits: Sequence[str] | None = CELL_SPLITS):
    """The training points of `--points`: a points table through `load_points`, any other data source
    through `Source.coords()` (its bad samples skipped and counted); rows of other `splits` left out."""
    from pigeon.geocells import load_points
    from pigeon.geocells.points import points_from_frame

    if _is_points_table(str(points)):
        return load_points(points, lat_col, lon_col, splits=splits)
    from pigeon.datasets.sources import open_source  # here: pigeon.datasets imports torch, which a points table does not need

    src = open_source(str(points), lat_key=lat_col, lon_key=lon_col, lat_column=lat_col, lon_column=lon_col)
    pts = points_from_frame(src.coords(), "lat", "lon", None, splits)
    pts.skipped += sum(src.skipped.values())
    return pts


def build_cells_file(
    points: str | Path,
    out: Path,
    boundaries: str = "bundled",
    min_size: int = 30,
    max_size: int = 60,
    lat_col: str | None = None,
    lon_col: str | None = None,
    columns: dict[str, str] | None = None,
    plot: Path | None = None,
    geojson: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    splits: Sequence[str] | None = CELL_SPLITS,
    max_reach_km: float | None = DEFAULT_MAX_REACH_KM,
) -> dict:
    """Read points (a points table or any data source; only rows of `splits`, None: all), build cells,
    write them (atomically) and return a summary dict.

    When `out` is named `cells.parquet`, its folder is treated as a model bundle: the cells are written
    into a fresh version folder (`BUNDLE/v-<id>/cells.parquet`) and recorded in the bundle's manifest by
    one rename, like every other part (so later parts can be checked against them, and a kill leaves
    the old cells or the new ones; `BUNDLE/cells.parquet` as a path still finds them). A bundle that
    already holds parts built on its cells (head, index, ...) is refused unless `force`: new cells
    orphan them, and the summary's `must_rebuild` says which. Land farther than `max_reach_km` from every
    point belongs to no cell (None or inf: the cells tile all land).
    """
    # imported here, not at module top: `pigeon --help` should not pay for shapely, geopandas and numba
    from pigeon.geocells import build_cells, load_boundaries

    t0 = time.perf_counter()
    out = _cells_path(out)
    dependents = _dependent_parts(out, force)
    pts = read_points(points, lat_col, lon_col, splits)
    b = load_boundaries(boundaries, columns)
    cells = build_cells(pts.lat, pts.lon, b, min_size=min_size, max_size=max_size, seed=seed, progress=progress, max_reach_km=max_reach_km)
    meta = {"points_file": str(points), "points": int(len(pts)), "boundaries": str(boundaries), "min_size": int(min_size),
            "max_size": int(max_size), "seed": int(seed), "content_hash": cells.hash,
            "splits": describe_splits(parse_splits(splits)), "left_out_rows": int(pts.left_out),
            "max_reach_km": cells.max_reach_km}
    _write_cells(cells, out, meta, geojson)
    if plot:
        from pigeon.geocells.plot import plot_cells  # matplotlib only when a plot is asked for

        plot_cells(cells, plot, pts.lat, pts.lon, title=f"{len(cells)} geocells from {len(pts):,} points ({min_size}-{max_size} per cell)")
    manifest = Bundle(out.parent) if dependents else None
    rebuild = [p for p in dependents if manifest.meta(p).get("cells_hash") != cells.hash]
    return {"out": str(out), **_summary(cells, pts, min_size, max_size), "splits": meta["splits"], "must_rebuild": rebuild,
            "seconds": round(time.perf_counter() - t0, 2)}


def _dependent_parts(out: Path, force: bool) -> list[str]:
    """Parts of the bundle at `out` built on its current cells; refuse to orphan them unless `force`."""
    if out.name != "cells.parquet" or not (out.parent / "manifest.json").exists():
        return []
    b = Bundle(out.parent)
    deps = [p for p in b.manifest["parts"] if p != "cells" and b.meta(p).get("cells_hash")]
    if deps and not force:
        names = ", ".join(PART_FILES[p] for p in deps)
        raise UserError(f"--out {out}: the bundle holds {names} built on its current cells; new cells would orphan them. "
                        f"Pass --force, then rerun `pigeon train` and `pigeon build-index`, or write the cells elsewhere")
    return deps


def _cells_path(out: Path) -> Path:
    """The GeoParquet file to write: a folder means FOLDER/cells.parquet (a bundle)."""
    out = Path(out)
    if out.exists() and out.is_dir():
        out = out / "cells.parquet"
    if out.suffix.lower() not in (".parquet", ".geoparquet"):
        raise UserError(f"--out {out}: cells are written as GeoParquet; give a path ending in .parquet (e.g. BUNDLE/cells.parquet)")
    return out


def _write_cells(cells, out: Path, meta: dict, geojson: Path | None) -> None:
    """Write the cells atomically; `cells.parquet` in a folder goes through that bundle (`Bundle.write_part`:
    a version folder, then the one manifest rename)."""

    if out.name == "cells.parquet":
        Bundle(out.parent, create=True).write_part("cells", lambda tmp: cells.save(tmp), **meta)
    else:
        cells.save(out)
    if geojson:
        with atomic_path(geojson) as tmp:
            tmp.write_text(json.dumps(cells.to_geojson()))


def _summary(cells, pts, min_size: int, max_size: int) -> dict:
    """Sizes and what was lost or left out of bounds: the figures the command prints."""
    counts = cells.gdf["count"].to_numpy()
    st = cells.stats_
    return {
        "cells": int(len(cells)),
        "points": int(len(pts)),
        "skipped_rows": int(pts.skipped),
        "left_out_rows": int(pts.left_out),   # rows of other splits than --splits
        "at_sea": int(st.at_sea),
        "size_min": int(counts.min()),
        "size_median": float(sorted(counts)[len(counts) // 2]),
        "size_max": int(counts.max()),
        "outside_bounds": int(((counts < min_size) | (counts > max_size)).sum()),
        "max_reach_km": cells.max_reach_km,            # None: no limit
        "reach_cut_cells": int(st.reach_cut_cells),    # cells that lost land beyond it
        "reach_cut_km2": round(float(st.reach_cut_km2)),
        "unsplittable": st.unsplittable,
    }


def register(app: typer.Typer) -> None:
    @app.command("build-cells")
    def build_cells_cmd(
        points: str = typer.Option(..., "--points", help="CSV or Parquet with latitude/longitude columns, or any data source "
                                                          "(manifest, WebDataset tar shards, Parquet with image bytes) for its coordinates."),
        out: Path = typer.Option(..., "--out", help="Output GeoParquet; BUNDLE/cells.parquet also records it in the bundle manifest."),
        boundaries: str = typer.Option("bundled", "--boundaries", help="'bundled' (Natural Earth admin-1) or a GeoParquet/GeoJSON/GeoPackage/shapefile of admin polygons."),
        min_size: int = typer.Option(30, "--min-size", help="Fewest training points per cell (PIGEON 30, PIGEOTTO 1000)."),
        max_size: int = typer.Option(60, "--max-size", help="Most training points per cell (PIGEON 60, PIGEOTTO 2000); at least 2 x min-size."),
        lat_col: Optional[str] = typer.Option(None, "--lat-col", help="Latitude column (default: detect lat/latitude/LAT...)."),
        lon_col: Optional[str] = typer.Option(None, "--lon-col", help="Longitude column (default: detect lon/lng/longitude...)."),
        country_col: Optional[str] = typer.Option(None, "--country-col", help="Boundaries: ISO alpha-3 country code column."),
        country_name_col: Optional[str] = typer.Option(None, "--country-name-col", help="Boundaries: country name column."),
        admin1_col: Optional[str] = typer.Option(None, "--admin1-col", help="Boundaries: admin-1 name column."),
        admin2_col: Optional[str] = typer.Option(None, "--admin2-col", help="Boundaries: admin-2 name column."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw a map of the cells and points (PNG)."),
        geojson: Optional[Path] = typer.Option(None, "--geojson", help="Also export the cells as GeoJSON."),
        seed: int = typer.Option(0, "--seed", help="Seed for OPTICS subsampling of very large cells."),
        splits: str = typer.Option(",".join(CELL_SPLITS), "--splits", help="Rows to build on, by their `split` column/field (missing: train); 'all' for every row."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; only the JSON summary."),
        force: bool = typer.Option(False, "--force", help="Replace the cells of a bundle that already has a head or index built on them (they must then be rebuilt)."),
        max_reach_km: float = typer.Option(DEFAULT_MAX_REACH_KM, "--max-reach-km", help="Land farther than this (km) from every point belongs to no cell; inf: cells tile all land."),
    ) -> None:
        """Build geocells: admin regions with photos, small ones merged, big ones split by OPTICS + Voronoi."""
        columns = {k: v for k, v in {"adm0_a3": country_col, "country": country_name_col, "admin1": admin1_col, "admin2": admin2_col}.items() if v}
        s = build_cells_file(points, out, boundaries, min_size, max_size, lat_col, lon_col, columns, plot, geojson, seed,
                             progress=not quiet, force=force, splits=parse_splits(splits), max_reach_km=max_reach_km)
        if not quiet:
            print(
                f"{s['cells']} cells from {s['points']:,} points ({s['skipped_rows']} rows skipped, {s['at_sea']} at sea -> nearest land) "
                f"| size min/median/max {s['size_min']}/{s['size_median']:g}/{s['size_max']} | {s['seconds']} s -> {s['out']}",
                file=sys.stderr,
            )
            if s["reach_cut_cells"]:
                print(f"note: {s['reach_cut_km2']:,} km² of land farther than {s['max_reach_km']:g} km from every point left out of "
                      f"{s['reach_cut_cells']} edge cells (--max-reach-km)", file=sys.stderr)
            if s["left_out_rows"]:
                print(f"note: {s['left_out_rows']:,} rows of other splits than {','.join(s['splits'])} left out (--splits all keeps them)", file=sys.stderr)
            if s["must_rebuild"]:
                print(f"note: the cells changed; rebuild {', '.join(s['must_rebuild'])} (`pigeon train`, `pigeon build-index`)", file=sys.stderr)
            if s["unsplittable"]:
                print(f"note: {len(s['unsplittable'])} cell(s) above --max-size hold one location with too many photos to split: {s['unsplittable']}", file=sys.stderr)
        print(json.dumps(s))
