"""Build, extend and shrink a gallery: the FAISS index, `gallery.parquet` and `clusters.parquet` together.

These are plain functions on arrays (no backbone, no bundle): `pigeon build-index` embeds the images
and calls them, tests and benchmarks call them on synthetic embeddings. The three parts always
change together, and cluster ids are kept 0..K-1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pigeon.core.errors import UserError

from .clusters import ClusterTable, assign_to_existing, cluster_points
from .gallery import GeoIndex, Kind

GALLERY_COLUMNS = ["id", "lat", "lon", "cell", "cluster", "image"]


@dataclass
class Gallery:
    """The three parts of a gallery, consistent with each other."""

    index: GeoIndex
    frame: pd.DataFrame          # GALLERY_COLUMNS, one row per indexed image
    clusters: ClusterTable


def write_gallery_frame(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `gallery.parquet` (callers make it atomic)."""
    frame[GALLERY_COLUMNS].to_parquet(str(path), index=False)


def read_gallery_frame(path: str | os.PathLike) -> pd.DataFrame:
    """Read `gallery.parquet`, refusing one without the expected columns."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"gallery file {path} does not exist; build it with `pigeon build-index`")
    df = pd.read_parquet(str(path))
    missing = [c for c in GALLERY_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"gallery file {path} lacks columns {missing}; rebuild it with `pigeon build-index`")
    return df


def _frame(ids, lat, lon, cell, cluster, image) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({
        "id": np.asarray(ids, np.int64), "lat": np.asarray(lat, np.float64), "lon": np.asarray(lon, np.float64),
        "cell": np.asarray(cell, np.int64), "cluster": np.asarray(cluster, np.int64),
        "image": np.asarray(image if image is not None else [""] * n, dtype=object).astype(str),
    })


def _check(emb, ids, lat, lon, cell) -> None:
    n = len(emb)
    if not (len(ids) == len(lat) == len(lon) == len(cell) == n):
        raise UserError(f"gallery arrays differ in length (emb {n}, ids {len(ids)}, lat {len(lat)}, lon {len(lon)}, cell {len(cell)}); give one value per image")
    if n and (np.min(cell) < 0):
        raise UserError("gallery cells must be non-negative cell ids (GeoCells.cell_of)")


def _restat(frame: pd.DataFrame, index: GeoIndex) -> tuple[pd.DataFrame, ClusterTable]:
    """Renumber clusters 0..K-1 and recompute centres, prototypes and sizes from the index's vectors."""
    frame = frame.reset_index(drop=True).copy()
    _, frame["cluster"] = np.unique(frame["cluster"].to_numpy(np.int64), return_inverse=True)
    vid, vecs = index.vectors()
    order = np.argsort(vid)
    row_of = order[np.searchsorted(vid, frame["id"].to_numpy(np.int64), sorter=order)]
    emb = vecs[row_of]
    table = ClusterTable.from_members(frame["lat"].to_numpy(), frame["lon"].to_numpy(), frame["cell"].to_numpy(),
                                      frame["cluster"].to_numpy(), emb)
    return frame, table


def index_in_cluster_order(emb: np.ndarray, ids: np.ndarray, cluster: np.ndarray, kind: Kind = "flat") -> GeoIndex:
    """A GeoIndex holding `emb` stored cluster by cluster, so each cluster's vectors are contiguous in
    FAISS memory: refinement reads a cluster's photos as one sequential block instead of scattered
    rows (at 1M photos, a third of the refinement time). Flat and HNSW are filled in chunks (no copy
    of the whole array); IVF in one call, so its coarse quantiser trains on a sample of everything."""
    emb = np.asarray(emb, np.float32)
    ids = np.asarray(ids, np.int64)
    order = np.argsort(np.asarray(cluster, np.int64), kind="stable")
    index = GeoIndex(emb.shape[1], kind=kind)
    step = len(order) if kind == "ivf" else 1 << 16
    for s in range(0, len(order), step):
        index.add(emb[order[s:s + step]], ids[order[s:s + step]])
    return index


def build_gallery(emb: np.ndarray, ids: np.ndarray, lat: np.ndarray, lon: np.ndarray, cell: np.ndarray,
                  image: np.ndarray | None = None, *, kind: Kind = "flat", progress: bool = False,
                  **cluster_opts) -> Gallery:
    """Index embeddings, cluster the images inside their cells (OPTICS) and make the prototypes."""
    emb = np.asarray(emb, np.float32)
    _check(emb, ids, lat, lon, cell)
    if len(emb) == 0:
        raise UserError("the gallery is empty; give at least one image with a location")
    cluster = cluster_points(lat, lon, cell, progress=progress, **cluster_opts)
    index = index_in_cluster_order(emb, ids, cluster, kind)
    table = ClusterTable.from_members(lat, lon, cell, cluster, emb)
    return Gallery(index, _frame(ids, lat, lon, cell, cluster, image), table)


def append_gallery(g: Gallery, emb: np.ndarray, ids: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                   cell: np.ndarray, image: np.ndarray | None = None) -> Gallery:
    """Add images without re-clustering: each joins the nearest existing cluster of its cell; images in
    cells without clusters form one new cluster per cell. Prototypes and centres are recomputed."""
    emb = np.asarray(emb, np.float32)
    _check(emb, ids, lat, lon, cell)
    if len(emb) == 0:
        return g
    g.index.add(emb, ids)
    cl = assign_to_existing(lat, lon, cell, g.clusters.frame)
    new = cl < 0
    if new.any():
        _, inv = np.unique(np.asarray(cell, np.int64)[new], return_inverse=True)
        cl[new] = len(g.clusters) + inv
    frame = pd.concat([g.frame, _frame(ids, lat, lon, cell, cl, image)], ignore_index=True)
    frame, table = _restat(frame, g.index)
    return Gallery(g.index, frame, table)


def remove_from_gallery(g: Gallery, ids: np.ndarray) -> tuple[Gallery, int]:
    """Remove images by id from all three parts; clusters left empty disappear. Returns (gallery, removed)."""
    ids = np.asarray(ids, np.int64)
    frame = g.frame[~g.frame["id"].isin(ids)]
    if len(frame) == 0:
        raise UserError("removing these ids would leave the gallery empty; build a new one instead")
    removed = g.index.remove(ids)
    frame, table = _restat(frame, g.index)
    return Gallery(g.index, frame, table), removed
