"""An on-disk cache of image embeddings, so a frozen backbone embeds each photo once.

Why: training the head, re-training with other options, evaluating and building the index all
need the same embeddings; the backbone forward is by far the slowest step. The key of an entry is
(backbone hash, view, absolute image path, file mtime and size): a changed file or a changed
backbone misses the cache, never returns a stale vector. One `.npz` store per (backbone, view),
rewritten atomically when new entries arrive.

Location: `cache_dir` argument, else `$PIGEON_CACHE_DIR`, else `~/.cache/pigeon/embeddings`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pigeon.core.io import atomic_path

from .core.errors import UserError
from .datasets import load_image


def default_cache_dir() -> Path:
    env = os.environ.get("PIGEON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pigeon" / "embeddings"


def file_key(path: str | os.PathLike, view: str = "plain") -> str:
    """Cache key of an image file: its absolute path, mtime and size, and the view (augmentation) name."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise UserError(f"image {p} does not exist; fix the manifest's `image` column or the file") from e
    return hashlib.sha1(f"{p}\x00{st.st_mtime_ns}\x00{st.st_size}\x00{view}".encode()).hexdigest()


class EmbeddingCache:
    """Embeddings of image files under one backbone hash; `get` computes only what is missing."""

    def __init__(self, backbone_hash: str, cache_dir: str | os.PathLike | None = None, view: str = "plain"):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.view = view
        self.path = self.dir / backbone_hash[:24] / f"{view}.npz"
        self._keys: dict[str, int] = {}
        self._emb: np.ndarray | None = None
        if self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    keys, emb = z["keys"], z["emb"]
                self._keys = {k: i for i, k in enumerate(keys.tolist())}
                self._emb = emb
            except Exception:  # a damaged cache is only a cache: start over
                self._keys, self._emb = {}, None

    def __len__(self) -> int:
        return len(self._keys)

    def get(
        self,
        paths: Sequence[str],
        embed: Callable[[list[str]], np.ndarray],
        batch_size: int = 256,
        progress: bool = True,
        desc: str = "embed images",
    ) -> np.ndarray:
        """(n, D) float32 embeddings of `paths`; `embed(list_of_paths)` computes missing ones in batches."""
        keys = [file_key(p, self.view) for p in paths]
        hit = np.array([k in self._keys for k in keys], dtype=bool)
        miss = np.flatnonzero(~hit)
        new: list[np.ndarray] = []
        if len(miss):
            starts = range(0, len(miss), batch_size)
            if progress:
                starts = tqdm(starts, desc=desc, unit="batch", total=(len(miss) + batch_size - 1) // batch_size)
            for s in starts:
                idx = miss[s : s + batch_size]
                new.append(np.asarray(embed([paths[i] for i in idx]), dtype=np.float32))
            new_emb = np.concatenate(new, 0)
            self._add([keys[i] for i in miss], new_emb)
        assert self._emb is not None
        rows = np.fromiter((self._keys[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._emb[rows]

    def _add(self, keys: list[str], emb: np.ndarray) -> None:
        start = 0 if self._emb is None else len(self._emb)
        uniq: dict[str, int] = {}
        for j, k in enumerate(keys):  # duplicates in one request: keep one row
            uniq.setdefault(k, j)
        sel = np.fromiter(uniq.values(), dtype=np.int64, count=len(uniq))
        add = emb[sel]
        self._emb = add if self._emb is None else np.concatenate([self._emb, add], 0)
        for i, k in enumerate(uniq):
            self._keys[k] = start + i
        self.save()

    def save(self) -> None:
        if self._emb is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._keys.keys()))
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, emb=self._emb)


def embed_paths(
    backbone: Any,
    paths: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    progress: bool = True,
    transform: Callable | None = None,
    view: str = "plain",
    use_cache: bool = True,
) -> np.ndarray:
    """Normalised (n, D) embeddings of image files with `backbone`, through the on-disk cache.

    `transform` (PIL -> tensor) replaces the backbone's preprocessing for augmented views; give
    each distinct transform its own `view` name so their embeddings are cached apart.
    """
    def _embed(batch: list[str]) -> np.ndarray:
        ims = [load_image(p) for p in batch]
        if transform is None:
            return backbone.embed_images(ims, batch_size=batch_size)
        x = torch.stack([transform(im) for im in ims])
        return backbone.embed_images(x, batch_size=batch_size)

    paths = [str(p) for p in paths]
    if not use_cache:
        out = [_embed(paths[s : s + batch_size]) for s in range(0, len(paths), batch_size)]
        return np.concatenate(out, 0) if out else np.zeros((0, backbone.embed_dim), np.float32)
    if not paths:
        return np.zeros((0, backbone.embed_dim), np.float32)
    cache = EmbeddingCache(backbone.hash, cache_dir, view=view)
    return cache.get(paths, _embed, batch_size=batch_size, progress=progress, desc=f"embed images ({view})")


__all__ = ["EmbeddingCache", "embed_paths", "file_key", "default_cache_dir"]
