"""`pigeon build-index`: embed a gallery of located photos with the bundle's backbone, cluster them
inside their geocells and write `index.faiss`, `gallery.parquet` and `clusters.parquet`.

The three parts are written to a staging folder first and then moved into the bundle with
`Bundle.write_part` (atomic, hashed, with the cells' and backbone's hashes and one shared
`build_id` in the manifest): a build interrupted at any point leaves the previous index in place,
and parts from two different builds are refused on load. `--append` adds photos without
re-clustering; `remove_gallery_ids` (`--remove-ids FILE`) takes photos out.

Rows with `split == "val"` stay out of the gallery: they answer, once per refinement mode, to pick
the mode with the lowest median error (`choose_refinement`); the index part's manifest record keeps
the choice (`refine_mode`) and the per-mode figures (`refine_validation`), and the Predictor uses
that mode unless told otherwise.

`refine_answers` is what the Predictor calls to refine its answers with the gallery.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

GALLERY_PARTS = ("index", "gallery", "clusters")


# -- embedding -----------------------------------------------------------------------------------
def embed_manifest(backbone: Any, df, batch_size: int = 64, workers: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (n_ok, D) of the manifest's images in batches with DataLoader workers, and the rows
    they belong to (unreadable images are skipped and reported, not fatal)."""
    import torch
    from torch.utils.data import DataLoader

    from .datasets import ImageDataset

    ds = ImageDataset(df, backbone.preprocess)
    dl = DataLoader(ds, batch_size=int(batch_size), num_workers=int(workers), collate_fn=ImageDataset.collate,
                    shuffle=False, persistent_workers=False)
    embs, rows = [], []
    it = dl
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(dl, desc="embed gallery", unit="batch")
    model = backbone.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in it:
                if batch is None:
                    continue
                x, idx = batch
                f = backbone.encode_image(x.float(), normalize=True)
                embs.append(f.float().cpu().numpy())
                rows.append(idx.numpy())
    finally:
        model.train(was)
    if not embs:
        raise UserError("no gallery image could be read; check the manifest's `image` column")
    return np.concatenate(embs).astype(np.float32), np.concatenate(rows).astype(np.int64)


# -- bundle I/O ----------------------------------------------------------------------------------
def load_gallery(bundle: Any, expect_backbone_hash: str | None = None):
    """The bundle's gallery (index.Gallery), refusing parts built on other cells / another backbone,
    or left from two different builds."""
    from index import ClusterTable, Gallery, GeoIndex, read_gallery_frame

    bundle.require("cells", *GALLERY_PARTS)
    metas = {p: bundle.meta(p) for p in GALLERY_PARTS}
    builds = {m.get("build_id") for m in metas.values()}
    if len(builds) != 1:
        raise UserError(f"bundle {bundle.path}: index.faiss, gallery.parquet and clusters.parquet come from different builds (an interrupted `pigeon build-index`?); rerun `pigeon build-index`")
    want_b = expect_backbone_hash or bundle.backbone_hash
    idx = GeoIndex.load(bundle.part_path("index"), expect_backbone_hash=want_b, expect_cells_hash=bundle.cells_hash,
                        meta=metas["index"])
    frame = read_gallery_frame(bundle.part_path("gallery"))
    clusters = ClusterTable.read(bundle.part_path("clusters"))
    if len(frame) != idx.ntotal:
        raise UserError(f"bundle {bundle.path}: gallery.parquet lists {len(frame)} images but index.faiss holds {idx.ntotal}; rerun `pigeon build-index`")
    return Gallery(idx, frame, clusters)


