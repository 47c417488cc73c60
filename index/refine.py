"""PIGEON's in-cell refinement, vectorised over a batch of queries.

For each query: the top-k cells of the head's probabilities -> in each candidate cell the nearest
cluster prototype (Euclidean distance between normalised embeddings, PIGEON's definition) ->
score = cell probability x softmax over the candidates of (-distance / T) -> the best cluster ->
its nearest gallery image(s) -> lat/lon. A guard (PIGEON's `max_refinement`, 1000 km) cancels a
switch to another cell that lands more than `max_refinement_km` from the top cell's centre: the top
cell's own best cluster answers instead, and if even that is too far, the top cell's centre.

PIGEON writes this as a per-sample Python loop of `torch.cdist` over each candidate cell's
prototypes and images. Here every step is one gather over CSR offsets (clusters sorted by cell,
images sorted by cluster and by cell) plus a row-wise dot product and a segmented arg-max, for
the whole batch at once; the only Python loop is over fixed-size chunks of gathered rows, which
bounds memory. bench/index.py measures the speed-up against the loop written PIGEON's way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from geocells.errors import UserError
from geocells.sphere import from_xyz, haversine_km, to_xyz

from .clusters import ClusterTable
from .gallery import normalise

Mode = Literal["none", "cluster", "nn", "cluster+nn"]
MODES: tuple[str, ...] = ("none", "cluster", "nn", "cluster+nn")
TEMPERATURE = {"streetview": 1.6, "flickr": 0.6}  # PIGEON's softmax temperatures
_CHUNK_ROWS = 1 << 17  # gathered rows per chunk: bounds memory at ~chunk x dim x 8 bytes


@dataclass
class RefineResult:
    """Per query: the answer, where it came from, and the neighbours it used (-1 / nan where none)."""

    lat: np.ndarray             # (B,) float64
    lon: np.ndarray             # (B,) float64
    cell: np.ndarray            # (B,) int64, the cell of the answer
    cluster_id: np.ndarray      # (B,) int64, -1 when no cluster was used
    moved_km: np.ndarray        # (B,) float64, distance from the top cell's centre
    neighbour_ids: np.ndarray   # (B, m) int64 gallery ids, best first, -1 padded
    neighbour_sims: np.ndarray  # (B, m) float32 cosine similarities, nan padded
    mode: np.ndarray            # (B,) str: the mode actually used ("none" after a fallback)


def _csr(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): rows sorted by key and where each key's run starts (length n_keys + 1)."""
    order = np.argsort(keys, kind="stable")
    offs = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_keys), out=offs[1:])
    return order, offs


