"""`GeoIndex`: a FAISS index of gallery embeddings, searched by cosine similarity, restricted by id.

Embeddings are L2-normalised float32 and compared by inner product (= cosine). Ids are the caller's
int64 gallery ids (FAISS `IndexIDMap2`), and `search(..., allowed_ids=...)` restricts a search to
the ids of one cell or one cluster with a FAISS `IDSelector`, so one index serves global retrieval
and in-cell refinement alike. `flat` is exact and the default (fine up to a few million vectors);
`hnsw` and `ivf` trade a little recall (measured in bench/index.py) for speed at larger sizes.
`ivfpq` is for galleries too big for float32 in RAM (4.7M x 768 is 14 GB): FAISS IVF-PQ (optionally
with OPQ) for search, wrapped in an `IndexRefine` whose refinement index holds every vector as
float16 (`SQfp16`) in storage order. Those float16 rows are what `vectors()` hands to the compiled
refinement (no float32 copy) and what re-ranks the PQ candidates of a search; they live inside the
one FAISS file, so the index stays one file (one bundle part, one hash, one atomic write).

On disk: the FAISS file plus a JSON sidecar (`<file>.json`) that records the kind, dimension,
vector count and the hashes of the backbone and cells the index was built with; `load` refuses an
index whose hashes or count do not match what the caller expects, naming the part at fault.
`load(path, mmap=True)` maps the stored vectors (FAISS `IO_FLAG_MMAP_IFC`) instead of reading them
into each process, so several server workers share one copy through the page cache (read-only).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import faiss

from pigeon.core.errors import UserError
from pigeon.core.io import atomic_path

Kind = Literal["flat", "hnsw", "ivf", "ivfpq"]
KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf", "ivfpq")
TRAINED_KINDS: tuple[str, ...] = ("ivf", "ivfpq")  # need a training sample before the first add
FORMAT = 1
EXACT_RESTRICTED_MAX = 65536  # hnsw/ivf/ivfpq: a restricted search over at most this many ids is done exactly
PQ_BITS = 8                   # 256 centroids per PQ sub-quantizer
IVFPQ_MIN_TRAIN = 4 << PQ_BITS  # 1024: four training vectors per PQ centroid at the least
IVFPQ_TRAIN_CAP = 1 << 18     # default training sample cap (k-means cost grows with sample x nlist)


def _faiss():
    return faiss


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as a new C-contiguous float32 array (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise UserError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}; reshape them")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


def check_new_ids(ids: np.ndarray, existing: np.ndarray | None = None) -> np.ndarray:
    """int64 `ids`, refused unless unique and (given the ids already indexed) all new: the one check of
    gallery ids, made where ids enter an index."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids) or (existing is not None and len(existing) and np.isin(ids, existing).any()):
        raise UserError("gallery ids must be unique and not already in the index; remove the old ids first or give new ones")
    return ids


