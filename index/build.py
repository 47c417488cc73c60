"""Build, extend and shrink a gallery: the FAISS index, `gallery.parquet` and `clusters.parquet` together.

These are plain functions on arrays (no backbone, no bundle): `pigeon build-index` embeds the images
and calls them, tests and benchmarks call them on synthetic embeddings. The three parts always
change together, and cluster ids are kept 0..K-1.

Embeddings may be any (n, d) array-like that can be sliced and indexed by row numbers: an ndarray,
a memory-mapped float16 `np.memmap` / `np.load(..., mmap_mode="r")`, or several shards joined by
`StackedRows`. They are read chunk by chunk (`chunk` rows at a time, normalised per chunk), once for
the index and the cluster prototypes together, so a build never holds a float32 copy of them all.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pigeon.core.errors import UserError
from pigeon.core.provenance import SOURCE_COLUMNS, source_text

from .clusters import ClusterTable, assign_to_existing, cluster_points
from .gallery import GeoIndex, Kind, check_new_ids, normalise

GALLERY_COLUMNS = ["id", "lat", "lon", "cell", "cluster", "image"]
# optional: kept when the data source carried them (pigeon.core.provenance); galleries without them load as before
GALLERY_SOURCE_COLUMNS = list(SOURCE_COLUMNS)
CHUNK = 1 << 16  # rows read, normalised and added at a time


class StackedRows:
    """Several (n_i, d) arrays (e.g. memory-mapped float16 embedding shards) read as one (sum n_i, d)
    array without concatenating them: `len`, `shape`, `dtype`, rows by slice or by row numbers."""

    def __init__(self, parts: Sequence[Any]):
        if not len(parts) or any(np.ndim(p) != 2 for p in parts) or len({p.shape[1] for p in parts}) != 1:
            raise UserError("embedding shards must be 2-D arrays (n_i, dim) of one dimension; give at least one")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), int(self.parts[0].shape[1]))
        self.dtype = np.result_type(*[p.dtype for p in self.parts])
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key, np.int64).reshape(-1)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for j in np.unique(part):  # one gather per shard, not per row
            m = part == j
            out[m] = self.parts[j][rows[m] - self.offsets[j]]
        return out


def _as_rows(emb: Any) -> Any:
    """Array-likes with a shape (ndarray, np.memmap, StackedRows) as they are; anything else as float32."""
    rows = emb if hasattr(emb, "shape") and hasattr(emb, "__getitem__") else np.asarray(emb, np.float32)
    if len(rows.shape) != 2:
        raise UserError(f"embeddings must be a 2-D array (n, dim), got shape {tuple(rows.shape)}; reshape them")
    return rows


def _read_rows(emb: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of an array-like as float32, read in ascending row order (sequential on disk for a memory
    map) and returned in the order asked; a read-only memory map's pages are let go afterwards."""
    srt = np.argsort(rows, kind="stable")
    x = np.empty((len(rows), emb.shape[1]), np.float32)
    x[srt] = emb[rows[srt]]
    _drop_pages(emb)
    return x


def _drop_pages(emb: Any) -> None:
    """Unmap the pages of read-only memory-mapped input (they stay in the page cache): read in cluster
    order, a 5M x 512 float16 map would otherwise end up resident in this process whole (5 GB)."""
    for part in getattr(emb, "parts", [emb]):
        mm = getattr(part, "_mmap", None)  # numpy's mmap.mmap behind an np.memmap (and its views)
        if mm is not None and getattr(part, "mode", None) == "r" and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)


def _accumulate(sums: np.ndarray, x: np.ndarray, cluster: np.ndarray) -> None:
    """sums[c] += the rows of x in cluster c, one reduceat over the chunk's runs of equal cluster."""
    if len(cluster) > 1 and (np.diff(cluster) < 0).any():
        o = np.argsort(cluster, kind="stable")
        x, cluster = x[o], cluster[o]
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    sums[cluster[starts]] += np.add.reduceat(x, starts, axis=0)


def _cluster_table(lat, lon, cell, cluster, prototypes: np.ndarray) -> ClusterTable:
    """The cluster table with prototypes summed chunk by chunk: `from_members` on zero-width
    embeddings computes the centres, cells and sizes only (no (n, d) array)."""
    t = ClusterTable.from_members(lat, lon, cell, cluster, np.zeros((len(cluster), 0), np.float32))
    return ClusterTable(t.frame, normalise(prototypes))


