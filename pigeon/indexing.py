"""`pigeon build-index`: embed a gallery of located photos with the bundle's backbone, cluster them
inside their geocells and write `index.faiss`, `gallery.parquet` and `clusters.parquet`.

The three parts are written to a staging folder first and then moved into the bundle with
`Bundle.write_part` (atomic, hashed, with the cells' and backbone's hashes and one shared
`build_id` in the manifest): a build interrupted at any point leaves the previous index in place,
and parts from two different builds are refused on load. `--append` adds photos without
re-clustering; `remove_gallery_ids` (`--remove-ids FILE`) takes photos out.

The gallery rows keep the source's `url`, `source`, `license` and `author` when it has them
(`pigeon.core.provenance`): an answer asked with evidence shows them for the photos that decided it.

The gallery holds the rows with `split == "train"` (`--splits` to change it), so test photos never
enter it. Rows with `split == "val"` stay out of the gallery: they answer, once per refinement mode, to pick
the mode with the lowest median error, when it beats PIGEON's cluster+nn beyond bootstrap noise
(`choose_refinement`); the index part's manifest record keeps
the choice (`refine_mode`) and the per-mode figures (`refine_validation`), and the Predictor uses
that mode unless told otherwise.

Loading and saving the three parts lives in `pigeon.bundle_gallery`; serving-time refinement in
`pigeon.index.refine` (`RefineConfig`, `GalleryRefiner`), which the Predictor takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .bundle import Bundle
from .core.errors import UserError
from .core.splits import GALLERY_SPLITS, VAL, describe as describe_splits, normalise as normalise_splits, parse as parse_splits, select as select_splits
from .core.sphere import haversine_km
from .datasets.sources import open_source
from .embed import cached_embeddings, open_embeddings
from .embeddings import EmbeddingStore
from .bundle_gallery import has_gallery, load_gallery, save_gallery
from .index import GALLERY_SOURCE_COLUMNS, KINDS, Refiner, append_gallery, build_gallery, remove_from_gallery
from .index.refine import DEFAULT_MODE, MODES, RefineConfig
from .metrics import SWITCH_CONFIDENCE, choose_on_validation
from .loading import load_bundle

# -- choosing the refinement mode on validation photos -------------------------------------------
_TIE_ORDER = ("cluster+nn", "nn", "cluster", "none")  # ties go to PIGEON's mode first
VALIDATION_KEYS = ("refine_mode", "refine_validation")


def choose_refinement(refiner: Refiner, emb: np.ndarray, probs: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                      config: RefineConfig = RefineConfig(), confidence: float = SWITCH_CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Answer validation photos with every refinement mode (embeddings and probabilities computed once
    by the caller, one batched `Refiner.refine` per mode) and pick the lowest median km; ties go to
    PIGEON's cluster+nn. A mode other than cluster+nn is taken only when it beats cluster+nn's median
    in at least `confidence` of paired bootstrap resamples of the val photos: on a few dozen photos the
    lowest median is mostly noise (streetview_mini, 7 val places: `none` won 8 of 10 splits, and cost
    1.5 km median and 7 points within 1 km on the test photos; docs/benchmarks.md).
    Returns {"refine_mode", "refine_validation": {"n", "median_km", "within_25km", "beats_default_share"}}."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    km = {}
    for m in MODES:
        r = refiner.refine(emb, probs, mode=m, **config.refine_kwargs())
        km[m] = haversine_km(lat, lon, r.lat, r.lon)
    c = choose_on_validation(km, DEFAULT_MODE, _TIE_ORDER, seed, confidence)
    return {"refine_mode": c["choice"], "refine_validation": {"n": int(len(lat)), "median_km": c["median_km"], "within_25km": c["within_25km"],
                                                             "beats_default_share": c["beats_default_share"], "switch_confidence": confidence}}


# -- the command's functions ---------------------------------------------------------------------
def build_index(images: str | os.PathLike | None, bundle: str | os.PathLike, append: bool = False, kind: str = "flat",
                batch_size: int = 64, workers: int = 0, device: str = "cpu", progress: bool = True,
                validate: bool | None = None, embeddings: str | os.PathLike | None = None,
                cache_dir: str | None = None, splits: Sequence[str] | None = GALLERY_SPLITS, precision: str | None = None) -> dict[str, Any]:
    """Build (or, with `append`, extend) the bundle's gallery index from a data source's photos
    (`images`, embedded through the cache, so photos `train` embedded are not embedded again) or
    from an embedding folder (`embeddings`, made by `pigeon embed` with the bundle's backbone).

    The gallery holds the rows of `splits` (None: all); val rows outside them are held out. `validate`: None
    (default) answers those with each refinement mode and records the best when there are any (and the bundle
    has a head); True requires them; False skips the measurement (they are still held out). `precision`:
    the backbone forwards' when `images` are embedded (auto/None: bf16 on CUDA, fp32 on CPU); the report's
    `precision` is the embeddings' (the folder's header)."""
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more")
    if workers < 0:
        raise UserError(f"--workers {workers}: give 0 (decode in this process) or more")
    if images is None and embeddings is None:
        raise UserError("`pigeon build-index` needs --images SOURCE or --embeddings FOLDER")
    source = open_source(images) if embeddings is None else None
    parts = load_bundle(bundle, device=device, head="optional", gallery=False, precision=precision)
    b, bb, cells = parts.bundle, parts.backbone, parts.cells
    old = None
    if append:
        if not has_gallery(b):
            raise UserError(f"bundle {b.path} has no index to append to; run `pigeon build-index` without --append first")
        old = load_gallery(b, expect_backbone_hash=bb.hash)
    if source is None:
        store, skipped = open_embeddings(embeddings, backbone_hash=bb.hash), 0
    else:
        store, erep = cached_embeddings(source, bb, cache_dir, workers=workers, batch_size=batch_size, progress=progress)
        skipped = int(sum(erep["skipped"].values()))
    name = embeddings if source is None else images
    df, emb, val_df, val_emb, left_out = _hold_out_val(store, name, validate, splits)
    lat, lon = df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64)
    cell = np.asarray(cells.cell_of(lat, lon), np.int64)
    ids = _gallery_ids(df, old, name)
    image = df["image"].astype(str).to_numpy()
    source_cols = df[[c for c in GALLERY_SOURCE_COLUMNS if c in df.columns]]   # url, source, license, author when given
    if old is None:
        g = build_gallery(emb, ids, lat, lon, cell, image, kind=kind, progress=progress, source=source_cols)
    else:
        g = append_gallery(old, emb, ids, lat, lon, cell, image, source=source_cols)
    # an append without validation photos keeps the last validated choice
    chosen = {k: b.meta("index")[k] for k in VALIDATION_KEYS if k in b.meta("index")} if old is not None else {}
    note = None
    if len(val_df) and validate is not False:
        if parts.head is None:
            if validate:
                raise UserError(f"bundle {b.path}: cannot validate refinement: {parts.head_note}")
            note = parts.head_note
        else:
            probs = parts.head.cell_probs(val_emb)
            refiner = Refiner.from_index(np.asarray(cells.centres, np.float64), g.clusters, g.frame, g.index)
            chosen = choose_refinement(refiner, val_emb, probs, val_df["lat"].to_numpy(), val_df["lon"].to_numpy())
    build_id = save_gallery(b, g, bb.hash, index_meta=chosen, backbone_spec=bb.spec)
    rep = {"images": int(len(df)), "skipped": int(skipped), "total": int(g.index.ntotal), "clusters": len(g.clusters),
           "cells_used": int(np.unique(g.frame["cell"]).size), "kind": g.index.kind, "appended": bool(append),
           "build_id": build_id, "held_out_val": int(len(val_df)),
           "left_out_rows": left_out, "splits": describe_splits(parse_splits(splits)), "precision": store.precision, **chosen}
    if note:
        rep["validation_skipped"] = note
    return rep


def _store_frame(store: EmbeddingStore) -> pd.DataFrame:
    """image (the source key), lat, lon, split and (when the source has them) integer ids and the source
    columns (url, source, license, author), per store row."""
    rows = store.rows
    df = pd.DataFrame({"image": store.keys(), "lat": rows["lat"].to_numpy(np.float64), "lon": rows["lon"].to_numpy(np.float64),
                       "split": normalise_splits(rows["split"])})
    if "id" in rows.columns:
        df["id"] = rows["id"].to_numpy()
    src = store.source_columns()
    for c in src.columns:
        df[c] = src[c].array
    return df


def _hold_out_val(store: EmbeddingStore, images: Any, validate: bool | None,
                  splits: Sequence[str] | None) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray, int]:
    """(gallery rows, their embeddings, val rows, theirs, rows left out): the gallery holds the rows of
    `splits` (None: all), val rows not among them answer for the refinement mode, the rest (test) stay out."""
    df = _store_frame(store)
    keep = select_splits(df["split"], splits, f"data {images}")
    is_val = (normalise_splits(df["split"]) == VAL) & ~keep
    if validate and not is_val.any():
        raise UserError(f"data {images}: --validate needs rows with split val outside --splits (readable images); add a `split` column or drop --validate")
    g, v = np.flatnonzero(keep), np.flatnonzero(is_val)
    return (df.iloc[g].reset_index(drop=True), store.view(g), df.iloc[v].reset_index(drop=True), store.take(v),
            int(len(df) - len(g) - len(v)))


def _gallery_ids(df: pd.DataFrame, old: Any, images: Any) -> np.ndarray:
    """The manifest's integer `id` column, else ids counting on from the existing gallery's largest."""
    if "id" in df.columns:
        ids = df["id"].to_numpy()
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"manifest {images}: column `id` must hold integers (gallery ids); fix or drop it")
        return ids.astype(np.int64)
    start = int(old.frame["id"].max()) + 1 if old is not None and len(old.frame) else 0
    return np.arange(start, start + len(df), dtype=np.int64)


def read_id_file(path: str | os.PathLike) -> np.ndarray:
    """Gallery ids from a file: one integer a line, or a CSV/Parquet with an `id` column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"id file {path} does not exist; give a file with one gallery id a line")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)["id"].to_numpy(np.int64)
        text = path.read_text().split()
        if text and text[0].strip().lower() == "id":
            text = text[1:]
        return np.array([int(t.strip().strip(",")) for t in text if t.strip()], dtype=np.int64)
    except (ValueError, KeyError) as e:
        raise UserError(f"id file {path} is not a list of integer ids ({e}); one id a line, or an `id` column") from e


def remove_gallery_ids(bundle: str | os.PathLike, ids: np.ndarray) -> dict[str, Any]:
    """Take photos out of the bundle's gallery by id (index, gallery and clusters together, atomically)."""
    b = Bundle(bundle)
    g = load_gallery(b)
    g2, removed = remove_from_gallery(g, np.asarray(ids, np.int64))
    if removed:
        keep = {k: b.meta("index")[k] for k in VALIDATION_KEYS if k in b.meta("index")}  # last validated choice
        save_gallery(b, g2, b.meta("index").get("backbone_hash") or b.backbone_hash or "", index_meta=keep,
                     backbone_spec=b.meta("index").get("backbone_spec", b.backbone_spec))
    return {"removed": int(removed), "total": int(g2.index.ntotal), "clusters": len(g2.clusters)}
