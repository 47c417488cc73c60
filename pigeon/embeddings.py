"""Embedding shards on disk: what `pigeon embed` writes and `train`, `build-index`, `evaluate` read.

A folder of one data source's embeddings under one backbone and one view (plain or an augmentation):

    embeddings.json          backbone spec/hash, dim, view, precision (fp32, bf16 or fp16: the backbone
                             forwards'; absent in folders written before it was recorded: fp32), the
                             source, its shard names
    shard-000000.npy         float16 (n, dim) L2-normalised vectors, in the input shard's order
    shard-000000.parquet     one row per vector: pos (the record's place in its input shard), key,
                             lat, lon, split, and taken_at/heading/location_id/id and url/source/license/author
                             (`pigeon.core.provenance`) when the source has them
    shard-000000.json        written last: the input shard's name and fingerprint, n, what was skipped

Output shard i comes from input shard i, whoever embeds it: each torchrun rank takes its own input
shards and a re-run with another world size finds the same files. A shard counts only once its
`.json` exists (the vectors and rows were renamed into place before it), so a kill loses at most
the shard being written, and a changed input shard (other fingerprint) is embedded again.

`EmbeddingStore` opens a finished folder memory-mapped: the vectors are never all in RAM; rows are
gathered per batch (`take`) or streamed in chunks (`chunks`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .core.errors import UserError
from .core.io import atomic_path
from .core.provenance import SOURCE_COLUMNS, source_text

FORMAT = 1
HEADER = "embeddings.json"
ROW_COLUMNS = ("pos", "key", "lat", "lon", "split")
OPTIONAL_COLUMNS = ("taken_at", "heading", "location_id", "id", *SOURCE_COLUMNS)  # SOURCE_COLUMNS read on demand (`source_columns`)
LOAD_COLUMNS = ("lat", "lon", "split", "id", "location_id", "taken_at", "heading")  # kept in RAM; keys on demand


def shard_stem(i: int) -> str:
    return f"shard-{i:06d}"


@dataclass
class ShardFiles:
    """The three files of output shard i in `folder`."""

    folder: Path
    i: int

    @property
    def vectors(self) -> Path:
        return self.folder / f"{shard_stem(self.i)}.npy"

    @property
    def rows(self) -> Path:
        return self.folder / f"{shard_stem(self.i)}.parquet"

    @property
    def done(self) -> Path:
        return self.folder / f"{shard_stem(self.i)}.json"

    def record(self) -> dict[str, Any] | None:
        """The completion record, or None when the shard is not (fully) written."""
        if not (self.done.is_file() and self.vectors.is_file() and self.rows.is_file()):
            return None
        try:
            rec = json.loads(self.done.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def write(self, vectors: np.ndarray, rows: pd.DataFrame, record: dict[str, Any]) -> None:
        """Vectors, then rows, then the record that makes the shard count: each renamed into place."""
        self.done.unlink(missing_ok=True)
        with atomic_path(self.vectors) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(vectors, dtype=np.float16))
        with atomic_path(self.rows) as tmp:
            rows.to_parquet(tmp, index=False)
        with atomic_path(self.done) as tmp:
            tmp.write_text(json.dumps({**record, "n": int(len(rows))}, sort_keys=True))

    def remove(self) -> None:
        for p in (self.done, self.vectors, self.rows):
            p.unlink(missing_ok=True)


def read_header(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's `embeddings.json`, checked; UserError naming the folder otherwise."""
    folder = Path(folder)
    path = folder / HEADER
    if not path.is_file():
        raise UserError(f"{folder} is not an embedding folder (no {HEADER}); make one with `pigeon embed --data SOURCE --out {folder}`")
    try:
        head = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun `pigeon embed` into a new folder") from e
    need = ("format", "backbone_hash", "dim", "view", "shards", "source")
    if not isinstance(head, dict) or any(k not in head for k in need) or head.get("format") != FORMAT:
        raise UserError(f"{path} is not a pigeon embedding header (format {FORMAT} with {', '.join(need)}); rerun `pigeon embed` into a new folder")
    return head


def header_precision(head: dict[str, Any]) -> str:
    """The precision a folder's embeddings were computed in (fp32 for folders from before it was recorded)."""
    return str(head.get("precision") or "fp32")


def write_header(folder: Path, head: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / HEADER) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, **head}, indent=2, sort_keys=True))


