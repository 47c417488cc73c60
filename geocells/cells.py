"""`GeoCells`: the cells as a GeoDataFrame plus fast lookups (which cell holds a point, neighbours)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely import STRtree

from pigeon.core.errors import UserError
from pigeon.core.io import atomic_path, bundled_file
from pigeon.core.sphere import wrap_lon

from .geometry import NearestIndex, adjacency, assign_points

COLUMNS = ["cell_id", "name", "lat", "lon", "count", "iso_a2", "adm0_a3", "country", "admin1", "admin1_all", "driving_side", "hemisphere"]
# written by build_cells; files without it (older builds) load with the one label at share 1.0
COMPOSITION = "composition"
PLACE_KEYS = ["adm0_a3", "iso_a2", "country", "admin1"]
# written by build_cells (`reach.py`): the limit in km (inf: none) and the land each cell lost to it;
# files without them load as "not recorded" (NaN) and nothing cut
REACH_COLUMNS = {"reach_km": np.nan, "reach_cut_km2": 0.0}


def encode_composition(cell: np.ndarray, place: np.ndarray, places: pd.DataFrame, share: np.ndarray, n_cells: int) -> np.ndarray:
    """One JSON string per cell, `[{"adm0_a3", "iso_a2", "country", "admin1", "share"}, ...]`, from long-format
    rows (`cell` id, `place` row of `places` (PLACE_KEYS columns), `share`) in the order to keep.

    JSON strings keep the column a plain string column: GeoParquet reads it as fast as any other, and
    the GeoJSON export needs no conversion. Each place is encoded once, then indexed per row."""
    head = np.array(["{" + ", ".join(f"{json.dumps(k)}: {json.dumps(str(v), ensure_ascii=False)}" for k, v in zip(PLACE_KEYS, row)) + ', "share": '
                     for row in places[PLACE_KEYS].itertuples(index=False)], dtype=object)
    parts = pd.Series(head[np.asarray(place)] + np.array([f"{float(x)!r}}}" for x in share], dtype=object))
    joined = parts.groupby(np.asarray(cell), sort=True).agg(", ".join)
    out = np.full(n_cells, "[]", dtype=object)
    out[joined.index.to_numpy()] = ("[" + joined + "]").to_numpy()
    return out


def label_composition(gdf) -> np.ndarray:
    """The composition of cells that carry no record of it: each cell's own label at share 1.0."""
    n = len(gdf)
    places = gdf[PLACE_KEYS].fillna("").astype(str).reset_index(drop=True)
    return encode_composition(np.arange(n), np.arange(n), places, np.ones(n), n)


