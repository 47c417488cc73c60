"""Loading a bundle's parts, and the one check that they belong together.

Every command that reads a trained bundle (serve, locate, evaluate through `Predictor.from_bundle`;
build-index; train) loads its parts here, so a head trained with another backbone, for other cells
or for another embedding width is refused (or, where the head is optional, set aside) with the same
words everywhere. `check_head` is that rule; the Predictor's constructor calls it too. `check_recorded` holds the
manifest's recorded facts (n_cells, embed_dim, counts) to the parts it loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .backbones import Backbone, backbone_from_bundle, check_device
from .backbones.precision import resolve_precision
from .bundle import MANIFEST, PART_FILES, Bundle
from .core.errors import UserError
from .bundle_gallery import GALLERY_PARTS, load_gallery
from .geocells import GeoCells
from .head import PrototypeHead
from .index import Gallery

RETRAIN = "retrain it with `pigeon train`"


def check_head(head: PrototypeHead, backbone: Any, n_cells: int, trained_with: str | None = None) -> str | None:
    """Why `head` cannot answer for `backbone`'s embeddings over `n_cells` cells (None when it can):
    another backbone (`trained_with`, the hash recorded for the head), another width, other cells.
    `backbone` None (a Predictor over embeddings only): the cells alone are checked."""
    if backbone is not None and trained_with and trained_with != backbone.hash:
        return f"head.safetensors was trained with another backbone (hash {trained_with[:12]} vs {backbone.hash[:12]})"
    if backbone is not None and head.embed_dim != backbone.embed_dim:
        return f"head.safetensors expects {head.embed_dim}-d embeddings, backbone {backbone.spec} gives {backbone.embed_dim}"
    if head.n_cells != n_cells:
        return f"head.safetensors has {head.n_cells} prototypes but the bundle has {n_cells} cells"
    return None


def check_recorded(bundle: Bundle, cells: GeoCells | None = None, head: PrototypeHead | None = None,
                   gallery: Gallery | None = None) -> None:
    """Refuse, by part and field, a manifest whose recorded facts are not those of the parts it
    describes: the cells' and the head's `n_cells`, the head's `embed_dim`, the index's `dim` and the
    gallery parts' `count` (and `n_clusters`). A manifest that misstates them describes another
    bundle; a record without the field is not checked (written before it was recorded)."""
    facts: list[tuple[str, str, int]] = []
    if cells is not None:
        facts.append(("cells", "n_cells", len(cells)))
    if head is not None:
        facts += [("head", "n_cells", head.n_cells), ("head", "embed_dim", head.embed_dim)]
    if gallery is not None:
        n = int(gallery.index.ntotal)
        facts += [("index", "count", n), ("index", "dim", int(gallery.index.dim)), ("gallery", "count", len(gallery.frame)),
                  ("clusters", "count", n), ("clusters", "n_clusters", len(gallery.clusters))]
    for part, key, actual in facts:
        said = bundle.meta(part).get(key)
        if said is None:
            continue
        if isinstance(said, bool) or not isinstance(said, int) or said != actual:
            raise UserError(f"bundle {bundle.path}: {MANIFEST} says {PART_FILES[part]} has {key} {said!r}, but the file holds {actual}; "
                            f"the manifest describes other parts: restore it, or rebuild the bundle")


def load_cells(bundle: Bundle) -> GeoCells:
    """The bundle's cells (refused by name when missing)."""
    bundle.require("cells")
    return GeoCells.load(bundle.part_path("cells"))


@dataclass
class LoadedBundle:
    """A bundle's parts, checked against each other. `head_note`: why an optional head was set aside."""

    bundle: Bundle
    cells: GeoCells
    backbone: Backbone
    head: PrototypeHead | None = None
    gallery: Gallery | None = None
    head_note: str | None = None


def load_bundle(path: str | os.PathLike | Bundle, device: str = "cpu", *, head: str = "required", gallery: bool = True,
                verify: bool = False, mmap: bool = True, precision: str | None = None) -> LoadedBundle:
    """Cells, backbone, head and gallery of a bundle, refusing parts that do not belong together.

    head: "required" (missing or mismatched: refused), "optional" (missing or mismatched: None, and
    `head_note` says why), "no" (not loaded). gallery: load the index when the bundle lists one
    (`mmap`: read-only, shared by workers). verify: every listed part against its sha256 first.
    precision: the backbone's inference precision (auto/None, fp32, bf16, fp16), refused before anything loads."""
    resolve_precision(precision, check_device(device))
    b = path if isinstance(path, Bundle) else Bundle(path)
    b.require("cells", *(("head",) if head == "required" else ()))
    if verify:
        b.verify()  # every listed part against its sha256: a missing or changed part is refused by name
    cells = load_cells(b)
    check_recorded(b, cells=cells)
    bb = backbone_from_bundle(b, device=device, precision=precision)
    out = LoadedBundle(b, cells, bb)
    if head != "no":
        if not b.has("head"):
            out.head_note = "the bundle has no head.safetensors (run `pigeon train` first)"
        else:
            h = PrototypeHead.load(b.part_path("head"))
            check_recorded(b, head=h)  # a manifest that misstates the head is damaged, even where the head is optional
            why = check_head(h, bb, len(cells), b.meta("head").get("backbone_hash"))
            if why and head == "required":
                raise UserError(f"bundle {b.path}: {why}; {RETRAIN}")
            out.head, out.head_note = (None, why) if why else (h.to(device), None)
    if gallery and any(b.listed(p) for p in GALLERY_PARTS):
        out.gallery = load_gallery(b, mmap=mmap)
        check_recorded(b, gallery=out.gallery)
        if out.gallery.index.dim != bb.embed_dim:
            raise UserError(f"bundle {b.path}: index.faiss holds {out.gallery.index.dim}-d vectors, backbone {bb.spec} gives {bb.embed_dim}; "
                            f"rerun `pigeon build-index`")
    return out


__all__ = ["LoadedBundle", "check_head", "check_recorded", "load_bundle", "load_cells"]