def save_gallery(bundle: Any, gallery: Any, backbone_hash: str, index_meta: dict[str, Any] | None = None, **meta: Any) -> str:
    """Write the three parts atomically (staged, then moved in by `Bundle.write_part`); returns the build id.
    `index_meta` goes only into the index part's record (e.g. the validated refinement mode)."""
    from index import write_gallery_frame

    build_id = uuid.uuid4().hex
    common = dict(cells_hash=bundle.cells_hash, backbone_hash=backbone_hash, build_id=build_id, count=int(gallery.index.ntotal))
    stage = Path(tempfile.mkdtemp(prefix=".build-index.", dir=bundle.path))
    try:
        # everything slow (writing 2 GB of vectors, parquet encoding) happens here, away from the bundle
        staged = {"index": stage / "index.faiss", "gallery": stage / "gallery.parquet", "clusters": stage / "clusters.parquet"}
        gallery.index.write(staged["index"])
        write_gallery_frame(gallery.frame, staged["gallery"])
        gallery.clusters.write(staged["clusters"])
        extra = {"index": {"kind": gallery.index.kind, "dim": gallery.index.dim, **(index_meta or {})},
                 "gallery": {}, "clusters": {"n_clusters": len(gallery.clusters)}}
        for part in ("gallery", "clusters", "index"):
            bundle.write_part(part, lambda tmp, src=staged[part]: os.replace(src, tmp), **common, **extra[part], **meta)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return build_id


# -- choosing the refinement mode on validation photos -------------------------------------------
DEFAULT_REFINE_MODE = "cluster+nn"  # PIGEON's
_TIE_ORDER = ("cluster+nn", "nn", "cluster", "none")  # ties go to PIGEON's mode first
VALIDATION_KEYS = ("refine_mode", "refine_validation")


def choose_refinement(refiner: Any, emb: np.ndarray, probs: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                      temperature: float = 1.6, max_refinement_km: float | None = 1000.0) -> dict[str, Any]:
    """Answer validation photos with every refinement mode (embeddings and probabilities computed once
    by the caller, one batched `Refiner.refine` per mode) and pick the lowest median km; ties go to
    PIGEON's cluster+nn. Returns {"refine_mode", "refine_validation": {"n", "median_km", "within_25km"}}."""
    from geocells.sphere import haversine_km
    from index.refine import MODES

    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    median, within = {}, {}
    for m in MODES:
        r = refiner.refine(emb, probs, mode=m, temperature=temperature, max_refinement_km=max_refinement_km)
        km = haversine_km(lat, lon, r.lat, r.lon)
        median[m], within[m] = float(np.median(km)), float(np.mean(km <= 25.0))
    best = min(median.values())
    mode = next(m for m in _TIE_ORDER if median[m] <= best + 1e-9)
    return {"refine_mode": mode, "refine_validation": {"n": int(len(lat)), "median_km": median, "within_25km": within}}


def _validation_probs(b: Any, cells: Any, bb: Any, emb: np.ndarray) -> np.ndarray | str:
    """Cell probabilities of validation embeddings from the bundle's head, or why there are none."""
    from .head import PrototypeHead
    from .predictor import Predictor

    if not b.has("head"):
        return "the bundle has no head.safetensors (run `pigeon train` first)"
    want = b.meta("head").get("backbone_hash")
    if want and want != bb.hash:
        return "head.safetensors was trained with another backbone"
    head = PrototypeHead.load(b.part_path("head"))
    if head.embed_dim != bb.embed_dim or head.n_cells != len(cells):
        return "head.safetensors does not match the bundle's backbone or cells"
    return Predictor(cells, head, bb).cell_probs(emb)


def recorded_refine_mode(bundle: Any) -> str:
    """The refinement mode `pigeon build-index` validated for this bundle's gallery, else PIGEON's."""
    from index.refine import MODES

    mode = bundle.meta("index").get("refine_mode") if bundle is not None and bundle.has("index") else None
    return mode if mode in MODES else DEFAULT_REFINE_MODE