class GeoCells:
    """Geocells: one row per cell, row i has cell_id i. Build with `build_cells`, or `load` a saved file."""

    def __init__(self, gdf):
        self.gdf = gdf
        self._tree: STRtree | None = None
        self._nbr: list[np.ndarray] | None = None
        self._nearest = None
        self._composition: pd.DataFrame | None = None
        self.labels_: np.ndarray | None = None  # set by build_cells: cell of each input point
        self.stats_: Any = None

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def from_frame(cls, gdf) -> "GeoCells":
        """From a GeoDataFrame with the columns of `COLUMNS` plus geometry; missing optional columns are filled."""
        if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry is None:
            raise UserError("cells must be a GeoDataFrame with a geometry column")
        gdf = gdf.copy()
        n = len(gdf)
        if n == 0:
            raise UserError("cells table is empty; build cells from at least one point")
        for col, default in (("name", None), ("iso_a2", ""), ("adm0_a3", ""), ("country", ""), ("admin1", ""),
                             ("admin1_all", None), ("driving_side", "unknown"), ("count", 0)):
            if col not in gdf.columns:
                gdf[col] = default if default is not None else (gdf["admin1"] if col == "admin1_all" else [f"cell-{i}" for i in range(n)])
        if "lat" not in gdf.columns or "lon" not in gdf.columns:
            rp = shapely.get_coordinates(shapely.point_on_surface(gdf.geometry.values))
            gdf["lon"], gdf["lat"] = rp[:, 0], rp[:, 1]
        if "hemisphere" not in gdf.columns:
            gdf["hemisphere"] = np.where(gdf["lat"] >= 0, "north", "south")
        gdf["cell_id"] = np.arange(n, dtype=np.int64)
        gdf = gdf.reset_index(drop=True)
        if COMPOSITION not in gdf.columns:
            gdf[COMPOSITION] = label_composition(gdf)
        for col, default in REACH_COLUMNS.items():
            if col not in gdf.columns:
                gdf[col] = default
        gdf = gdf[COLUMNS + [COMPOSITION, *REACH_COLUMNS, "geometry"]]
        if gdf.crs is None:
            gdf = gdf.set_crs("EPSG:4326")
        return cls(gdf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeoCells":
        """Read cells written by `save` (GeoParquet). `BUNDLE/cells.parquet` reads the cells the bundle's
        manifest names (they live in its version folder: `pigeon.core.io.bundled_file`)."""
        path = bundled_file(path)
        if not path.exists():
            raise UserError(f"cells file {path} does not exist; build it with `pigeon build-cells --points FILE --out {path}`")
        try:
            gdf = gpd.read_parquet(path)
        except Exception as e:
            raise UserError(f"cells file {path} is not a GeoParquet file of cells ({type(e).__name__}: {e}); rebuild it with `pigeon build-cells`") from e
        missing = [c for c in COLUMNS if c not in gdf.columns]
        if missing:
            raise UserError(f"cells file {path} lacks columns {missing}; rebuild it with `pigeon build-cells`")
        if not np.array_equal(gdf["cell_id"].to_numpy(), np.arange(len(gdf))):
            raise UserError(f"cells file {path}: cell_id must be 0..n-1 in row order; rebuild it with `pigeon build-cells`")
        gdf = gdf.reset_index(drop=True)
        if COMPOSITION not in gdf.columns:  # written before cells recorded their composition
            gdf.insert(len(COLUMNS), COMPOSITION, label_composition(gdf))
        for col, default in REACH_COLUMNS.items():  # written before cells recorded their reach
            if col not in gdf.columns:
                gdf.insert(gdf.columns.get_loc(gdf.geometry.name), col, default)
        return cls(gdf)

    def save(self, path: str | os.PathLike) -> Path:
        """Write GeoParquet atomically (a temp file renamed into place)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.gdf.to_parquet(tmp, index=False, compression="zstd")
        return path

    @property
    def hash(self) -> str:
        """SHA-256 of the cells' content (ids, centres, counts, geometry), independent of file encoding."""
        h = hashlib.sha256()
        g = self.gdf
        h.update(np.ascontiguousarray(g[["lat", "lon"]].to_numpy(np.float64)).tobytes())
        h.update(np.ascontiguousarray(g["count"].to_numpy(np.int64)).tobytes())
        h.update("\x1f".join(g["name"].astype(str)).encode())
        for wkb in shapely.to_wkb(g.geometry.values, output_dimension=2):
            h.update(wkb)
        return h.hexdigest()

    def composition(self, level: str = "admin1") -> pd.DataFrame:
        """Each cell's share of training points per place, long format (rows of one cell by share, largest first).

        level "admin1": cell_id, adm0_a3, iso_a2, country, admin1, share; level "country": the same
        without admin1, shares summed per country. A cell's shares sum to 1; its label (the columns
        adm0_a3/iso_a2/country/admin1) is its largest admin-1 share."""
        if level not in ("admin1", "country"):
            raise UserError(f"composition level {level!r} is unknown; use 'admin1' or 'country'")
        if self._composition is None:
            self._composition = _decode_composition(self.gdf[COMPOSITION].to_numpy())
        comp = self._composition
        if level == "country":
            keys = ["cell_id", "adm0_a3", "iso_a2", "country"]
            comp = comp.groupby(keys, sort=False, as_index=False)["share"].sum()
        return comp.copy()

    # -- lookups ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gdf)

    @property
    def centres(self) -> np.ndarray:
        """(C, 2) [lat, lon] of each cell's centre (spherical mean of its training points)."""
        return self.gdf[["lat", "lon"]].to_numpy(np.float64)

    @property
    def max_reach_km(self) -> float | None:
        """The build's `max_reach_km`: land farther than this from every training point is in no cell.
        None when there was no limit (inf) or the file does not record it."""
        r = self.gdf["reach_km"].to_numpy(np.float64)
        r = r[np.isfinite(r)]  # cells without a limit of their own (e.g. countries with no photos) hold NaN
        return float(r.max()) if len(r) else None

    @property
    def at_reach_edge(self) -> np.ndarray:
        """(C,) bool: cells that lost land to the reach limit, i.e. border land the training points never reached."""
        return self.gdf["reach_cut_km2"].to_numpy(np.float64) > 0

    @property
    def geoms(self) -> np.ndarray:
        return np.asarray(self.gdf.geometry.values, dtype=object)

    @property
    def tree(self) -> STRtree:
        if self._tree is None:
            self._tree = STRtree(self.geoms)
        return self._tree

    def cell_of(self, lat, lon) -> np.ndarray:
        """Cell id of each point (vectorised); a point in no cell (at sea, or on land beyond the cells'
        reach) goes to the nearest cell on the sphere."""
        lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
        lon = wrap_lon(np.atleast_1d(lon))
        if lat.shape != lon.shape:
            raise UserError("lat and lon must have the same shape")
        bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > 90)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"point {i} ({lat[i]}, {lon[i]}) is not a valid latitude/longitude")
        if self._nearest is None:
            self._nearest = NearestIndex(self.geoms)
        idx, *_ = assign_points(lat, lon, self.geoms, self.tree, self._nearest)
        return idx

    def neighbours(self, cell_id: int) -> np.ndarray:
        """Ids of the cells that touch this one."""
        if self._nbr is None:
            i, j = adjacency(self.geoms, self.tree)
            n = len(self)
            src, dst = np.r_[i, j], np.r_[j, i]
            o = np.argsort(src, kind="stable")
            src, dst = src[o], dst[o]
            cuts = np.searchsorted(src, np.arange(n + 1))
            self._nbr = [np.unique(dst[cuts[k]:cuts[k + 1]]) for k in range(n)]
        if not 0 <= int(cell_id) < len(self):
            raise UserError(f"cell id {cell_id} is not in 0..{len(self) - 1}")
        return self._nbr[int(cell_id)]

    def to_geojson(self, simplify: float = 0.05) -> dict[str, Any]:
        """FeatureCollection of the cells (geometry simplified by `simplify` degrees, 0 = exact)."""
        g = self.gdf
        geom = g.geometry.values
        if simplify > 0:
            geom = shapely.simplify(geom, simplify, preserve_topology=True)
        props = g.drop(columns="geometry")
        feats = []
        for rec, gj in zip(props.to_dict("records"), shapely.to_geojson(geom)):
            rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
            feats.append({"type": "Feature", "id": rec["cell_id"], "properties": rec, "geometry": json.loads(gj)})
        return {"type": "FeatureCollection", "features": feats}


def _decode_composition(col: np.ndarray) -> pd.DataFrame:
    """Long-format table of the per-cell JSON lists (one `json.loads` for all cells)."""
    try:
        recs = json.loads("[" + ",".join(col.astype(str)) + "]")
        flat = pd.DataFrame([e for r in recs for e in r], columns=PLACE_KEYS + ["share"])
        lens = np.array([len(r) for r in recs])
        share = flat["share"].to_numpy(np.float64)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cells' {COMPOSITION} column is not JSON lists of places with shares ({e}); rebuild the cells with `pigeon build-cells`") from e
    cell_id = np.repeat(np.arange(len(recs), dtype=np.int64), lens)
    if len(recs) != len(col) or not (np.isfinite(share) & (share >= 0)).all() or not (np.bincount(cell_id, share, len(col)) > 0).all():
        raise UserError(f"cells' {COMPOSITION} column has a cell with no places or a bad share; rebuild the cells with `pigeon build-cells`")
    flat.insert(0, "cell_id", cell_id)
    flat[PLACE_KEYS] = flat[PLACE_KEYS].fillna("").astype(str)
    return flat
