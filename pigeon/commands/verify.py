"""`pigeon verify`: hash every part of a bundle against its manifest, ignoring the (size, mtime) cache."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from pigeon.core.errors import UserError


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Every part the manifest lists, hashed in full and checked against its sha256 (a missing, changed
    or misnamed part: UserError naming it). Returns a summary: the parts with their files and sizes."""
    from pigeon.bundle import MANIFEST, Bundle

    t0 = time.perf_counter()
    b = Bundle(path)  # the manifest and every part's path checked here
    if not b.has_manifest:
        raise UserError(f"bundle {b.path} has no {MANIFEST}; there is nothing to verify against: restore it, or rebuild the bundle")
    b.verify(full=True)
    parts = {p: {"file": b.part_path(p).relative_to(b.path).as_posix(), "bytes": b.part_path(p).stat().st_size,
                 "sha256": b.meta(p)["sha256"]} for p in b.manifest["parts"]}
    return {"bundle": str(b.path), "ok": True, "parts": parts, "bytes": sum(p["bytes"] for p in parts.values()),
            "seconds": round(time.perf_counter() - t0, 2)}


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(
        bundle: Path = typer.Argument(..., help="bundle folder (manifest.json and its parts)"),
    ) -> None:
        """Hash every part of a bundle against its manifest (never trusting the cache): exit 0 and a JSON summary, or 2 naming the part."""
        print(json.dumps(verify_bundle(bundle)))