# -- the command's functions ---------------------------------------------------------------------
def build_index(images: str | os.PathLike, bundle: str | os.PathLike, append: bool = False, kind: str = "flat",
                batch_size: int = 64, workers: int = 0, device: str = "cpu", progress: bool = True,
                validate: bool | None = None) -> dict[str, Any]:
    """Embed a manifest's photos and build (or, with `append`, extend) the bundle's gallery index.

    Rows with split == "val" are held out of the gallery. `validate`: None (default) answers them with
    each refinement mode and records the best when there are any (and the bundle has a head); True
    requires them; False skips the measurement (they are still held out)."""
    from geocells import GeoCells
    from index import KINDS, append_gallery, build_gallery

    from .backbones import backbone_from_bundle
    from .bundle import Bundle
    from .datasets import read_manifest

    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    b = Bundle(bundle)
    b.require("cells")
    df = read_manifest(images)
    bb = backbone_from_bundle(b, device=device)
    old = None
    if append:
        if not all(b.has(p) for p in GALLERY_PARTS):
            raise UserError(f"bundle {b.path} has no index to append to; run `pigeon build-index` without --append first")
        old = load_gallery(b, expect_backbone_hash=bb.hash)
    cells = GeoCells.load(b.part_path("cells"))
    emb, rows = embed_manifest(bb, df, batch_size=batch_size, workers=workers, progress=progress)
    skipped = len(df) - len(rows)
    df = df.iloc[rows].reset_index(drop=True)
    is_val = (df["split"] == "val").to_numpy() if "split" in df.columns else np.zeros(len(df), bool)
    if validate and not is_val.any():
        raise UserError(f"manifest {images}: --validate needs rows with split == \"val\" (readable images); add a `split` column or drop --validate")
    if is_val.all():
        raise UserError(f"manifest {images}: every row has split == \"val\", so none is left for the gallery; mark gallery rows `train`")
    val_df, val_emb = df[is_val].reset_index(drop=True), emb[is_val]
    df, emb = df[~is_val].reset_index(drop=True), emb[~is_val]
    lat, lon = df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64)
    cell = np.asarray(cells.cell_of(lat, lon), np.int64)
    if "id" in df.columns:
        ids = df["id"].to_numpy()
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"manifest {images}: column `id` must hold integers (gallery ids); fix or drop it")
        ids = ids.astype(np.int64)
    else:
        start = int(old.frame["id"].max()) + 1 if old is not None and len(old.frame) else 0
        ids = np.arange(start, start + len(df), dtype=np.int64)
    image = df["image"].astype(str).to_numpy()
    if old is None:
        g = build_gallery(emb, ids, lat, lon, cell, image, kind=kind, progress=progress)
    else:
        g = append_gallery(old, emb, ids, lat, lon, cell, image)
    chosen: dict[str, Any] = {}
    note = None
    if old is not None:  # an append without validation photos keeps the last validated choice
        chosen = {k: b.meta("index")[k] for k in VALIDATION_KEYS if k in b.meta("index")}
    if len(val_df) and validate is not False:
        probs = _validation_probs(b, cells, bb, val_emb)
        if isinstance(probs, str):
            if validate:
                raise UserError(f"bundle {b.path}: cannot validate refinement: {probs}")
            note = probs
        else:
            from index import Refiner

            refiner = Refiner.from_index(np.asarray(cells.centres, np.float64), g.clusters, g.frame, g.index)
            chosen = choose_refinement(refiner, val_emb, probs, val_df["lat"].to_numpy(), val_df["lon"].to_numpy())
    build_id = save_gallery(b, g, bb.hash, index_meta=chosen, backbone_spec=bb.spec)
    rep = {"images": int(len(df)), "skipped": int(skipped), "total": int(g.index.ntotal), "clusters": len(g.clusters),
           "cells_used": int(np.unique(g.frame["cell"]).size), "kind": g.index.kind, "appended": bool(append),
           "build_id": build_id, "held_out_val": int(len(val_df)), **chosen}
    if note:
        rep["validation_skipped"] = note
    return rep


def read_id_file(path: str | os.PathLike) -> np.ndarray:
    """Gallery ids from a file: one integer a line, or a CSV/Parquet with an `id` column."""
    import pandas as pd

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
    from index import remove_from_gallery

    from .bundle import Bundle

    b = Bundle(bundle)
    g = load_gallery(b)
    g2, removed = remove_from_gallery(g, np.asarray(ids, np.int64))
    if removed:
        keep = {k: b.meta("index")[k] for k in VALIDATION_KEYS if k in b.meta("index")}  # last validated choice
        save_gallery(b, g2, b.meta("index").get("backbone_hash") or b.backbone_hash or "", index_meta=keep,
                     backbone_spec=b.meta("index").get("backbone_spec", b.backbone_spec))
    return {"removed": int(removed), "total": int(g2.index.ntotal), "clusters": len(g2.clusters)}