@dataclass
class Gallery:
    """The three parts of a gallery, consistent with each other."""

    index: GeoIndex
    frame: pd.DataFrame          # GALLERY_COLUMNS, one row per indexed image
    clusters: ClusterTable

    def nearest(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plain retrieval, the baseline every answer is measured against: (lat, lon, id) of the most
        similar gallery image anywhere (no head, no cells) for each of (n, d) embeddings."""
        q = np.ascontiguousarray(emb, dtype=np.float32)
        if len(q) == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
        _, ids = self.index.search(q, 1)
        pos = pd.Index(self.frame["id"].to_numpy(np.int64)).get_indexer(ids[:, 0])   # -1: no result (an empty index)
        lat = np.where(pos >= 0, self.frame["lat"].to_numpy(np.float64)[pos], np.nan)
        lon = np.where(pos >= 0, self.frame["lon"].to_numpy(np.float64)[pos], np.nan)
        return lat, lon, ids[:, 0].astype(np.int64)


def gallery_keys(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
    """What names a gallery photo outside pigeon: its `image`, the key it has in its data source (a manifest's
    `image` value, a WebDataset sample's key, an image-Parquet file's key column or FILE:ROW); the gallery id
    as text for photos indexed without one (`build_gallery` without `image`). `id` names it inside the index."""
    images = np.asarray(images, dtype=object)
    return np.where(images != "", images, np.asarray(ids, np.int64).astype(str).astype(object))


def _source_columns(frame: pd.DataFrame) -> list[str]:
    """The source columns a gallery frame holds (any of GALLERY_SOURCE_COLUMNS)."""
    return [c for c in GALLERY_SOURCE_COLUMNS if c in frame.columns]


def write_gallery_frame(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `gallery.parquet` (callers make it atomic): GALLERY_COLUMNS, then the source columns it holds."""
    frame[GALLERY_COLUMNS + _source_columns(frame)].to_parquet(str(path), index=False)


def read_gallery_frame(path: str | os.PathLike) -> pd.DataFrame:
    """Read `gallery.parquet`, refusing one without the expected columns; source columns (absent in galleries
    built before they were kept, or from sources without them) as compact Arrow text."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"gallery file {path} does not exist; build it with `pigeon build-index`")
    names = pq.read_schema(str(path)).names
    src = [c for c in GALLERY_SOURCE_COLUMNS if c in names]
    df = pd.read_parquet(str(path), columns=[c for c in names if c not in src])
    missing = [c for c in GALLERY_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"gallery file {path} lacks columns {missing}; rebuild it with `pigeon build-index`")
    if src:
        table = pq.read_table(str(path), columns=src)
        for c in src:
            df[c] = pd.Series(pd.arrays.ArrowStringArray(table[c].cast(pa.string())), index=df.index)
    return df


def _frame(ids, lat, lon, cell, cluster, image, source: pd.DataFrame | None = None) -> pd.DataFrame:
    n = len(ids)
    frame = pd.DataFrame({
        "id": np.asarray(ids, np.int64), "lat": np.asarray(lat, np.float64), "lon": np.asarray(lon, np.float64),
        "cell": np.asarray(cell, np.int64), "cluster": np.asarray(cluster, np.int64),
        "image": np.asarray(image if image is not None else [""] * n, dtype=object).astype(str),
    })
    if source is not None:
        if len(source) != n:
            raise UserError(f"gallery source columns list {len(source)} rows for {n} images; give one row per image")
        for c in _source_columns(source):
            frame[c] = source_text(source[c].reset_index(drop=True))
    return frame


def _check(emb, ids, lat, lon, cell) -> None:
    n = len(emb)
    if not (len(ids) == len(lat) == len(lon) == len(cell) == n):
        raise UserError(f"gallery arrays differ in length (emb {n}, ids {len(ids)}, lat {len(lat)}, lon {len(lon)}, cell {len(cell)}); give one value per image")
    if n and (np.min(cell) < 0):
        raise UserError("gallery cells must be non-negative cell ids (GeoCells.cell_of)")


def _restat(frame: pd.DataFrame, index: GeoIndex, chunk: int = CHUNK) -> tuple[pd.DataFrame, ClusterTable]:
    """Renumber clusters 0..K-1 and recompute centres, prototypes and sizes from the index's vectors
    (read in storage order, chunk by chunk: float16 rows for ivfpq, never a float32 copy of them all)."""
    frame = frame.reset_index(drop=True).copy()
    _, frame["cluster"] = np.unique(frame["cluster"].to_numpy(np.int64), return_inverse=True)
    vid, vecs = index.vectors()
    fid = frame["id"].to_numpy(np.int64)
    order = np.argsort(fid)
    row_of = order[np.searchsorted(fid, vid, sorter=order)]       # frame row of each stored vector
    cl = frame["cluster"].to_numpy(np.int64)
    sums = np.zeros((int(cl.max()) + 1 if len(cl) else 0, index.dim), np.float32)
    for s in range(0, len(vid), chunk):
        _accumulate(sums, normalise(vecs[s:s + chunk]), cl[row_of[s:s + chunk]])
    table = _cluster_table(frame["lat"].to_numpy(), frame["lon"].to_numpy(), frame["cell"].to_numpy(), cl, sums)
    return frame, table


def _train_on_sample(index: GeoIndex, emb: Any) -> None:
    """Train an ivf/ivfpq index on a seeded sample of all rows (in cluster order, the first chunk would
    be a few cells only); the sample size and nlist come from `GeoIndex.plan_training`."""
    n = len(emb)
    want = index.plan_training(n)
    if want:
        rows = np.sort(np.random.default_rng(index.seed).choice(n, want, replace=False))
        index.train(_read_rows(emb, rows), n_total=n)


def _fill_in_cluster_order(emb: Any, ids: np.ndarray, cluster: np.ndarray, kind: Kind, chunk: int,
                           index_options: dict[str, Any] | None) -> tuple[GeoIndex, np.ndarray]:
    """A trained GeoIndex filled cluster by cluster, chunk by chunk, and each cluster's sum of
    normalised embeddings, from one read of the input (see `index_in_cluster_order`)."""
    ids = check_new_ids(ids)
    cluster = np.asarray(cluster, np.int64)
    index = GeoIndex(emb.shape[1], kind=kind, **(index_options or {}))
    _train_on_sample(index, emb)
    index.reserve(len(ids))
    order = np.argsort(cluster, kind="stable")
    sums = np.zeros((int(cluster.max()) + 1 if len(cluster) else 0, emb.shape[1]), np.float32)
    for s in range(0, len(order), int(chunk)):
        rows = order[s:s + int(chunk)]
        x = normalise(_read_rows(emb, rows))
        _accumulate(sums, x, cluster[rows])
        index.add(x, ids[rows], check_ids=False)  # all ids checked once above
    return index, sums


def index_in_cluster_order(emb: Any, ids: np.ndarray, cluster: np.ndarray, kind: Kind = "flat", *,
                           chunk: int = CHUNK, index_options: dict[str, Any] | None = None) -> GeoIndex:
    """A GeoIndex holding `emb` stored cluster by cluster, so each cluster's vectors are contiguous in
    FAISS memory: refinement reads a cluster's photos as one sequential block instead of scattered
    rows (at 1M photos, a third of the refinement time). Filled `chunk` rows at a time from any
    array-like (a memory map is never copied whole); ivf/ivfpq are first trained on a seeded sample
    of all rows. `index_options` go to `GeoIndex` (nlist, nprobe, pq_m, opq, train_sample, ...)."""
    return _fill_in_cluster_order(_as_rows(emb), ids, cluster, kind, chunk, index_options)[0]


def build_gallery(emb: Any, ids: np.ndarray, lat: np.ndarray, lon: np.ndarray, cell: np.ndarray,
                  image: np.ndarray | None = None, *, kind: Kind = "flat", progress: bool = False,
                  index_options: dict[str, Any] | None = None, chunk: int = CHUNK, source: pd.DataFrame | None = None,
                  **cluster_opts) -> Gallery:
    """Index embeddings, cluster the images inside their cells (OPTICS) and make the prototypes.

    `emb`: (n, d) ndarray, np.memmap (float16 is fine) or `StackedRows` of shards; read in chunks.
    `index_options` go to `GeoIndex` (e.g. {"nlist": 4096, "pq_m": 64, "opq": True} for ivfpq).
    `source`: the images' source columns (any of GALLERY_SOURCE_COLUMNS; one row per image), kept in the rows."""
    emb = _as_rows(emb)
    _check(emb, ids, lat, lon, cell)
    if len(emb) == 0:
        raise UserError("the gallery is empty; give at least one image with a location")
    cluster = cluster_points(lat, lon, cell, progress=progress, **cluster_opts)
    index, sums = _fill_in_cluster_order(emb, ids, cluster, kind, chunk, index_options)
    table = _cluster_table(lat, lon, cell, cluster, sums)
    return Gallery(index, _frame(ids, lat, lon, cell, cluster, image, source), table)


def append_gallery(g: Gallery, emb: np.ndarray, ids: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                   cell: np.ndarray, image: np.ndarray | None = None, source: pd.DataFrame | None = None) -> Gallery:
    """Add images without re-clustering: each joins the nearest existing cluster of its cell; images in
    cells without clusters form one new cluster per cell. Prototypes and centres are recomputed.
    `emb` may be any (n, d) array-like (see `build_gallery`); it is added in chunks. `source`: as in
    `build_gallery` (a column only the old or only the new images have is <NA> for the others)."""
    emb = _as_rows(emb)
    _check(emb, ids, lat, lon, cell)
    if len(emb) == 0:
        return g
    ids = check_new_ids(ids, g.index.ids())
    for s in range(0, len(ids), CHUNK):
        g.index.add(_read_rows(emb, np.arange(s, min(s + CHUNK, len(ids)))), ids[s:s + CHUNK], check_ids=False)
    cl = assign_to_existing(lat, lon, cell, g.clusters.frame)
    new = cl < 0
    if new.any():
        _, inv = np.unique(np.asarray(cell, np.int64)[new], return_inverse=True)
        cl[new] = len(g.clusters) + inv
    frame = pd.concat([g.frame, _frame(ids, lat, lon, cell, cl, image, source)], ignore_index=True)
    for c in _source_columns(frame):
        frame[c] = source_text(frame[c])
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
