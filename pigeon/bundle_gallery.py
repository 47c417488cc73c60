"""The gallery's side of a bundle: `index.faiss`, `gallery.parquet` and `clusters.parquet`, loaded
and saved together (model layer: it knows the `Bundle`, which `pigeon.index` does not).

The three parts are written into a fresh version folder and switched to with one manifest rename
(`Bundle.write_parts`: hashed, with the cells' and backbone's hashes and one shared `build_id`);
parts from two different builds are refused on load.
"""

from __future__ import annotations

import uuid
from typing import Any

from .bundle import Bundle
from .core.errors import FieldError, UserError
from .index import ClusterTable, Gallery, GeoIndex, read_gallery_frame, write_gallery_frame
from .index.refine import check_mode

GALLERY_PARTS = ("index", "gallery", "clusters")


def has_gallery(bundle: Bundle | None) -> bool:
    """Whether the bundle lists all three gallery parts."""
    return bundle is not None and all(bundle.has(p) for p in GALLERY_PARTS)


def recorded_refine_mode(bundle: Bundle | None) -> str | None:
    """The refinement mode `pigeon build-index` validated for this bundle's gallery (None when none);
    an unknown recorded mode is refused by name."""
    mode = bundle.meta("index").get("refine_mode") if bundle is not None and bundle.listed("index") else None
    try:
        return None if mode is None else check_mode(mode)
    except FieldError as e:
        raise UserError(f"bundle {bundle.path}: the index record names refinement {e.field} {mode!r} ({e.why}); "
                        f"rerun `pigeon build-index` or fix manifest.json") from None


def load_gallery(bundle: Bundle, expect_backbone_hash: str | None = None, mmap: bool = False) -> Gallery:
    """The bundle's gallery (index.Gallery), refusing parts built on other cells / another backbone,
    or left from two different builds. `mmap`: the index's vectors stay in the file, mapped read-only,
    so several server processes share one copy in the page cache (serving never changes the index)."""
    bundle.require("cells", *GALLERY_PARTS)
    bundle.verify(*GALLERY_PARTS)
    metas = {p: bundle.meta(p) for p in GALLERY_PARTS}
    builds = {m.get("build_id") for m in metas.values()}
    if len(builds) != 1:
        raise UserError(f"bundle {bundle.path}: index.faiss, gallery.parquet and clusters.parquet come from different builds (an interrupted `pigeon build-index`?); rerun `pigeon build-index`")
    want_b = expect_backbone_hash or bundle.backbone_hash
    idx = GeoIndex.load(bundle.part_path("index"), expect_backbone_hash=want_b, expect_cells_hash=bundle.cells_hash,
                        meta=metas["index"], mmap=mmap)
    frame = read_gallery_frame(bundle.part_path("gallery"))
    clusters = ClusterTable.read(bundle.part_path("clusters"))
    if len(frame) != idx.ntotal:
        raise UserError(f"bundle {bundle.path}: gallery.parquet lists {len(frame)} images but index.faiss holds {idx.ntotal}; rerun `pigeon build-index`")
    return Gallery(idx, frame, clusters)


def save_gallery(bundle: Bundle, gallery: Gallery, backbone_hash: str, index_meta: dict[str, Any] | None = None, **meta: Any) -> str:
    """Write the three parts into a fresh version folder and switch to them with one manifest rename
    (`Bundle.write_parts`): a kill at any point leaves the previous gallery loadable. Returns the build id.
    `index_meta` goes only into the index part's record (e.g. the validated refinement mode)."""
    build_id = uuid.uuid4().hex
    common = dict(cells_hash=bundle.cells_hash, backbone_hash=backbone_hash, build_id=build_id, count=int(gallery.index.ntotal), **meta)
    writers = {"index": gallery.index.write, "gallery": lambda p: write_gallery_frame(gallery.frame, p), "clusters": gallery.clusters.write}
    metas = {"index": {"kind": gallery.index.kind, "dim": gallery.index.dim, **(index_meta or {})},
             "gallery": {}, "clusters": {"n_clusters": len(gallery.clusters)}}
    bundle.write_parts(writers, metas, **common)
    return build_id