# -- serving: the Predictor's refinement ---------------------------------------------------------
def gallery_refiner(bundle: Any, centres: np.ndarray):
    """An `index.Refiner` over the bundle's gallery, or None when the bundle has no index."""
    from index import Refiner

    if bundle is None or not all(bundle.has(p) for p in GALLERY_PARTS):
        return None
    g = load_gallery(bundle)
    return Refiner.from_index(centres, g.clusters, g.frame, g.index), g


def check_refinement(mode: str | None = None, max_refinement_km: float | None = None) -> None:
    """Refuse an unknown refinement mode or a guard distance that is not > 0 km (inf = no guard)."""
    from index.refine import MODES

    if mode is not None and mode not in MODES:
        raise UserError(f"--refine {mode}: use one of {', '.join(MODES)}")
    if max_refinement_km is not None and not float(max_refinement_km) > 0:
        raise UserError(f"--max-refinement-km {max_refinement_km}: give a distance > 0 km (inf turns the guard off)")


def set_refinement(predictor: Any, mode: str | None = None, max_refinement_km: float | None = None) -> None:
    """Set the Predictor's refinement options (`pigeon locate/serve --refine --max-refinement-km`);
    None leaves an option as it is; max_refinement_km = inf turns PIGEON's guard off."""
    check_refinement(mode, max_refinement_km)
    if mode is not None:
        predictor.refine_mode = mode
    if max_refinement_km is not None:
        km = float(max_refinement_km)
        predictor.max_refinement_km = None if np.isinf(km) else km


def refine_answers(predictor: Any, emb: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The Predictor's answer points: PIGEON refinement over the bundle's gallery when it has one,
    else the top cell's centre (reported as mode "cell", as is a refinement that fell back to it). Options are read from the predictor: `refine_mode` (the
    bundle's validated `refine_mode`, else "cluster+nn"; also "none", "cluster", "nn"), `refine_temperature` (1.6), `max_refinement_km` (1000),
    `refine_neighbours` (5), `refine_average` (1)."""
    cache = predictor.gallery
    mode = predictor.refine_mode
    if cache is None or mode == "none":
        top = probs.argmax(axis=1)
        ref = [{"mode": "cell", "moved_km": 0.0, "cluster": -1, "cell": int(c), "neighbours": []} for c in top]
        return predictor.centres[top, 0].copy(), predictor.centres[top, 1].copy(), ref
    refiner, g = cache
    r = refiner.refine(emb, probs, mode=mode, temperature=predictor.refine_temperature,
                       max_refinement_km=predictor.max_refinement_km,
                       neighbours=predictor.refine_neighbours, average=predictor.refine_average)
    ids = r.neighbour_ids
    valid = ids >= 0
    rows = r.neighbour_rows[valid]  # rows of the gallery frame: no per-call pandas index
    nb_lat = np.full(ids.shape, np.nan)
    nb_lon = np.full(ids.shape, np.nan)
    nb_img = np.full(ids.shape, "", dtype=object)
    nb_lat[valid], nb_lon[valid] = g.frame["lat"].to_numpy()[rows], g.frame["lon"].to_numpy()[rows]
    nb_img[valid] = g.frame["image"].to_numpy()[rows] if "image" in g.frame else ""
    out = []
    for i in range(len(ids)):  # building the JSON-ready answer, not a distance computation
        nbs = [{"id": int(ids[i, j]), "similarity": float(r.neighbour_sims[i, j]), "lat": float(nb_lat[i, j]),
                "lon": float(nb_lon[i, j]), "image": str(nb_img[i, j])} for j in np.flatnonzero(valid[i])]
        out.append({"mode": "cell" if r.mode[i] == "none" else str(r.mode[i]), "moved_km": float(r.moved_km[i]), "cluster": int(r.cluster_id[i]),
                    "cell": int(r.cell[i]), "neighbours": nbs})
    return r.lat, r.lon, out
