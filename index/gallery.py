"""`GeoIndex`: a FAISS index of gallery embeddings, searched by cosine similarity, restricted by id.

Embeddings are L2-normalised float32 and compared by inner product (= cosine). Ids are the caller's
int64 gallery ids (FAISS `IndexIDMap2`), and `search(..., allowed_ids=...)` restricts a search to
the ids of one cell or one cluster with a FAISS `IDSelector`, so one index serves global retrieval
and in-cell refinement alike. `flat` is exact and the default (fine up to a few million vectors);
`hnsw` and `ivf` trade a little recall (measured in bench/index.py) for speed at larger sizes.

On disk: the FAISS file plus a JSON sidecar (`<file>.json`) that records the kind, dimension,
vector count and the hashes of the backbone and cells the index was built with; `load` refuses an
index whose hashes or count do not match what the caller expects, naming the part at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import faiss

from pigeon.core.errors import UserError
from pigeon.core.io import atomic_path

Kind = Literal["flat", "hnsw", "ivf"]
KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf")
FORMAT = 1
EXACT_RESTRICTED_MAX = 65536  # hnsw/ivf: a restricted search over at most this many ids is done exactly


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


class GeoIndex:
    """Gallery embeddings in FAISS (`IndexIDMap2`, inner product on normalised vectors), with int64 ids.

    kind: "flat" (exact), "hnsw" (graph; `hnsw_m`, `ef_search`), "ivf" (inverted lists; `nlist`,
    `nprobe`; trained on the first `add`).
    """

    def __init__(self, dim: int, kind: Kind = "flat", *, hnsw_m: int = 32, ef_search: int = 128,
                 nlist: int | None = None, nprobe: int = 32):
        if kind not in KINDS:
            raise UserError(f"index kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        if int(dim) <= 0:
            raise UserError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.kind: str = kind
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.nlist = nlist
        self.nprobe = int(nprobe)
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
            inner = None  # built when the first batch fixes nlist (`_train_ivf`)
        return None if inner is None else faiss.IndexIDMap2(inner)

    def _train_ivf(self, x: np.ndarray) -> None:
        faiss = _faiss()
        n = len(x)
        nlist = self.nlist or int(np.clip(4 * np.sqrt(max(n, 1)), 1, max(1, n // 39)))
        nlist = max(1, min(nlist, n))
        self.nlist = nlist
        quant = faiss.IndexFlatIP(self.dim)
        inner = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps `quant` referenced
        rng = np.random.default_rng(0)
        sample = x if n <= 256 * nlist else x[rng.choice(n, 256 * nlist, replace=False)]
        inner.train(sample)
        inner.nprobe = min(self.nprobe, nlist)
        self._index = faiss.IndexIDMap2(inner)

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

    # -- mutation ----------------------------------------------------------------------------
    def add(self, emb: np.ndarray, ids: np.ndarray) -> None:
        """Add embeddings (n, dim) under int64 `ids`; they are L2-normalised here. Duplicate ids are refused."""
        x = normalise(emb)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if x.shape[1] != self.dim:
            raise UserError(f"embeddings have dimension {x.shape[1]} but the index holds {self.dim}-d vectors; use the same backbone")
        if len(ids) != len(x):
            raise UserError(f"{len(x)} embeddings but {len(ids)} ids; give one id per embedding")
        if len(x) == 0:
            return
        if len(np.unique(ids)) != len(ids) or (self.ntotal and np.isin(ids, self.ids()).any()):
            raise UserError("gallery ids must be unique and not already in the index; remove the old ids first or give new ones")
        if self._index is None:
            self._train_ivf(x)
        self._index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids (unknown ids are ignored); returns how many went."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if self.ntotal == 0 or len(ids) == 0:
            return 0
        if self.kind == "flat":  # IndexFlat renumbers on removal, which IndexIDMap2 relies on
            return int(self._index.remove_ids(_faiss().IDSelectorBatch(ids)))
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

    # -- reading -----------------------------------------------------------------------------
    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) in storage order. For flat/hnsw the vectors are a zero-copy view of FAISS
        memory, valid until the index changes; for ivf they are reconstructed (a copy)."""
        faiss = _faiss()
        n = self.ntotal
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        inner = faiss.downcast_index(self._index.index)
        if self.kind == "hnsw":
            inner = faiss.downcast_index(inner.storage)
        if self.kind == "ivf":
            self._ivf_direct_map()
            vecs = inner.reconstruct_n(0, n)
        else:
            view = faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim)
            vecs = np.asarray(_KeepAlive(view, self._index))  # the view holds the FAISS object alive
        return self.ids(), vecs

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` cosine neighbours of each query: (scores (q, k) float32, ids (q, k) int64, -1 for none).

        `allowed_ids` restricts the search to those ids (e.g. one cell's or one cluster's images) via
        a FAISS `IDSelectorBatch`, the same restriction for every query in the batch. For hnsw/ivf a
        restriction to at most EXACT_RESTRICTED_MAX ids is searched exactly (a graph walk or an IVF
        probe can miss a small allowed set).
        """
        faiss = _faiss()
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise UserError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d vectors; use the same backbone")
        k = int(k)
        if k <= 0:
            raise UserError(f"k must be positive, got {k}")
        if self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        params = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(np.unique(np.asarray(allowed_ids, dtype=np.int64)))
            if len(allowed) == 0:
                return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
            if self.kind != "flat" and len(allowed) <= EXACT_RESTRICTED_MAX:
                return self._exact_among(q, k, allowed)
            sel = faiss.IDSelectorBatch(allowed)
            if self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k))
            elif self.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=sel, nprobe=min(self.nprobe, self.nlist or 1))
            else:
                params = faiss.SearchParameters(sel=sel)
            params._sel_ref = sel  # keep the selector alive as long as the params
        scores, ids = self._index.search(q, k, params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64, copy=False)

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
        """Write the FAISS file only (for `Bundle.write_part`, which is atomic and keeps the meta)."""
        if self._index is None:
            raise UserError("the index is empty (an ivf index is created by its first add); add vectors before saving")
        _faiss().write_index(self._index, str(path))

    def describe(self, **meta: Any) -> dict[str, Any]:
        """The sidecar/manifest record: format, kind, dim, count, plus the caller's hashes."""
        return {"format": FORMAT, "kind": self.kind, "dim": self.dim, "count": self.ntotal, **meta}

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
             expect_cells_hash: str | None = None, meta: dict[str, Any] | None = None) -> "GeoIndex":
        """Read an index; `meta` (a bundle manifest record) or else the sidecar is checked against the
        expected hashes and the stored count. A mismatch raises `UserError` naming the part."""
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise UserError(f"index file {path} does not exist; build it with `pigeon build-index`")
        if meta is None:
            side = sidecar_path(path)
            meta = json.loads(side.read_text()) if side.exists() else {}
        try:
            raw = faiss.read_index(str(path))
        except RuntimeError as e:
            raise UserError(f"index file {path} is not a readable FAISS index ({str(e).splitlines()[0][:120]}); rebuild it with `pigeon build-index`") from e
        check_meta(meta, path, expect_backbone_hash=expect_backbone_hash, expect_cells_hash=expect_cells_hash,
                   count=int(raw.ntotal))
        inner = faiss.downcast_index(raw.index) if hasattr(raw, "index") else raw
        if isinstance(inner, faiss.IndexHNSW):
            kind = "hnsw"
        elif isinstance(inner, faiss.IndexIVF):
            kind = "ivf"
        else:
            kind = "flat"
        self = cls(raw.d, kind=kind)
        self._index = raw
        if kind == "ivf":
            self.nlist = int(inner.nlist)
            self.nprobe = int(inner.nprobe)
        if kind == "hnsw":
            self.ef_search = int(inner.hnsw.efSearch)
        self.meta = dict(meta)
        return self


class _KeepAlive:
    """Exposes a numpy view of FAISS memory while holding a reference to its owner."""

    def __init__(self, view: np.ndarray, owner: Any):
        self.__array_interface__ = view.__array_interface__
        self._owner = owner


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
