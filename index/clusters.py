"""In-cell location clusters (PIGEON's refinement step): OPTICS on the sphere inside each geocell.

Each cluster is a group of gallery images taken close together inside one cell; its prototype is
the mean of their L2-normalised embeddings (re-normalised) and its centre their spherical mean.
Refinement compares a query with the prototypes of its top cells to pick a place inside a cell.

Choices (documented in docs/index.md):
- OPTICS runs on unit-sphere xyz with Euclidean (chord) distance, which orders pairs exactly like
  haversine and is faster; `min_samples` grows with the cell: clip(n // 20, 3, 50), `xi` = 0.05.
- Cells with fewer than `min_optics` points (default 10) are one cluster.
- Cells with more than `max_optics` points (default 3000) run OPTICS on a seeded random sample.
- Noise (and unsampled points) joins the nearest cluster of its cell by distance to the
  cluster's centre; a cell where OPTICS finds no cluster is one cluster. Nothing is dropped, so
  every gallery image belongs to exactly one cluster and singletons never dominate the prototypes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from pigeon.core.errors import UserError
from pigeon.core.progress import progress as progress_bar
from pigeon.core.sphere import from_xyz, to_xyz
from pigeon.geocells.optics import optics_xi_labels

CLUSTER_COLUMNS = ["cluster_id", "cell", "lat", "lon", "size"]


def optics_params(n: int) -> tuple[int, float]:
    """(min_samples, xi) for a cell of `n` points: PIGEON-style parameters that scale with the cell."""
    return int(np.clip(n // 20, 3, 50)), 0.05


def optics_labels(x: np.ndarray, min_samples: int, xi: float) -> np.ndarray:
    """OPTICS (xi extraction) labels, -1 for noise: the same result as `sklearn.cluster.OPTICS`
    with max_eps=inf and min_cluster_size=min_samples. One implementation for the whole project:
    geocells' compiled ordering (numba) with every point weighted 1, then sklearn's own
    `cluster_optics_xi`; ~1-2% of sklearn's time on the few hundred points of one cell."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise UserError(f"OPTICS points must be (n, 3) unit-sphere xyz, got shape {x.shape}; convert lat/lon with pigeon.core.sphere.to_xyz")
    return optics_xi_labels(x, np.ones(len(x)), int(min_samples), float(xi))


def _cluster_cell(xyz: np.ndarray, *, min_optics: int, max_optics: int, seed: int) -> np.ndarray:
    """Local cluster labels 0..m-1 for the points of one cell (no noise left)."""
    n = len(xyz)
    if n < min_optics:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sample = np.arange(n) if n <= max_optics else np.sort(rng.choice(n, max_optics, replace=False))
    ms, xi = optics_params(len(sample))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points (many photos at one spot) are fine
        lab = optics_labels(xyz[sample], ms, xi)
    if lab.max() < 0:
        return np.zeros(n, dtype=np.int64)
    good = lab >= 0
    # centres of the found clusters, then every point (noise, unsampled) joins the nearest one
    m = int(lab.max()) + 1
    cen = np.zeros((m, 3))
    np.add.at(cen, lab[good], xyz[sample][good])
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    out = np.argmax(xyz @ cen.T, axis=1).astype(np.int64)
    out[sample[good]] = lab[good]
    # a cluster left empty by the reassignment is dropped by renumbering
    _, out = np.unique(out, return_inverse=True)
    return out.astype(np.int64)