class EmbeddingStore:
    """A finished embedding folder, memory-mapped: `vectors` of each shard stay on disk.

    `rows` holds lat, lon, split (and id, location_id, taken_at, heading when present) of every
    vector, in shard order; `take(idx)` gathers float32 vectors of global rows, `chunks()` streams them.
    """

    def __init__(self, folder: str | os.PathLike, expect_backbone_hash: str | None = None):
        self.folder = Path(folder)
        self.header = read_header(self.folder)
        self.dim = int(self.header["dim"])
        self.backbone_hash = str(self.header["backbone_hash"])
        self.precision = header_precision(self.header)
        if expect_backbone_hash and expect_backbone_hash != self.backbone_hash:
            raise UserError(f"embedding folder {self.folder} was made with backbone {self.header.get('backbone_spec')} "
                            f"(hash {self.backbone_hash[:12]}), not the bundle's (hash {expect_backbone_hash[:12]}); "
                            f"embed the data again with the bundle's backbone into another folder")
        self._mats: list[np.ndarray] = []
        frames = []
        for i, name in enumerate(self.header["shards"]):
            files = ShardFiles(self.folder, i)
            rec = files.record()
            if rec is None or rec.get("shard") != name:
                raise UserError(f"embedding folder {self.folder} lacks shard {i} ({name}); rerun the same `pigeon embed` to finish it")
            mat = np.load(files.vectors, mmap_mode="r")
            if mat.ndim != 2 or mat.shape[1] != self.dim or mat.shape[0] != int(rec["n"]):
                raise UserError(f"embedding shard {files.vectors} has shape {mat.shape}, not ({rec['n']}, {self.dim}); delete it and rerun `pigeon embed`")
            self._mats.append(mat)
            frames.append(self._read_rows(files.rows, len(mat)))
        self.rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in ("lat", "lon", "split")})
        self.rows["split"] = self.rows["split"].astype(str).astype("category")  # a few bytes a row, not a str object
        self.offsets = np.concatenate([[0], np.cumsum([len(m) for m in self._mats])]).astype(np.int64)

    def _read_rows(self, path: Path, n: int) -> pd.DataFrame:
        names = pq.read_schema(path).names
        df = pd.read_parquet(path, columns=[c for c in LOAD_COLUMNS if c in names])
        if len(df) != n:
            raise UserError(f"embedding rows {path} list {len(df)} photos for {n} vectors; delete the shard and rerun `pigeon embed`")
        df["shard"] = np.int32(len(self._mats) - 1)
        return df

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self._mats)

    def keys(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The source keys of global rows `idx` (all rows when None), read from the shards' Parquet."""
        keys = np.concatenate([pd.read_parquet(ShardFiles(self.folder, i).rows, columns=["key"])["key"].to_numpy(dtype=object)
                               for i in range(self.n_shards)]) if self.n_shards else np.zeros(0, dtype=object)
        return keys if idx is None else keys[np.asarray(idx, np.int64)]

    def source_columns(self, idx: np.ndarray | None = None) -> pd.DataFrame:
        """The source columns (url, source, license, author: `pigeon.core.provenance`) of global rows `idx` (all
        when None) that any shard has, read from the shards' Parquet on demand (not kept in RAM); <NA> where missing."""
        parts = []
        for i in range(self.n_shards):
            path = ShardFiles(self.folder, i).rows
            have = [c for c in SOURCE_COLUMNS if c in pq.read_schema(path).names]
            parts.append(pd.read_parquet(path, columns=have) if have else pd.DataFrame(index=range(len(self._mats[i]))))
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        frame = pd.DataFrame({c: source_text(frame[c]) for c in SOURCE_COLUMNS if c in frame.columns}, index=frame.index)
        return frame if idx is None else frame.iloc[np.asarray(idx, np.int64)].reset_index(drop=True)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """float32 vectors (len(idx), dim) of global rows `idx`, in the given order."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.dim), np.float32)
        if len(idx) == 0:
            return out
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = idx[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")      # sequential reads from the memory map
            out[sel[order]] = self._mats[s][local[order]]
        return out

    def view(self, idx: np.ndarray | None = None) -> "RowsView":
        """Rows `idx` (all when None) as a lazy (len(idx), dim) array-like: rows are read from the
        memory maps when indexed (what `pigeon.index.build_gallery` takes, never a float32 copy of all)."""
        return RowsView(self, np.arange(len(self), dtype=np.int64) if idx is None else np.asarray(idx, np.int64))

    def chunks(self, idx: np.ndarray | None = None, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global rows, float32 vectors) in chunks of at most `size` rows: all rows, or `idx` in order."""
        rows = np.arange(len(self), dtype=np.int64) if idx is None else np.asarray(idx, np.int64)
        for s in range(0, len(rows), size):
            r = rows[s:s + size]
            yield r, self.take(r)

    def mean(self, idx: np.ndarray, size: int = 65536) -> np.ndarray:
        """The mean vector (dim,) float32 of rows `idx`, summed chunk by chunk."""
        total = np.zeros(self.dim, np.float64)
        for _, v in self.chunks(idx, size):
            total += v.sum(0, dtype=np.float64)
        return (total / max(len(idx), 1)).astype(np.float32)


class RowsView:
    """Some rows of an `EmbeddingStore`, read on demand: `shape`, `dtype`, `len`, rows by slice or by
    row numbers, and the shards' memory maps as `parts` (so a reader can release their pages)."""

    def __init__(self, store: EmbeddingStore, idx: np.ndarray):
        self.store, self.idx = store, idx
        self.shape = (len(idx), store.dim)
        self.dtype = np.dtype(np.float32)                # what `take` returns (float16 on disk)
        self.ndim = 2
        self.parts = store._mats

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = self.idx[key] if isinstance(key, slice) else self.idx[np.asarray(key, np.int64).reshape(-1)]
        return self.store.take(rows)


__all__ = ["EmbeddingStore", "RowsView", "ShardFiles", "header_precision", "read_header", "write_header", "shard_stem", "FORMAT", "HEADER"]
