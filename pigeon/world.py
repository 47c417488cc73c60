"""`pigeon world`: a ready zero-shot bundle over the whole Earth, with no training data.

The bundle holds the bundled world cells (`pigeon.geocells.bundled.world_cells()`: built from the 100K
MP-16 photo locations, one cell per admin-1 region with enough photos, no cell across a border, every
country at least one cell), the backbone spec (and fine-tuned weights when they come from a `pigeon
pretrain` bundle), and a text head: each cell's prototype is the prompt ensemble of its captions
(`pigeon.head.ZERO_SHOT_TEMPLATES`, CLIP's zero-shot recipe). No gallery: refinement is off and the
answer is the top cell's centre. The folder is written beside `out` and renamed into place, so a
reader never sees half a bundle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .backbones import Backbone, backbone_from_bundle, create_backbone
from .bundle import Bundle
from .core.errors import UserError
from .geocells import GeoCells, bundled
from .head import PrototypeHead, choose_templates, text_prototypes, write_head, zero_shot_scale

DEFAULT_TEMPLATES = "all"


def build_world(out: str | os.PathLike, backbone: str | Backbone | None = "lite", templates: int | str | None = DEFAULT_TEMPLATES,
                device: str = "cpu", force: bool = False, pretrained: str | os.PathLike | None = None,
                cells: GeoCells | None = None) -> dict[str, Any]:
    """Write a zero-shot world bundle into `out` and return a summary.

    backbone: a spec (`lite`, `hf:geolocal/StreetCLIP`, `open_clip:ViT-L-14:openai`, ...), or a loaded
    `Backbone`; or None with `pretrained`, a bundle from `pigeon pretrain` whose backbone (spec and tuned
    weights) is taken. A loaded backbone given with `pretrained` must carry that bundle's weights (same
    hash); they are written into the new bundle.
    templates: how many of the prompt templates to ensemble (1 = the single caption, 'all').
    force: replace a non-empty `out` (else refused). cells: other cells than the bundled world cells."""
    out = Path(out)
    chosen = choose_templates(templates)
    _check_out(out, force)
    bb = _backbone(backbone, pretrained, device)
    source = "given" if cells is not None else "bundled world cells (MP-16 100K locations)"
    cells = cells if cells is not None else bundled.world_cells()
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"  # beside out: the final rename stays on one file system
    try:
        tmp.mkdir()
        _write_bundle(tmp, cells, source, bb, chosen, pretrained is not None)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bundle": str(out), "n_cells": len(cells), "countries": int(cells.gdf["adm0_a3"].nunique()),
            "backbone": bb.spec, "embed_dim": bb.embed_dim, "templates": len(chosen), "tuned_backbone": pretrained is not None}


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before any slow work, an `out` that is a file or a non-empty folder (unless `force`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; give a new folder, or --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.check"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"--out {out}: cannot make its folder ({e.strerror or e}); give a writable location") from e


def _backbone(spec: str | Backbone | None, pretrained: str | os.PathLike | None, device: str) -> Backbone:
    """The backbone from its spec, or (spec and tuned weights) from a `pigeon pretrain` bundle."""
    if pretrained is None:
        return spec if isinstance(spec, Backbone) else create_backbone(spec or "lite", device=device)
    src = Bundle(pretrained)
    if isinstance(spec, Backbone):
        if spec.hash != src.backbone_hash:
            raise UserError(f"the backbone given does not carry the weights of --pretrained {pretrained} (hash {spec.hash[:12]} vs {str(src.backbone_hash)[:12]}); load it with backbone_from_bundle")
        return spec
    if not src.has("backbone"):
        raise UserError(f"--pretrained {pretrained} holds no backbone.safetensors; give the --out folder of `pigeon pretrain`")
    if spec is not None and spec != src.backbone_spec:
        raise UserError(f"--pretrained {pretrained} was tuned from {src.backbone_spec!r}, not {spec!r}; drop --backbone or give the matching spec")
    src.verify("backbone")
    return backbone_from_bundle(src, device=device)


def _write_bundle(path: Path, cells: GeoCells, source: str, bb: Backbone, templates: tuple[tuple[str, str], ...], tuned: bool) -> None:
    """cells.parquet, the backbone (spec; weights too when tuned) and the ensemble text head, no gallery."""
    b = Bundle(path, create=True)
    b.write_part("cells", cells.save, source=source, n_cells=len(cells))
    if tuned:
        b.write_part("backbone", bb.save_weights, base_spec=bb.spec, backbone_hash=bb.hash)
    b.set_backbone(bb.spec, bb.hash)
    protos = text_prototypes(bb, cells.gdf, templates=templates)
    head = PrototypeHead(protos, scale=zero_shot_scale(bb))
    write_head(b, head, bb.hash, init="text", trained="false", zero_shot="world", templates=len(templates))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle to `out`; an existing `out` (with --force) is moved aside first and
    removed only once the new bundle is in place, so a crash leaves one of the two whole."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


__all__ = ["DEFAULT_TEMPLATES", "build_world"]