def cluster_points(lat: np.ndarray, lon: np.ndarray, cell: np.ndarray, *, min_optics: int = 10,
                   max_optics: int = 3000, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Global cluster ids (int64, 0..K-1, numbered cell by cell) for gallery points with cells.

    The loop is over cells (build time, not a query path); each cell's OPTICS is independent.
    """
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    cell = np.asarray(cell, np.int64)
    if not (len(lat) == len(lon) == len(cell)):
        raise UserError(f"lat, lon and cell must have one value per image (got {len(lat)}, {len(lon)}, {len(cell)})")
    xyz = to_xyz(lat, lon)
    order = np.argsort(cell, kind="stable")
    cells, starts, counts = np.unique(cell[order], return_index=True, return_counts=True)
    out = np.empty(len(cell), dtype=np.int64)
    nxt = 0
    it = range(len(cells))
    if progress:
        it = progress_bar(it, desc="clusters", unit="cell", leave=False)
    for i in it:
        idx = order[starts[i]:starts[i] + counts[i]]
        local = _cluster_cell(xyz[idx], min_optics=min_optics, max_optics=max_optics, seed=seed + int(cells[i]))
        out[idx] = local + nxt
        nxt += int(local.max()) + 1
    return out


@dataclass
class ClusterTable:
    """Clusters: `frame` (cluster_id, cell, lat, lon, size; row i has cluster_id i) and `prototypes` (K, D) float32."""

    frame: pd.DataFrame
    prototypes: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @classmethod
    def from_members(cls, lat: np.ndarray, lon: np.ndarray, cell: np.ndarray, cluster: np.ndarray,
                     emb: np.ndarray) -> "ClusterTable":
        """Centres (spherical mean), prototypes (normalised mean of normalised embeddings) and sizes
        from the members; `cluster` must be 0..K-1 with every cluster holding points of one cell."""
        cluster = np.asarray(cluster, np.int64)
        cell = np.asarray(cell, np.int64)
        n = len(cluster)
        k = int(cluster.max()) + 1 if n else 0
        size = np.bincount(cluster, minlength=k)
        if n and (size == 0).any():
            raise UserError("cluster ids must run 0..K-1 without gaps; renumber them")
        # one sparse (K, N) membership matrix does every per-cluster sum without a Python loop
        m = sparse.csr_matrix((np.ones(n, np.float32), (cluster, np.arange(n))), shape=(k, n))
        xyz = np.asarray(m @ to_xyz(lat, lon))
        clat, clon = from_xyz(xyz) if k else (np.zeros(0), np.zeros(0))
        e = np.asarray(emb, np.float32)
        nrm = np.linalg.norm(e, axis=1, keepdims=True)
        proto = np.asarray(m @ np.divide(e, nrm, out=np.zeros_like(e), where=nrm > 0), dtype=np.float32)
        pn = np.linalg.norm(proto, axis=1, keepdims=True)
        np.divide(proto, pn, out=proto, where=pn > 0)
        ccell = np.zeros(k, np.int64)
        ccell[cluster] = cell
        if n and (ccell[cluster] != cell).any():
            raise UserError("a cluster holds images of more than one cell; cluster inside cells only")
        frame = pd.DataFrame({"cluster_id": np.arange(k, dtype=np.int64), "cell": ccell, "lat": clat,
                              "lon": clon, "size": size.astype(np.int64)})
        return cls(frame, np.ascontiguousarray(proto, dtype=np.float32))

    # -- persistence: one parquet, prototypes in a fixed-size list column ---------------------
    def write(self, path: str | os.PathLike) -> None:
        """Write `clusters.parquet` to `path` (callers make it atomic: Bundle.write_part / atomic_path)."""
        k, d = self.prototypes.shape
        tab = pa.Table.from_pandas(self.frame[CLUSTER_COLUMNS], preserve_index=False)
        flat = pa.array(np.ascontiguousarray(self.prototypes, np.float32).reshape(-1))
        tab = tab.append_column("prototype", pa.FixedSizeListArray.from_arrays(flat, d))
        pq.write_table(tab, str(path))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ClusterTable":
        """Read `clusters.parquet` written by `write`."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"clusters file {path} does not exist; build it with `pigeon build-index`")
        tab = pq.read_table(str(path))
        missing = [c for c in CLUSTER_COLUMNS + ["prototype"] if c not in tab.column_names]
        if missing:
            raise UserError(f"clusters file {path} lacks columns {missing}; rebuild it with `pigeon build-index`")
        col = tab.column("prototype").combine_chunks()
        d = col.type.list_size
        proto = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)
        frame = tab.select(CLUSTER_COLUMNS).to_pandas()
        return cls(frame, np.ascontiguousarray(proto))


def assign_to_existing(lat: np.ndarray, lon: np.ndarray, cell: np.ndarray, clusters: pd.DataFrame) -> np.ndarray:
    """For `--append`: each new point joins the nearest existing cluster (by centre) of its own cell;
    -1 where its cell has no cluster yet. Vectorised with a CSR gather over the clusters of each cell."""
    cell = np.asarray(cell, np.int64)
    out = np.full(len(cell), -1, np.int64)
    if len(clusters) == 0 or len(cell) == 0:
        return out
    ccell = clusters["cell"].to_numpy(np.int64)
    order = np.argsort(ccell, kind="stable")
    ncell = max(int(ccell.max()), int(cell.max())) + 1
    counts = np.bincount(ccell, minlength=ncell)
    offs = np.concatenate([[0], np.cumsum(counts)])
    cnt = counts[cell]
    has = np.flatnonzero(cnt > 0)
    if len(has) == 0:
        return out
    rep = np.repeat(has, cnt[has])                                   # point index per candidate
    start = np.repeat(offs[cell[has]], cnt[has])
    within = np.arange(len(rep)) - np.repeat(np.cumsum(cnt[has]) - cnt[has], cnt[has])
    cand = order[start + within]                                     # candidate cluster rows
    p = to_xyz(np.asarray(lat)[rep], np.asarray(lon)[rep])
    c = to_xyz(clusters["lat"].to_numpy()[cand], clusters["lon"].to_numpy()[cand])
    sim = np.einsum("ij,ij->i", p, c)
    # per-point argmax: sort by (point, -sim) and take the first of each point's run
    o = np.lexsort((-sim, rep))
    first = np.concatenate([[True], rep[o][1:] != rep[o][:-1]])
    out[rep[o][first]] = clusters["cluster_id"].to_numpy(np.int64)[cand[o][first]]
    return out
