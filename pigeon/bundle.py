"""The model bundle: one folder holding every part of a trained pigeon, with a manifest that ties them.

Parts: `cells.parquet`, `backbone.safetensors` (only when fine-tuned), `head.safetensors`,
`index.faiss`, `gallery.parquet`, `clusters.parquet`. `manifest.json` records, for each part, its
content hash, what built it, and the hashes of the parts it depends on (`cells`, `backbone`), so a
head trained on other cells or an index built with another backbone is refused by name.
Every write is atomic (temp file, then rename).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from pigeon.core.io import atomic_path

from .core.errors import UserError

MANIFEST = "manifest.json"
PART_FILES = {
    "cells": "cells.parquet",
    "backbone": "backbone.safetensors",
    "head": "head.safetensors",
    "index": "index.faiss",
    "gallery": "gallery.parquet",
    "clusters": "clusters.parquet",
}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pigeon-geo")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


class Bundle:
    """A bundle folder and its manifest. Parts are written with `write_part` and checked with `require`."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise UserError(f"bundle folder {self.path} does not exist; build one with `pigeon build-cells --out {self.path}/cells.parquet` first")
            self.path.mkdir(parents=True)
        elif not self.path.is_dir():
            raise UserError(f"bundle path {self.path} is a file, not a folder; give a folder")
        mpath = self.path / MANIFEST
        if mpath.exists():
            try:
                self.manifest: dict[str, Any] = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"bundle manifest {mpath} is unreadable ({e}); rebuild the bundle or remove the file") from e
        else:
            self.manifest = {"format": 1, "pigeon_version": _version(), "backbone": None, "parts": {}}

    # -- reading -----------------------------------------------------------------------------
    def part_path(self, part: str) -> Path:
        return self.path / PART_FILES[part]

    def has(self, part: str) -> bool:
        return part in self.manifest["parts"] and self.part_path(part).exists()

    def meta(self, part: str) -> dict[str, Any]:
        return self.manifest["parts"].get(part, {})

    @property
    def backbone_spec(self) -> str | None:
        b = self.manifest.get("backbone")
        return b["spec"] if b else None

    @property
    def backbone_hash(self) -> str | None:
        b = self.manifest.get("backbone")
        return b["hash"] if b else None

    @property
    def cells_hash(self) -> str | None:
        return self.meta("cells").get("sha256")

    def require(self, *parts: str) -> None:
        """Refuse a bundle that lacks a part or whose parts do not belong together; name the part and why."""
        for p in parts:
            if not self.has(p):
                raise UserError(f"bundle {self.path} has no {PART_FILES[p]}; {_HOW_TO_BUILD[p]}")
        for p in parts:
            m = self.meta(p)
            if "cells_hash" in m and self.cells_hash and m["cells_hash"] != self.cells_hash:
                raise UserError(f"bundle {self.path}: {PART_FILES[p]} was built on other cells than cells.parquet (cells hash {m['cells_hash'][:12]} vs {self.cells_hash[:12]}); rebuild it: {_HOW_TO_BUILD[p]}")
            if "backbone_hash" in m and self.backbone_hash and m["backbone_hash"] != self.backbone_hash:
                raise UserError(f"bundle {self.path}: {PART_FILES[p]} was built with another backbone (hash {m['backbone_hash'][:12]} vs {self.backbone_hash[:12]}, spec {self.backbone_spec}); rebuild it: {_HOW_TO_BUILD[p]}")

    # -- writing -----------------------------------------------------------------------------
    def set_backbone(self, spec: str, backbone_hash: str) -> None:
        self.manifest["backbone"] = {"spec": spec, "hash": backbone_hash}
        self.save_manifest()

    def write_part(self, part: str, writer: Callable[[Path], None], **meta: Any) -> Path:
        """Write a part atomically with `writer(tmp_path)`, then record its hash and `meta` in the manifest."""
        dest = self.part_path(part)
        with atomic_path(dest) as tmp:
            writer(tmp)
            digest = file_sha256(tmp)
        self.manifest["parts"][part] = {
            "file": dest.name,
            "sha256": digest,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "pigeon_version": _version(),
            **meta,
        }
        self.save_manifest()
        return dest

    def save_manifest(self) -> None:
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))


_HOW_TO_BUILD = {
    "cells": "run `pigeon build-cells --points FILE --out BUNDLE/cells.parquet`",
    "backbone": "run `pigeon pretrain --bundle BUNDLE ...` (or leave it out to use the stock backbone)",
    "head": "run `pigeon train --bundle BUNDLE --data MANIFEST` (or `pigeon train --zero-shot`)",
    "index": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
    "gallery": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
    "clusters": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
}
