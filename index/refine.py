"""PIGEON's in-cell refinement, compiled, over a batch of queries.

For each query: the top-k cells of the head's probabilities -> in each candidate cell the nearest
cluster prototype (Euclidean distance between normalised embeddings, PIGEON's definition) ->
score = cell probability x softmax over the candidates of (-distance / T) -> the best cluster ->
its nearest gallery image(s) -> lat/lon. A guard (PIGEON's `max_refinement`, 1000 km) cancels a
switch to another cell that lands more than `max_refinement_km` from the top cell's centre: the top
cell's own best cluster answers instead, and if even that is too far, the top cell's centre.

PIGEON writes this as a per-sample Python loop of `torch.cdist` over each candidate cell's
prototypes and images. Here the whole pipeline is one numba kernel over the batch: a single pass
over each query's probabilities keeps the top k (no argpartition of all cells), then dot products
against the candidate cells' prototypes and the winning cluster's images, found through CSR
offsets (clusters sorted by cell, images sorted by cluster and by cell) straight in the FAISS
storage (no copy). The work per query is a few dozen 512-d dot products, so at batch 1 the cost is
the Python call itself. bench/index.py measures the speed-up against the loop written PIGEON's way.
The gallery rows may be float32 (flat/hnsw/ivf) or float16 (ivfpq's store, possibly memory-mapped):
numba has no float16 arrays, so float16 rows go in as their uint16 bits and are widened in the dot
product by LLVM's `fpext half` (one F16C instruction per 8 values on x86; exact).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from pigeon.core.errors import FieldError, UserError
from pigeon.core.provenance import source_text
from pigeon.core.sphere import EARTH_RADIUS_KM

from .build import GALLERY_SOURCE_COLUMNS, Gallery, gallery_keys
from .clusters import ClusterTable

Mode = Literal["none", "cluster", "nn", "cluster+nn"]
MODES: tuple[str, ...] = ("none", "cluster", "nn", "cluster+nn")
_MODE_NAMES = np.array(MODES, dtype=object)  # kernel mode codes 0..3 -> names
TEMPERATURE = {"streetview": 1.6, "flickr": 0.6}  # PIGEON's softmax temperatures
DEFAULT_MODE = "cluster+nn"  # PIGEON's


def check_mode(mode: Any) -> str:
    """`mode` when it is one of MODES; else a `FieldError` (field `mode`) naming the choices."""
    if mode not in MODES:
        raise FieldError("mode", mode, f"unknown refinement mode; use one of {', '.join(MODES)}")
    return mode


@dataclass(frozen=True)
class RefineConfig:
    """How answers are refined inside the top cells: the one place for PIGEON's defaults.

    mode: "cluster+nn" (PIGEON's), "cluster", "nn" or "none" (the top cell's centre); None means the
    mode `pigeon build-index` validated for the bundle, else "cluster+nn" (see `resolve`).
    max_refinement_km: PIGEON's guard; inf (or None) turns it off.
    """

    mode: str | None = None
    temperature: float = TEMPERATURE["streetview"]
    max_refinement_km: float = 1000.0
    neighbours: int = 5
    average: int = 1
    top_k: int = 5

    def __post_init__(self) -> None:
        """Every refinement option is checked here, once (`Refiner.refine` builds one of these too); a bad
        one raises a `FieldError` naming the field, which the CLI and the settings map to a flag."""
        if self.mode is not None:
            check_mode(self.mode)
        try:
            km = math.inf if self.max_refinement_km is None else float(self.max_refinement_km)
        except (TypeError, ValueError):
            km = math.nan
        if not km > 0:
            raise FieldError("max_refinement_km", self.max_refinement_km, "give a distance > 0 km (inf turns the guard off)")
        object.__setattr__(self, "max_refinement_km", km)
        if self.temperature is None or not float(self.temperature) > 0:
            raise FieldError("temperature", self.temperature, "the refinement temperature must be > 0 (PIGEON: 1.6 street view, 0.6 Flickr)")
        for name in ("neighbours", "average", "top_k"):
            if int(getattr(self, name)) < 1:
                raise FieldError(name, getattr(self, name), "must be 1 or more")

    @classmethod
    def from_options(cls, mode: str | None = None, max_refinement_km: float | None = None, **kw: Any) -> "RefineConfig":
        """A config from CLI / settings values where None means "not given" (the default applies)."""
        given = {k: v for k, v in dict(mode=mode, max_refinement_km=max_refinement_km, **kw).items() if v is not None}
        return cls(**given)

    def resolve(self, recorded_mode: str | None) -> "RefineConfig":
        """This config with `mode` filled in: its own, else the bundle's recorded mode, else PIGEON's."""
        if self.mode is not None:
            return self
        return dataclasses.replace(self, mode=recorded_mode if recorded_mode in MODES else DEFAULT_MODE)

    @property
    def guard_km(self) -> float | None:
        """The guard as `Refiner.refine` takes it (None: no guard)."""
        return None if math.isinf(self.max_refinement_km) else self.max_refinement_km

    def refine_kwargs(self) -> dict[str, Any]:
        """The options as `Refiner.refine` keywords (all but the mode)."""
        return dict(top_k=self.top_k, temperature=self.temperature, max_refinement_km=self.guard_km,
                    neighbours=self.neighbours, average=self.average)


_DEFAULTS = RefineConfig()


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
    neighbour_rows: np.ndarray | None = None  # (B, m) int64 rows of the gallery frame, -1 padded


def _csr(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): rows sorted by key and where each key's run starts (length n_keys + 1)."""
    order = np.argsort(keys, kind="stable")
    offs = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_keys), out=offs[1:])
    return order, offs


