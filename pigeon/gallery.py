"""The gallery's side of a bundle: `index.faiss`, `gallery.parquet` and `clusters.parquet`, loaded
and saved together (model layer: it knows the `Bundle`, which `pigeon.index` does not).

The three parts are written to a staging folder first and then moved into the bundle with
`Bundle.write_part` (atomic, hashed, with the cells' and backbone's hashes and one shared `build_id`
in the manifest); parts from two different builds are refused on load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .core.errors import UserError
from .index import ClusterTable, Gallery, GeoIndex, read_gallery_frame, write_gallery_frame
from .index.refine import MODES

GALLERY_PARTS = ("index", "gallery", "clusters")


def has_gallery(bundle: Bundle | None) -> bool:
    """Whether the bundle lists all three gallery parts."""
    return bundle is not None and all(bundle.has(p) for p in GALLERY_PARTS)


def recorded_refine_mode(bundle: Bundle | None) -> str | None:
    """The refinement mode `pigeon build-index` validated for this bundle's gallery (None when none)."""
    mode = bundle.meta("index").get("refine_mode") if bundle is not None and bundle.has("index") else None
    return mode if mode in MODES else None


def load_gallery(bundle: Bundle, expect_backbone_hash: str | None = None) -> Gallery:
    """The bundle's gallery (index.Gallery), refusing parts built on other cells / another backbone,
    or left from two different builds."""
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


def save_gallery(bundle: Bundle, gallery: Gallery, backbone_hash: str, index_meta: dict[str, Any] | None = None, **meta: Any) -> str:
    """Write the three parts atomically (staged, then moved in by `Bundle.write_part`); returns the build id.
    `index_meta` goes only into the index part's record (e.g. the validated refinement mode)."""
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