def default_pq_m(dim: int) -> int:
    """PQ sub-quantizers for `dim`: the largest divisor of dim that is at most dim / 8 (64 for 512, 96 for 768)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


class GeoIndex:
    """Gallery embeddings in FAISS (`IndexIDMap2`, inner product on normalised vectors), with int64 ids.

    kind: "flat" (exact), "hnsw" (graph; `hnsw_m`, `ef_search`), "ivf" (inverted lists; `nlist`,
    `nprobe`), "ivfpq" (inverted lists of `pq_m`-byte PQ codes, an `opq` rotation if asked, float16
    vectors that re-rank `k_factor` x k PQ candidates and serve refinement). ivf and ivfpq are trained
    on a seeded sample (at most `train_sample` vectors) of their first `add`, or explicitly with
    `train(sample, n_total)` before chunks are streamed in; nlist defaults to 4 sqrt(n_total).
    """

    def __init__(self, dim: int, kind: Kind = "flat", *, hnsw_m: int = 32, ef_search: int = 128,
                 nlist: int | None = None, nprobe: int = 32, pq_m: int | None = None, opq: bool = False,
                 k_factor: int = 4, train_sample: int | None = None, seed: int = 0):
        if kind not in KINDS:
            raise UserError(f"index kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        if int(dim) <= 0:
            raise UserError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.kind: str = kind
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe = int(nprobe)
        self.pq_m = _check_pq_m(self.dim, pq_m) if kind == "ivfpq" else pq_m
        self.opq = bool(opq)
        self.k_factor = int(k_factor)
        self.train_sample = None if train_sample is None else int(train_sample)
        self.seed = int(seed)
        for name in ("nlist", "train_sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"index {name} {getattr(self, name)} must be >= 1 (or None for the default)")
        if self.nprobe < 1 or self.k_factor < 1:
            raise UserError(f"index nprobe {self.nprobe} and k_factor {self.k_factor} must be >= 1")
        self.read_only = False  # True when loaded memory-mapped
        self.meta: dict[str, Any] = {}
        self._index = self._empty()

    # -- construction ------------------------------------------------------------------------
    def _empty(self):
        faiss = _faiss()
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
            inner.hnsw.efSearch = self.ef_search
        else:
            inner = None  # ivf/ivfpq: made by `train` (or the first add), once nlist is known
        return None if inner is None else faiss.IndexIDMap2(inner)

    def plan_training(self, n_total: int) -> int:
        """Fix nlist for a gallery of `n_total` vectors and return how many vectors to train on
        (0 for flat/hnsw). ivf: 4 sqrt(n) lists, up to 256 per list; ivfpq: 64 per list, at least
        65,536 (what PQ training uses) and at most `train_sample` (default 2^18: k-means costs
        sample x nlist); nlist then shrinks to sample / 39 if needed (FAISS's minimum per centroid)."""
        if self.kind not in TRAINED_KINDS:
            return 0
        n_total = max(int(n_total), 1)
        guess = self.nlist or int(4 * math.sqrt(n_total))
        if self.kind == "ivf":
            cap = self.train_sample or 256 * max(1, min(guess, n_total // 39 or 1))
        else:
            cap = self.train_sample or int(np.clip(64 * guess, 1 << 16, IVFPQ_TRAIN_CAP))
        n_sample = min(n_total, cap)
        if self.nlist is None:
            self.nlist = int(np.clip(guess, 1, max(1, n_sample // 39)))
        return n_sample

    def train(self, sample: np.ndarray, n_total: int | None = None) -> None:
        """Train an ivf/ivfpq index on `sample` (vectors like the gallery's, any scale) before adding
        chunks; `n_total` (the gallery's size, default len(sample)) sets nlist. A no-op for flat/hnsw."""
        if self.kind not in TRAINED_KINDS:
            return
        if self._index is not None:
            raise UserError(f"this {self.kind} index is already trained; make a new GeoIndex to train again")
        x = normalise(sample)
        self._check_dim(x, "training vectors")
        want = self.plan_training(n_total or len(x))
        if len(x) > want:
            x = x[np.sort(np.random.default_rng(self.seed).choice(len(x), want, replace=False))]
        if self.kind == "ivfpq" and len(x) < IVFPQ_MIN_TRAIN:
            raise UserError(f"an ivfpq index needs at least {IVFPQ_MIN_TRAIN} vectors to train ({1 << PQ_BITS} PQ centroids per "
                            f"sub-quantizer), got {len(x)}; use kind 'flat' for a gallery this small, or train on more vectors")
        if len(x) == 0:
            raise UserError(f"an {self.kind} index needs vectors to train on; give at least one")
        self.nlist = min(self.nlist, len(x))
        self._index = _faiss().IndexIDMap2(self._trained_inner(x))  # the wrapper keeps `inner` referenced

    def _trained_inner(self, x: np.ndarray):
        """The FAISS index under the id map, trained on `x`: IVFFlat, or IVF-PQ (+OPQ) refined by float16."""
        faiss = _faiss()
        if self.kind == "ivf":
            quant = faiss.IndexFlatIP(self.dim)
            inner = faiss.IndexIVFFlat(quant, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)  # keeps `quant` referenced
            inner.train(x)
            inner.nprobe = min(self.nprobe, self.nlist)
            return inner
        # "np": no polysemous training (a code reordering for Hamming filtering that is never used
        # here and took 30-100x the PQ training itself: 469 s vs ~20 s for IVF1788,PQ64 at 200K)
        opq = f"OPQ{self.pq_m}_{self.dim}," if self.opq else ""
        inner = faiss.index_factory(self.dim, f"{opq}IVF{self.nlist},PQ{self.pq_m}x{PQ_BITS}np,Refine(SQfp16)",
                                    faiss.METRIC_INNER_PRODUCT)
        inner.train(x)
        inner.k_factor = self.k_factor
        faiss.extract_index_ivf(inner).nprobe = min(self.nprobe, self.nlist)
        return inner

    def reserve(self, n_total: int) -> None:
        """Allocate the stored vectors (flat: float32, ivfpq: float16) for `n_total` vectors at once, so
        adding chunks never regrows them: a growing std::vector holds the old and the new copy at the
        same time (~1.5-2x the store at the last growth). No-op for the other kinds or when untrained."""
        store = self._store()
        if store is None or int(n_total) <= self.ntotal:
            return
        size = store.codes.size()
        store.codes.resize(int(n_total) * int(store.code_size))  # capacity stays when it shrinks back
        store.codes.resize(size)

    def _store(self):
        """The FAISS `IndexFlatCodes` that holds every vector in storage order (IndexFlat for flat,
        the SQfp16 refinement index for ivfpq), or None (hnsw stores in a graph's IndexFlat, ivf in lists)."""
        if self._index is None or self.kind not in ("flat", "ivfpq"):
            return None
        inner = _faiss().downcast_index(self._index.index)
        return inner if self.kind == "flat" else _faiss().downcast_index(inner.refine_index)

    def _ivf_direct_map(self) -> None:
        """IVF reconstructs vectors by id only with a direct map; make one once (adds then keep it up)."""
        inner = _faiss().downcast_index(self._index.index)
        if inner.direct_map.type == 0:
            inner.make_direct_map()

    @property
    def ntotal(self) -> int:
        """How many vectors the index holds."""
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def ids(self) -> np.ndarray:
        """The stored ids (int64), in FAISS storage order."""
        if self._index is None:
            return np.zeros(0, dtype=np.int64)
        return _faiss().vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def _check_dim(self, x: np.ndarray, what: str) -> None:
        if x.shape[1] != self.dim:
            raise UserError(f"{what} have dimension {x.shape[1]} but the index holds {self.dim}-d vectors; use the same backbone")

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise UserError(f"this index was loaded memory-mapped (read-only); load it with mmap=False to {what}")

    # -- mutation ----------------------------------------------------------------------------
    def add(self, emb: np.ndarray, ids: np.ndarray, *, check_ids: bool = True) -> None:
        """Add embeddings (n, dim) under int64 `ids`; they are L2-normalised here. Duplicate ids are
        refused (`check_ids=False` skips that O(ntotal) check for a caller that checked all ids once)."""
        self._writable("add vectors")
        x = normalise(emb)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        self._check_dim(x, "embeddings")
        if len(ids) != len(x):
            raise UserError(f"{len(x)} embeddings but {len(ids)} ids; give one id per embedding")
        if len(x) == 0:
            return
        if check_ids:
            check_new_ids(ids, self.ids() if self.ntotal else None)
        if self._index is None:
            self.train(x)
        self._index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids (unknown ids are ignored); returns how many went."""
        self._writable("remove vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if self.ntotal == 0 or len(ids) == 0:
            return 0
        if self.kind == "flat":  # IndexFlat renumbers on removal, which IndexIDMap2 relies on
            return int(self._index.remove_ids(_faiss().IDSelectorBatch(ids)))
        if self.kind == "ivfpq":
            return self._remove_ivfpq(ids)
        # HNSW cannot remove and IVF does not renumber: rebuild from the kept vectors (training kept)
        all_ids, vecs = self.vectors()
        keep = ~np.isin(all_ids, ids)
        removed = int((~keep).sum())
        if removed:
            kept_ids, kept = all_ids[keep], np.array(vecs[keep])
            if self.kind == "ivf":
                inner = _faiss().clone_index(_faiss().downcast_index(self._index.index))
                inner.reset()
                self._index = _faiss().IndexIDMap2(inner)  # the wrapper keeps `inner` referenced
            else:
                self._index = self._empty()
            if len(kept_ids):
                self._index.add_with_ids(kept, kept_ids)
        return removed

    def _remove_ivfpq(self, ids: np.ndarray) -> int:
        """Remove in place, codes kept (no re-encoding): the float16 store shifts its rows down
        (IndexFlatCodes renumbers), the IVF lists drop the entries and their stored positions are
        renumbered to match, then the id map. IndexRefine has no remove_ids of its own."""
        faiss = _faiss()
        all_ids = self.ids()
        drop = np.flatnonzero(np.isin(all_ids, ids)).astype(np.int64)  # storage positions, sorted
        if len(drop) == 0:
            return 0
        refine = faiss.downcast_index(self._index.index)
        sel = faiss.IDSelectorBatch(drop)
        faiss.downcast_index(refine.refine_index).remove_ids(sel)
        faiss.downcast_index(refine.base_index).remove_ids(sel)
        _renumber_lists(faiss.extract_index_ivf(refine), drop)
        refine.ntotal = refine.refine_index.ntotal
        faiss.copy_array_to_vector(np.delete(all_ids, drop), self._index.id_map)
        self._index.ntotal = refine.ntotal
        self._index.construct_rev_map()
        return int(len(drop))

    # -- reading -----------------------------------------------------------------------------
    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) in storage order. flat/hnsw: float32, ivfpq: float16, both zero-copy views of
        FAISS memory (memory-mapped after `load(mmap=True)`), valid until the index changes; ivf: a
        float32 copy reconstructed from the lists."""
        faiss = _faiss()
        n = self.ntotal
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float16 if self.kind == "ivfpq" else np.float32)
        if self.kind == "ivf":
            self._ivf_direct_map()
            return self.ids(), faiss.downcast_index(self._index.index).reconstruct_n(0, n)
        if self.kind == "ivfpq":
            raw = faiss.rev_swig_ptr(self._store().codes.data(), n * self.dim * 2)
            view = raw.view(np.float16).reshape(n, self.dim)
        else:
            inner = faiss.downcast_index(self._index.index)
            if self.kind == "hnsw":
                inner = faiss.downcast_index(inner.storage)
            view = faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim)
        return self.ids(), np.asarray(_KeepAlive(view, self._index))  # the view holds the FAISS object alive

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` cosine neighbours of each query: (scores (q, k) float32, ids (q, k) int64, -1 for none).

        `allowed_ids` restricts the search to those ids (e.g. one cell's or one cluster's images) via
        a FAISS `IDSelectorBatch`, the same restriction for every query in the batch. For hnsw/ivf/ivfpq
        a restriction to at most EXACT_RESTRICTED_MAX ids is searched exactly (a graph walk or an IVF
        probe can miss a small allowed set). ivfpq scores are float16-exact (re-ranked), not PQ's.
        """
        q = normalise(queries)
        self._check_dim(q, "queries")
        k = int(k)
        if k <= 0:
            raise UserError(f"k must be positive, got {k}")
        empty = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self.ntotal == 0:
            return empty
        params = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(np.unique(np.asarray(allowed_ids, dtype=np.int64)))
            if len(allowed) == 0:
                return empty
            if self.kind != "flat" and len(allowed) <= EXACT_RESTRICTED_MAX:
                return self._exact_among(q, k, allowed)
            if self.kind == "ivfpq":
                return self._ivfpq_among(q, k, allowed)
            params = self._selector_params(allowed, k)
        scores, ids = self._index.search(q, k, params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64, copy=False)

    def _selector_params(self, allowed: np.ndarray, k: int):
        """FAISS search parameters restricting flat/hnsw/ivf to `allowed` (the id map translates them)."""
        faiss = _faiss()
        sel = faiss.IDSelectorBatch(allowed)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k))
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(self.nprobe, self.nlist or 1))
        else:
            params = faiss.SearchParameters(sel=sel)
        params._sel_ref = sel  # keep the selector alive as long as the params
        return params

    def _ivfpq_among(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A restricted ivfpq search over many ids. IndexIDMap2 translates a selector only for the
        index right under it, not for IndexRefine's base, so select storage positions here and search
        the IndexRefine directly (its base probes with the selector, float16 re-ranks)."""
        faiss = _faiss()
        all_ids = self.ids()
        sel = faiss.IDSelectorBatch(np.flatnonzero(np.isin(all_ids, allowed)).astype(np.int64))
        base = faiss.SearchParametersIVF(sel=sel, nprobe=min(self.nprobe, self.nlist or 1))
        params = faiss.IndexRefineSearchParameters(k_factor=float(self.k_factor), base_index_params=base)
        base._sel_ref, params._base_ref = sel, base  # keep both alive as long as the params
        scores, pos = faiss.downcast_index(self._index.index).search(q, k, params=params)
        ids = np.where(pos >= 0, all_ids[np.maximum(pos, 0)], -1)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)

    def _exact_among(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search among a few allowed ids: an HNSW graph walk or an IVF probe can miss a small
        allowed set entirely, so gather those vectors (by id) and do one matrix product."""
        if self.kind == "ivf":
            self._ivf_direct_map()
        present = allowed[np.isin(allowed, self.ids())]
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if len(present) == 0:
            return scores, ids
        sims = q @ self._index.reconstruct_batch(present).T
        kk = min(k, len(present))
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable"), 1)
        scores[:, :kk] = np.take_along_axis(sims, top, 1)
        ids[:, :kk] = present[top]
        return scores, ids

    # -- persistence -------------------------------------------------------------------------
    def write(self, path: str | os.PathLike) -> None:
        """Write the FAISS file only (for `Bundle.write_part`, which is atomic and keeps the meta).
        For ivfpq the float16 vectors are inside it (the IndexRefine's SQfp16 index): one file."""
        if self._index is None:
            raise UserError(f"the index is empty (an {self.kind} index is created by its first add or `train`); add vectors before saving")
        _faiss().write_index(self._index, str(path))

    def describe(self, **meta: Any) -> dict[str, Any]:
        """The sidecar/manifest record: format, kind, dim, count (ivf/ivfpq: nlist; ivfpq: pq_m, opq), plus the caller's hashes."""
        extra: dict[str, Any] = {}
        if self.kind in TRAINED_KINDS:
            extra["nlist"] = self.nlist
        if self.kind == "ivfpq":
            extra.update(pq_m=self.pq_m, opq=self.opq)
        return {"format": FORMAT, "kind": self.kind, "dim": self.dim, "count": self.ntotal, **extra, **meta}

    def save(self, path: str | os.PathLike, *, backbone_hash: str | None = None, cells_hash: str | None = None, **meta: Any) -> Path:
        """Write the index and its JSON sidecar `<path>.json`, each atomically (temp file, then rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.write(tmp)
        self.meta = self.describe(backbone_hash=backbone_hash, cells_hash=cells_hash, **meta)
        with atomic_path(sidecar_path(path)) as tmp:
            tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_backbone_hash: str | None = None,
             expect_cells_hash: str | None = None, meta: dict[str, Any] | None = None, mmap: bool = False) -> "GeoIndex":
        """Read an index; `meta` (a bundle manifest record) or else the sidecar is checked against the
        expected hashes and the stored count. A mismatch raises `UserError` naming the part.

        mmap=True maps the stored vectors from the file (FAISS `IO_FLAG_MMAP_IFC`: the codes of
        flat's IndexFlat, hnsw's storage, ivf's and ivfpq's inverted lists and ivfpq's float16 store)
        instead of reading them into this process, and opens the index read-only (add/remove
        refused): processes that load the same file share one copy in the page cache."""
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise UserError(f"index file {path} does not exist; build it with `pigeon build-index`")
        if meta is None:
            side = sidecar_path(path)
            meta = json.loads(side.read_text()) if side.exists() else {}
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            raw = faiss.read_index(str(path), flags)
        except RuntimeError as e:
            raise UserError(f"index file {path} is not a readable FAISS index ({str(e).splitlines()[0][:120]}); rebuild it with `pigeon build-index`") from e
        check_meta(meta, path, expect_backbone_hash=expect_backbone_hash, expect_cells_hash=expect_cells_hash,
                   count=int(raw.ntotal))
        self = cls._wrap(raw)
        self.read_only = bool(mmap)
        self.meta = dict(meta)
        return self

    @classmethod
    def _wrap(cls, raw) -> "GeoIndex":
        """A GeoIndex around a FAISS index read from disk, its kind and parameters read back from it."""
        faiss = _faiss()
        inner = faiss.downcast_index(raw.index) if hasattr(raw, "index") else raw
        kind = ("ivfpq" if isinstance(inner, faiss.IndexRefine) else "hnsw" if isinstance(inner, faiss.IndexHNSW)
                else "ivf" if isinstance(inner, faiss.IndexIVF) else "flat")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(inner)) if kind in TRAINED_KINDS else None
        self = cls(raw.d, kind=kind, pq_m=int(ivf.pq.M) if kind == "ivfpq" else None)
        self._index = raw
        if ivf is not None:
            self.nlist, self.nprobe = int(ivf.nlist), int(ivf.nprobe)
        if kind == "ivfpq":
            self.k_factor = int(inner.k_factor)
            self.opq = isinstance(faiss.downcast_index(inner.base_index), faiss.IndexPreTransform)
        if kind == "hnsw":
            self.ef_search = int(inner.hnsw.efSearch)
        return self


class _KeepAlive:
    """Exposes a numpy view of FAISS memory while holding a reference to its owner."""

    def __init__(self, view: np.ndarray, owner: Any):
        self.__array_interface__ = view.__array_interface__
        self._owner = owner


def _check_pq_m(dim: int, pq_m: int | None) -> int:
    """The PQ sub-quantizer count for `dim`: the given one if it divides dim, else the default."""
    if pq_m is None:
        return default_pq_m(dim)
    if int(pq_m) < 1 or dim % int(pq_m):
        raise UserError(f"pq_m {pq_m} must divide the dimension {dim} (one sub-quantizer per dim/pq_m dimensions); "
                        f"try {default_pq_m(dim)} (the default, dim/8 or the nearest divisor below)")
    return int(pq_m)


def _renumber_lists(ivf, drop: np.ndarray) -> None:
    """After `drop` (sorted storage positions) left an IVF index, shift the positions its lists
    store down to the renumbered storage (position p becomes p - #dropped below p), list by list."""
    faiss = _faiss()
    ivf = faiss.downcast_index(ivf)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for ln in range(ivf.nlist):  # per list, vectorised inside: nlist (a few thousand) iterations, not per vector
        m = lists.list_size(ln)
        if m == 0:
            continue
        pos = faiss.rev_swig_ptr(lists.get_ids(ln), m).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(ln), m * lists.code_size).copy()
        pos -= np.searchsorted(drop, pos)
        lists.update_entries(ln, 0, m, faiss.swig_ptr(pos), faiss.swig_ptr(codes))


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where `GeoIndex.save` puts the JSON record of an index file."""
    return Path(str(path) + ".json")


def check_meta(meta: dict[str, Any], path: str | os.PathLike, *, expect_backbone_hash: str | None,
               expect_cells_hash: str | None, count: int | None) -> None:
    """Refuse an index whose recorded backbone/cells hashes or vector count differ from what is expected."""
    bad = []
    got_b, got_c = meta.get("backbone_hash"), meta.get("cells_hash")
    if expect_backbone_hash and got_b and got_b != expect_backbone_hash:
        bad.append(f"backbone (index built with {got_b[:12]}, bundle has {expect_backbone_hash[:12]})")
    if expect_cells_hash and got_c and got_c != expect_cells_hash:
        bad.append(f"cells (index built on {got_c[:12]}, bundle has {expect_cells_hash[:12]})")
    if count is not None and "count" in meta and int(meta["count"]) != count:
        bad.append(f"vector count (record says {meta['count']}, file holds {count})")
    if bad:
        raise UserError(f"index {path} does not match: {'; '.join(bad)}; rebuild it with `pigeon build-index`")