def _csr_among(order: np.ndarray, offs: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_csr`'s (order, offsets) over only the items where `keep` (indexed by item) is True."""
    k = keep[order]
    kept = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(k, out=kept[1:])
    return order[k], kept[offs]


# -- the compiled kernel --------------------------------------------------------------------------
@intrinsic
def _half_bits(typingctx, bits):  # pragma: no cover - compiled
    """float32 value of IEEE half-precision bits (uint16): bitcast to LLVM `half`, then `fpext`."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


def _wide(x):  # pragma: no cover - replaced by the overload in compiled code
    """An element of a gallery row or query as float64 (uint16 = float16 bits)."""
    raise NotImplementedError


@overload(_wide, inline="always")
def _wide_impl(x):  # pragma: no cover - compiled
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: np.float64(_half_bits(x))
    return lambda x: np.float64(x)


# fastmath only inside the dot product: lets LLVM vectorise the float64 reduction of float32 (or
# float16-widened) rows.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _dot(a, b):  # pragma: no cover - compiled
    s = 0.0
    for t in range(a.shape[0]):
        s += _wide(a[t]) * _wide(b[t])
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _any_above(row, start, stop, thr):  # pragma: no cover - compiled
    """Whether any of row[start:stop] exceeds thr: a compare-and-count LLVM vectorises (a max does not),
    so the top-k scan skips, at ~0.2 ns an entry, the blocks that cannot enter the top k."""
    n = 0
    for t in range(start, stop):
        n += row[t] > thr
    return n > 0


@njit(cache=True, nogil=True)
def _haversine(lat1, lon1, lat2, lon2):  # pragma: no cover - compiled
    f1, f2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((f2 - f1) / 2.0) ** 2 + np.cos(f1) * np.cos(f2) * np.sin(np.radians(lon2 - lon1) / 2.0) ** 2
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(min(max(a, 0.0), 1.0)))


@njit(cache=True, nogil=True)
def _nearest(qv, offs, order, group, vectors, pos, sim):  # pragma: no cover - compiled
    """The len(pos) most similar rows of `vectors` among order[offs[group]:offs[group+1]], best
    first (ties: storage order), into pos/sim (-1 / nan padded). Returns how many were found."""
    m = pos.shape[0]
    pos[:] = -1
    sim[:] = np.nan
    found = 0
    for t in range(offs[group], offs[group + 1]):
        r = order[t]
        s = np.float32(_dot(qv, vectors[r]))
        if found == m and not s > sim[m - 1]:
            continue
        j = found if found < m else m - 1
        while j > 0 and s > sim[j - 1]:
            pos[j] = pos[j - 1]
            sim[j] = sim[j - 1]
            j -= 1
        pos[j] = r
        sim[j] = s
        if found < m:
            found += 1
    return found


@njit(cache=True, nogil=True)
def _locate(pos, sim, average, g_lat, g_lon):  # pragma: no cover - compiled
    """The nearest image's position, or the similarity-weighted spherical mean of the `average` nearest."""
    if average <= 1 or pos[1] < 0:
        return g_lat[pos[0]], g_lon[pos[0]]
    x = y = z = 0.0
    for j in range(min(average, pos.shape[0])):
        if pos[j] < 0:
            break
        w = max(np.float64(sim[j]), 1e-6) if not np.isnan(sim[j]) else 1e-6
        la, lo = np.radians(g_lat[pos[j]]), np.radians(g_lon[pos[j]])
        x += w * np.cos(la) * np.cos(lo)
        y += w * np.cos(la) * np.sin(lo)
        z += w * np.sin(la)
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


@njit(cache=True, nogil=True)
def _refine_kernel(q, p, k, temperature, mode, average, limit, centres, c_offs, c_order, prototypes, c_cell,
                   c_lat, c_lon, gk_offs, gk_order, gc_offs, gc_order, vectors, g_lat, g_lon, g_id, g_row,
                   lat, lon, cell, cluster, moved, nb_ids, nb_rows, nb_sim, used):  # pragma: no cover - compiled
    """Refine every query of the batch (raw embeddings, normalised here); writes the output arrays
    (lat ... used). Mode codes: 0 none, 1 cluster, 2 nn, 3 cluster+nn. `limit` = inf: no guard."""
    b, c = p.shape
    m = nb_sim.shape[1]
    qv = np.empty(q.shape[1], np.float32)
    pos = np.empty(m, np.int64)
    tc = np.empty(k, np.int64)
    tp = np.empty(k, np.float64)
    bc = np.empty(k, np.int64)
    dist = np.empty(k, np.float64)
    for i in range(b):
        nrm = np.sqrt(_dot(q[i], q[i]))
        for t in range(q.shape[1]):
            qv[t] = q[i, t] / nrm if nrm > 0 else q[i, t]
        # top k cells in one pass (descending; ties: lower cell id first)
        tp[:] = -np.inf
        tc[:] = -1
        row = p[i]
        for j0 in range(0, c, 128):
            j1 = min(j0 + 128, c)
            if tc[k - 1] >= 0 and not _any_above(row, j0, j1, row.dtype.type(tp[k - 1])):
                continue  # nothing in this block beats the current k-th: most blocks, once k are held
            for j in range(j0, j1):
                v = np.float64(row[j])
                if v > tp[k - 1] or tc[k - 1] < 0:
                    t = k - 1
                    while t > 0 and v > tp[t - 1]:
                        tp[t] = tp[t - 1]
                        tc[t] = tc[t - 1]
                        t -= 1
                    tp[t] = v
                    tc[t] = j
        c0 = tc[0]
        lat[i], lon[i] = centres[c0, 0], centres[c0, 1]
        cell[i], cluster[i], used[i] = c0, -1, 0
        pos[:] = -1
        nb_sim[i, :] = np.nan
        if mode == 2:
            if _nearest(qv, gc_offs, gc_order, c0, vectors, pos, nb_sim[i]) > 0:
                used[i] = 2
                lat[i], lon[i] = _locate(pos, nb_sim[i], average, g_lat, g_lon)
        elif mode != 0 and prototypes.shape[0] > 0:
            # nearest prototype per candidate cell, then P(cell) x softmax(-distance / T)
            top = -np.inf
            for j in range(k):
                bc[j] = -1
                best = -np.inf
                for t in range(c_offs[tc[j]], c_offs[tc[j] + 1]):
                    s = np.float64(np.float32(_dot(qv, prototypes[c_order[t]])))
                    if s > best:
                        best = s
                        bc[j] = c_order[t]
                dist[j] = np.sqrt(max(2.0 - 2.0 * best, 0.0)) if bc[j] >= 0 else np.inf
                if bc[j] >= 0:
                    top = max(top, -dist[j] / temperature)
            total = 0.0
            for j in range(k):
                dist[j] = np.exp(-dist[j] / temperature - top) if bc[j] >= 0 else 0.0
                total += dist[j]
            win, win_score = 0, -np.inf
            for j in range(k):
                sc = tp[j] * dist[j] / max(total, 1e-300)
                if sc > win_score:
                    win, win_score = j, sc
            for attempt in range(2):  # the winner; then, if the guard undoes it, the top cell's best
                chosen = bc[win] if attempt == 0 else bc[0]
                if chosen < 0:
                    break
                if mode == 1:
                    lat[i], lon[i] = c_lat[chosen], c_lon[chosen]
                    used[i] = 1
                elif _nearest(qv, gk_offs, gk_order, chosen, vectors, pos, nb_sim[i]) > 0:
                    lat[i], lon[i] = _locate(pos, nb_sim[i], average, g_lat, g_lon)
                    used[i] = 3
                else:
                    break
                cluster[i], cell[i] = chosen, c_cell[chosen]
                if cell[i] == c0 or not _haversine(centres[c0, 0], centres[c0, 1], lat[i], lon[i]) > limit:
                    break
                used[i] = 0  # PIGEON's cancellation: a far switch to another cell is undone
        if used[i] != 0:
            moved[i] = _haversine(centres[c0, 0], centres[c0, 1], lat[i], lon[i])
            if moved[i] > limit:  # still too far (even inside the top cell): the top cell's centre
                used[i] = 0
        if used[i] == 0:
            lat[i], lon[i] = centres[c0, 0], centres[c0, 1]
            cell[i], cluster[i], moved[i] = c0, -1, 0.0
            pos[:] = -1
            nb_sim[i, :] = np.nan
        for j in range(m):
            nb_ids[i, j] = g_id[pos[j]] if pos[j] >= 0 else -1
            nb_rows[i, j] = g_row[pos[j]] if pos[j] >= 0 else -1


class Refiner:
    """Everything refinement needs, laid out for vectorised gathers.

    cell_centres: (C, 2) [lat, lon] of the cells (the head's classes, row i = cell i).
    clusters: the in-cell clusters (ClusterTable, row i = cluster i).
    gallery: frame with id, lat, lon, cell, cluster (gallery.parquet).
    vector_ids, vectors: the gallery embeddings and their ids, e.g. `GeoIndex.vectors()` (a view of
    the FAISS storage: no copy for flat/hnsw, float16 and possibly memory-mapped for ivfpq). float16
    rows are read as they are (no float32 copy); anything else becomes C-contiguous float32.
    """

    def __init__(self, cell_centres: np.ndarray, clusters: ClusterTable, gallery: pd.DataFrame,
                 vector_ids: np.ndarray, vectors: np.ndarray):
        self.centres = np.ascontiguousarray(np.asarray(cell_centres, dtype=np.float64).reshape(-1, 2))
        n_cells = len(self.centres)
        self.n_cells = n_cells
        # the kernel reads rows straight from here: a FAISS view is already C-contiguous (no copy)
        self.vectors = _gallery_rows(vectors)
        self._rows = self.vectors.view(np.uint16) if self.vectors.dtype == np.float16 else self.vectors  # numba: no float16
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
        self.g_row = row.astype(np.int64)  # gallery-frame row of each stored vector
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

    def among(self, rows: np.ndarray) -> "Refiner":
        """This refiner over only the gallery photos where `rows` (bool per gallery-frame row) is True (an
        area of interest): cells and clusters scan only those, and a cluster with none left is skipped.
        The vectors and prototypes are shared, not copied."""
        keep = np.asarray(rows, bool)[self.g_row]          # in storage order
        out = copy.copy(self)
        out.gk_order, out.gk_offs = _csr_among(self.gk_order, self.gk_offs, keep)
        out.gc_order, out.gc_offs = _csr_among(self.gc_order, self.gc_offs, keep)
        out.c_order, out.c_offs = _csr_among(self.c_order, self.c_offs, np.diff(out.gk_offs) > 0)
        return out

    # -- public ------------------------------------------------------------------------------
    def refine(self, query_emb: np.ndarray, cell_probs: np.ndarray, *, mode: Mode = DEFAULT_MODE, top_k: int = _DEFAULTS.top_k,
               temperature: float = _DEFAULTS.temperature, neighbours: int = _DEFAULTS.neighbours, average: int = _DEFAULTS.average,
               max_refinement_km: float | None = _DEFAULTS.max_refinement_km) -> RefineResult:
        """Refine a batch: query embeddings (B, D) and the head's cell probabilities (B, C).

        mode: "none" (top cell's centre), "cluster" (best cluster's centre), "nn" (nearest gallery
        image in the top cell), "cluster+nn" (nearest image(s) in the best cluster; the default).
        neighbours: how many nearest images to report; average: how many of them give the answer
        (1 = the nearest image; more = their similarity-weighted spherical mean).
        max_refinement_km: PIGEON's guard. A winning cluster in another cell that puts the answer
        farther than this from the top cell's centre is cancelled and the top cell's own best cluster
        answers; if even that is too far, the top cell's centre answers. None = no guard.
        """
        cfg = RefineConfig(mode=mode or DEFAULT_MODE, top_k=top_k, temperature=temperature, neighbours=neighbours,
                           average=average, max_refinement_km=max_refinement_km)   # every option checked there, once
        p = np.asarray(cell_probs)
        if p.dtype != np.float32 and p.dtype != np.float64:
            p = p.astype(np.float64)
        if p.ndim != 2 or p.shape[1] != self.n_cells:
            raise UserError(f"cell probabilities must have shape (batch, {self.n_cells}) for these cells, got {p.shape}; use the head trained on this bundle's cells")
        q = np.asarray(query_emb)
        if q.dtype != np.float32 or not q.flags.c_contiguous:
            q = np.ascontiguousarray(q, dtype=np.float32)  # normalised inside the kernel
        if q.ndim != 2:
            raise UserError(f"embeddings must be a 2-D array (n, dim), got shape {q.shape}; reshape them")
        if len(q) != len(p):
            raise UserError(f"{len(q)} query embeddings but {len(p)} rows of cell probabilities; give one of each per image")
        if len(self.prototypes) and q.shape[1] != self.prototypes.shape[1]:
            raise UserError(f"query embeddings are {q.shape[1]}-d but the gallery is {self.prototypes.shape[1]}-d; use the bundle's backbone")
        neighbours = max(int(cfg.neighbours), int(cfg.average))
        b = len(q)
        k = min(int(cfg.top_k), self.n_cells)
        lat, lon, moved = np.empty((3, b))                     # few allocations: at batch 1 they show
        cell, cluster = np.empty((2, b), np.int64)
        nb_ids, nb_rows = np.empty((2, b, neighbours), np.int64)
        nb_sim = np.empty((b, neighbours), np.float32)
        used = np.empty(b, np.int8)
        _refine_kernel(q, np.ascontiguousarray(p), k, float(cfg.temperature), MODES.index(cfg.mode), int(cfg.average), cfg.max_refinement_km,
                       self.centres, self.c_offs, self.c_order, self.prototypes, self.c_cell, self.c_lat, self.c_lon,
                       self.gk_offs, self.gk_order, self.gc_offs, self.gc_order, self._rows, self.g_lat, self.g_lon,
                       self.g_id, self.g_row, lat, lon, cell, cluster, moved, nb_ids, nb_rows, nb_sim, used)
        return RefineResult(lat=lat, lon=lon, cell=cell, cluster_id=cluster, moved_km=moved,
                            neighbour_ids=nb_ids, neighbour_sims=nb_sim, mode=_MODE_NAMES.take(used), neighbour_rows=nb_rows)


def _gallery_rows(vectors: np.ndarray) -> np.ndarray:
    """The gallery rows as the kernel reads them: float16 kept (a memory map stays a map), else float32;
    C-contiguous either way (a copy only when they are not)."""
    v = np.asarray(vectors)  # a plain ndarray view (also of an np.memmap)
    if v.dtype == np.float16:
        return np.ascontiguousarray(v)
    return np.ascontiguousarray(v, dtype=np.float32)


def centre_answers(probs: np.ndarray, centres: np.ndarray) -> RefineResult:
    """Answers without a gallery (or with refinement off): the top cell's centre (mode "none", no neighbours)."""
    top = np.asarray(probs).argmax(axis=1).astype(np.int64)
    b = len(top)
    return RefineResult(lat=centres[top, 0].astype(np.float64), lon=centres[top, 1].astype(np.float64), cell=top,
                        cluster_id=np.full(b, -1, np.int64), moved_km=np.zeros(b), neighbour_ids=np.empty((b, 0), np.int64),
                        neighbour_sims=np.empty((b, 0), np.float32), mode=np.full(b, "none", dtype=object),
                        neighbour_rows=np.empty((b, 0), np.int64))


class GalleryRefiner:
    """A `Refiner` over one loaded `Gallery`, with the gallery's own columns for the neighbours it finds."""

    def __init__(self, gallery: Gallery, cell_centres: np.ndarray):
        self.gallery = gallery
        self.centres = np.asarray(cell_centres, np.float64)
        self.refiner = Refiner.from_index(self.centres, gallery.clusters, gallery.frame, gallery.index)
        f = gallery.frame
        self._lat, self._lon = f["lat"].to_numpy(np.float64), f["lon"].to_numpy(np.float64)
        self._img = f["image"].astype(str).to_numpy(object) if "image" in f else np.full(len(f), "", object)
        self._cell = f["cell"].to_numpy(np.int64)
        # the source columns stay Arrow text (millions of urls, no Python string each): gathered per answer
        self._source = {c: source_text(f[c]).array for c in GALLERY_SOURCE_COLUMNS if c in f}

    @property
    def source_columns(self) -> tuple[str, ...]:
        """The source columns (url, source, license, author) this gallery holds."""
        return tuple(self._source)

    def neighbour_columns(self, r: RefineResult, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gallery columns of each neighbour in `r`, gathered in one go per column as (B, m) arrays: `lat`, `lon`
        (nan where there is none), `cell` (-1), `image` (""), `key` (`gallery_keys`; "") and the source columns
        the gallery holds (None where there is none or the photo's source gave none). `names`: these only (default all)."""
        ids = r.neighbour_ids
        valid = ids >= 0
        rows = r.neighbour_rows[valid]  # rows of the gallery frame: no per-call pandas index
        plain = {"lat": (self._lat, np.nan, np.float64), "lon": (self._lon, np.nan, np.float64),
                 "cell": (self._cell, -1, np.int64), "image": (self._img, "", object)}
        out: dict[str, np.ndarray] = {}
        for name in (("key", *plain, *self._source) if names is None else names):
            if name == "key":
                out[name] = np.full(ids.shape, "", object)
                out[name][valid] = gallery_keys(ids[valid], self._img[rows])
            elif name in plain:
                col, fill, dtype = plain[name]
                out[name] = np.full(ids.shape, fill, dtype)
                out[name][valid] = col[rows]
            else:
                out[name] = np.full(ids.shape, None, object)
                out[name][valid] = self._source[name].take(rows).to_numpy(dtype=object, na_value=None)
        return out

    def answer(self, emb: np.ndarray, probs: np.ndarray, config: RefineConfig) -> RefineResult:
        """The refined answers of a batch under `config` (mode None: PIGEON's cluster+nn; "none": the top
        cells' centres)."""
        mode = config.mode or DEFAULT_MODE
        if mode == "none":
            return centre_answers(probs, self.centres)
        return self.refiner.refine(emb, probs, mode=mode, **config.refine_kwargs())

    def among(self, rows: np.ndarray) -> "GalleryRefiner":
        """This gallery's refiner over only the photos where `rows` (bool per gallery-frame row) is True."""
        out = copy.copy(self)
        out.refiner = self.refiner.among(rows)
        return out

    def neighbour_places(self, r: RefineResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, image) of each neighbour in `r`, (B, m) arrays: nan / "" where there is none
        (`neighbour_columns` gives the others: cell, key, url, ...)."""
        c = self.neighbour_columns(r, ("lat", "lon", "image"))
        return c["lat"], c["lon"], c["image"]