def _expand(seg_start: np.ndarray, seg_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments [start, start+len): (segment index per element, element position)."""
    seg = np.repeat(np.arange(len(seg_len)), seg_len)
    base = np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
    pos = np.repeat(seg_start, seg_len) + (np.arange(len(seg)) - base)
    return seg, pos


def _rowdot(q: np.ndarray, qi: np.ndarray, v: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """sims[j] = q[qi[j]] . v[vi[j]], in chunks so the gathered rows never exceed _CHUNK_ROWS."""
    out = np.empty(len(qi), dtype=np.float32)
    for s in range(0, len(qi), _CHUNK_ROWS):
        e = s + _CHUNK_ROWS
        out[s:e] = np.einsum("ij,ij->i", q[qi[s:e]], v[vi[s:e]])
    return out


def _segment_topm(seg: np.ndarray, score: np.ndarray, n_seg: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per segment the indices (into `score`) of its `m` best elements, best first: (n_seg, m), -1 padded."""
    out = np.full((n_seg, m), -1, dtype=np.int64)
    if len(seg) == 0:
        return out, np.zeros(0, np.int64)
    o = np.lexsort((-score, seg))
    s = seg[o]
    start = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    rank = np.arange(len(s)) - np.repeat(start, np.diff(np.append(start, len(s))))
    keep = rank < m
    out[s[keep], rank[keep]] = o[keep]
    return out, o


class Refiner:
    """Everything refinement needs, laid out for vectorised gathers.

    cell_centres: (C, 2) [lat, lon] of the cells (the head's classes, row i = cell i).
    clusters: the in-cell clusters (ClusterTable, row i = cluster i).
    gallery: frame with id, lat, lon, cell, cluster (gallery.parquet).
    vector_ids, vectors: the gallery embeddings and their ids, e.g. `GeoIndex.vectors()` (a view of
    the FAISS storage: no copy for flat/hnsw).
    """

    def __init__(self, cell_centres: np.ndarray, clusters: ClusterTable, gallery: pd.DataFrame,
                 vector_ids: np.ndarray, vectors: np.ndarray):
        self.centres = np.asarray(cell_centres, dtype=np.float64).reshape(-1, 2)
        n_cells = len(self.centres)
        self.n_cells = n_cells
        self.vectors = vectors
        vector_ids = np.asarray(vector_ids, np.int64)
        if len(vector_ids) != len(gallery):
            raise UserError(f"the index holds {len(vector_ids)} vectors but gallery.parquet lists {len(gallery)} images; rebuild the index with `pigeon build-index`")
        gid = gallery["id"].to_numpy(np.int64)
        srt = np.argsort(gid)
        at = np.searchsorted(gid, vector_ids, sorter=srt).clip(0, max(len(gid) - 1, 0))
        row = srt[at] if len(gid) else at
        if len(gid) and (gid[row] != vector_ids).any():
            raise UserError("gallery.parquet and index.faiss list different image ids; rebuild the index with `pigeon build-index`")
        # gallery arrays in vector (storage) order: position p describes vectors[p]
        self.g_id = vector_ids
        self.g_lat = gallery["lat"].to_numpy(np.float64)[row]
        self.g_lon = gallery["lon"].to_numpy(np.float64)[row]
        self.g_cell = gallery["cell"].to_numpy(np.int64)[row]
        self.g_cluster = gallery["cluster"].to_numpy(np.int64)[row]
        if len(self.g_cell) and (self.g_cell.max() >= n_cells or self.g_cell.min() < 0):
            raise UserError(f"gallery.parquet names cells outside 0..{n_cells - 1}; it was built on other cells: rebuild it")
        k = len(clusters)
        if len(self.g_cluster) and (self.g_cluster.max() >= k or self.g_cluster.min() < 0):
            raise UserError("gallery.parquet names clusters that clusters.parquet lacks; rebuild the index")
        self.prototypes = np.ascontiguousarray(clusters.prototypes, dtype=np.float32)
        self.c_cell = clusters.frame["cell"].to_numpy(np.int64)
        self.c_lat = clusters.frame["lat"].to_numpy(np.float64)
        self.c_lon = clusters.frame["lon"].to_numpy(np.float64)
        if len(self.c_cell) and self.c_cell.max() >= n_cells:
            raise UserError(f"clusters.parquet names cells outside 0..{n_cells - 1}; it was built on other cells: rebuild it")
        self.c_order, self.c_offs = _csr(self.c_cell, n_cells)                   # clusters by cell
        self.gk_order, self.gk_offs = _csr(self.g_cluster, k)                    # images by cluster
        self.gc_order, self.gc_offs = _csr(self.g_cell, n_cells)                 # images by cell

    @classmethod
    def from_index(cls, cell_centres: np.ndarray, clusters: ClusterTable, gallery: pd.DataFrame, index) -> "Refiner":
        """Build from a `GeoIndex` (its vectors are viewed, not copied, for flat and hnsw)."""
        ids, vecs = index.vectors()
        return cls(cell_centres, clusters, gallery, ids, vecs)

    # -- the steps ---------------------------------------------------------------------------
    def _best_clusters(self, q: np.ndarray, top_cells: np.ndarray, top_p: np.ndarray, temperature: float):
        """Nearest prototype in each candidate cell, then PIGEON's score; returns (cluster, cell) per query."""
        b, k = top_cells.shape
        cnt = (self.c_offs[top_cells + 1] - self.c_offs[top_cells]).reshape(-1)   # clusters per (query, cell)
        seg, pos = _expand(self.c_offs[top_cells].reshape(-1), cnt)
        cand = self.c_order[pos]
        sims = _rowdot(q, seg // k, self.prototypes, cand)
        best, _ = _segment_topm(seg, sims, b * k, 1)
        best = best[:, 0]
        has = best >= 0
        best_sim = np.full(b * k, -np.inf, np.float64)
        best_sim[has] = sims[best[has]]
        best_cluster = np.full(b * k, -1, np.int64)
        best_cluster[has] = cand[best[has]]
        dist = np.sqrt(np.clip(2.0 - 2.0 * best_sim, 0.0, None)).reshape(b, k)    # inf where the cell has no cluster
        logits = -dist / float(temperature)
        logits -= np.max(np.where(np.isfinite(logits), logits, -np.inf), axis=1, keepdims=True, initial=-1e300)
        w = np.where(np.isfinite(logits), np.exp(logits), 0.0)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        score = top_p * w
        j = np.argmax(score, axis=1)
        best_cluster = best_cluster.reshape(b, k)
        return best_cluster[np.arange(b), j], top_cells[np.arange(b), j], best_cluster[:, 0]

    def _neighbours(self, q: np.ndarray, offs: np.ndarray, order: np.ndarray, group: np.ndarray, m: int):
        """The `m` most similar gallery images of each query inside its group (a cluster or a cell; -1 = none)."""
        b = len(q)
        g = np.where(group >= 0, group, 0)
        cnt = np.where(group >= 0, offs[g + 1] - offs[g], 0)
        seg, pos = _expand(offs[g], cnt)
        members = order[pos]
        sims = _rowdot(q, seg, self.vectors, members)
        top, _ = _segment_topm(seg, sims, b, m)
        ok = top >= 0
        if not ok.any():
            return np.full((b, m), -1, np.int64), np.full((b, m), np.nan, np.float32)
        nb_pos = np.where(ok, members[np.where(ok, top, 0)], -1)
        nb_sim = np.where(ok, sims[np.where(ok, top, 0)], np.nan).astype(np.float32)
        return nb_pos, nb_sim

    # -- public ------------------------------------------------------------------------------
    def refine(self, query_emb: np.ndarray, cell_probs: np.ndarray, *, mode: Mode = "cluster+nn", top_k: int = 5,
               temperature: float = TEMPERATURE["streetview"], neighbours: int = 5, average: int = 1,
               max_refinement_km: float | None = 1000.0) -> RefineResult:
        """Refine a batch: query embeddings (B, D) and the head's cell probabilities (B, C).

        mode: "none" (top cell's centre), "cluster" (best cluster's centre), "nn" (nearest gallery
        image in the top cell), "cluster+nn" (nearest image(s) in the best cluster; the default).
        neighbours: how many nearest images to report; average: how many of them give the answer
        (1 = the nearest image; more = their similarity-weighted spherical mean).
        max_refinement_km: PIGEON's guard. A winning cluster in another cell that puts the answer
        farther than this from the top cell's centre is cancelled and the top cell's own best cluster
        answers; if even that is too far, the top cell's centre answers. None = no guard.
        """
        if mode not in MODES:
            raise UserError(f"refinement mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        p = np.asarray(cell_probs)
        if p.dtype not in (np.float32, np.float64):
            p = p.astype(np.float64)
        if p.ndim != 2 or p.shape[1] != self.n_cells:
            raise UserError(f"cell probabilities must have shape (batch, {self.n_cells}) for these cells, got {p.shape}; use the head trained on this bundle's cells")
        q = normalise(query_emb)
        if len(q) != len(p):
            raise UserError(f"{len(q)} query embeddings but {len(p)} rows of cell probabilities; give one of each per image")
        if len(self.prototypes) and q.shape[1] != self.prototypes.shape[1]:
            raise UserError(f"query embeddings are {q.shape[1]}-d but the gallery is {self.prototypes.shape[1]}-d; use the bundle's backbone")
        neighbours = max(int(neighbours), int(average), 1)
        b = len(q)
        k = max(1, min(int(top_k), self.n_cells))
        c = self.n_cells
        top = np.argpartition(p, c - k, axis=1)[:, c - k:] if k < c else np.tile(np.arange(c), (b, 1))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(p, top, 1), axis=1, kind="stable"), 1)
        top_p = np.take_along_axis(p, top, 1).astype(np.float64)
        c0 = top[:, 0]
        lat, lon = self.centres[c0, 0].copy(), self.centres[c0, 1].copy()
        cell = c0.copy()
        cluster = np.full(b, -1, np.int64)
        used = np.full(b, "none", dtype=object)
        nb_pos = np.full((b, neighbours), -1, np.int64)
        nb_sim = np.full((b, neighbours), np.nan, np.float32)

        def place(rows: np.ndarray, chosen: np.ndarray) -> None:
            """Answer for `rows` from their chosen cluster (cluster mode: its centre; cluster+nn: its images)."""
            ok = chosen >= 0
            if mode == "cluster":
                r = rows[ok]
                lat[r], lon[r] = self.c_lat[chosen[ok]], self.c_lon[chosen[ok]]
                used[r] = mode
            else:
                pos, sim = self._neighbours(q[rows], self.gk_offs, self.gk_order, chosen, neighbours)
                nb_pos[rows], nb_sim[rows] = pos, sim
                ok &= pos[:, 0] >= 0
                used[rows[ok]] = mode
            r = rows[ok]
            cluster[r], cell[r] = chosen[ok], self.c_cell[chosen[ok]]

        everyone = np.arange(b)
        if mode in ("cluster", "cluster+nn") and len(self.prototypes):
            chosen, _, top_cell_best = self._best_clusters(q, top, top_p, temperature)
            place(everyone, chosen)
        elif mode == "nn" and len(self.g_id):
            has = (self.gc_offs[c0 + 1] - self.gc_offs[c0]) > 0
            nb_pos, nb_sim = self._neighbours(q, self.gc_offs, self.gc_order, np.where(has, c0, -1), neighbours)
            used[has & (nb_pos[:, 0] >= 0)] = "nn"

        def locate(rows: np.ndarray) -> None:
            """lat/lon of `rows` from their neighbours: the nearest, or the weighted mean of `average`."""
            rows = rows[(used[rows] != "none") & (nb_pos[rows, 0] >= 0)]
            a = nb_pos[rows, :average]
            w = np.where(a >= 0, np.clip(np.nan_to_num(nb_sim[rows, :average], nan=0.0), 1e-6, None), 0.0)
            xyz = (to_xyz(self.g_lat[np.maximum(a, 0)], self.g_lon[np.maximum(a, 0)]) * w[..., None]).sum(axis=1)
            lat[rows], lon[rows] = from_xyz(xyz)

        if mode in ("nn", "cluster+nn"):
            locate(everyone)
        moved = haversine_km(self.centres[c0, 0], self.centres[c0, 1], lat, lon)
        if max_refinement_km is not None:
            limit = float(max_refinement_km)
            back = np.flatnonzero((moved > limit) & (cell != c0))
            if len(back) and mode in ("cluster", "cluster+nn"):
                # PIGEON's cancellation: a switch to another cell that moves too far is undone, and the
                # top cell's own best cluster answers instead
                used[back], nb_pos[back], nb_sim[back] = "none", -1, np.nan
                place(back, top_cell_best[back])
                if mode == "cluster+nn":
                    locate(back)
                moved[back] = haversine_km(self.centres[c0[back], 0], self.centres[c0[back], 1], lat[back], lon[back])
            back = moved > limit  # still too far (even inside the top cell): the top cell's centre
            used[back] = "none"
        none = used == "none"
        lat[none], lon[none] = self.centres[c0[none], 0], self.centres[c0[none], 1]
        cell[none], cluster[none], moved[none] = c0[none], -1, 0.0
        nb_pos[none], nb_sim[none] = -1, np.nan
        nb_ids = np.where(nb_pos >= 0, self.g_id[np.maximum(nb_pos, 0)] if len(self.g_id) else -1, -1)
        return RefineResult(lat=lat, lon=lon, cell=cell, cluster_id=cluster, moved_km=moved,
                            neighbour_ids=nb_ids.astype(np.int64), neighbour_sims=nb_sim, mode=used)
