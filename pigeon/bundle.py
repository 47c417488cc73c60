"""The model bundle: one folder holding every part of a trained pigeon, with a manifest that ties them.

Parts: `cells.parquet`, `backbone.safetensors` (only when fine-tuned), `head.safetensors`,
`index.faiss`, `gallery.parquet`, `clusters.parquet`. `manifest.json` records, for each part, its
content hash, what built it, and the hashes of the parts it depends on (`cells`, `backbone`), so a
head trained on other cells or an index built with another backbone is refused by name.

Swaps are atomic as a whole: every part, the cells included, is written into a fresh version folder
(`v-<id>/cells.parquet`, `v-<id>/head.safetensors`, `v-<id>/index.faiss`, ...), and the manifest,
replaced by one rename, names the files in force. A kill at any moment leaves either the old manifest
with the old files (untouched) or the new one with the new files; what no manifest names any more
(old versions, the folders of an interrupted write, a top-level file of a bundle written before
version folders) is removed after the next successful switch. A part's `file` must be a relative
path that stays inside the bundle (`pigeon.core.io.part_file`); `BUNDLE/cells.parquet` given as a
path still finds the cells through the manifest (`bundled_file`).

Integrity: every part record carries its sha256, checked by `verify`. Small parts (cells, a tuned
backbone, head: `SMALL_PARTS`) are hashed every time a bundle is opened; large ones (index, gallery,
clusters: `LARGE_PARTS`) may be vouched for at start by `.verified.json` (unchanged size and mtime
since a full hash), and the service then hashes them in full in the background (`BackgroundVerify`),
which never takes the cache's word. `pigeon verify BUNDLE` hashes everything.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from pigeon.core.io import atomic_path, bundled_file, part_file, pause_point

from .core.errors import UserError

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # (size, mtime, sha256) of parts already checked: big parts are hashed once
FORMAT = 1
PART_FILES = {
    "cells": "cells.parquet",
    "backbone": "backbone.safetensors",
    "head": "head.safetensors",
    "index": "index.faiss",
    "gallery": "gallery.parquet",
    "clusters": "clusters.parquet",
}
SMALL_PARTS = ("cells", "backbone", "head")       # hashed in full every time a bundle is opened
LARGE_PARTS = ("index", "gallery", "clusters")    # at start: the (size, mtime) cache may vouch; then hashed in the background
_SHA256 = re.compile(r"[0-9a-f]{64}")

__all__ = ["Bundle", "BackgroundVerify", "LARGE_PARTS", "MANIFEST", "PART_FILES", "SMALL_PARTS", "bundled_file", "file_sha256"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    try:
        return version("pigeon-geo")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


class Bundle:
    """A bundle folder and its manifest. Parts are written with `write_part` and checked with `require`."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise UserError(f"bundle folder {self.path} does not exist; build one with `pigeon build-cells --points FILE --out {self.path}/cells.parquet` first")
            self.path.mkdir(parents=True)
        elif not self.path.is_dir():
            raise UserError(f"bundle path {self.path} is a file, not a folder; give a folder")
        self.manifest = _read_manifest(self.path / MANIFEST) if (self.path / MANIFEST).exists() else None
        self.has_manifest = self.manifest is not None
        self._verified: set[str] = set()  # parts this object has checked (load_gallery after from_bundle: once)
        self._hashed: set[str] = set()    # ... of which hashed in full by this object (not on the cache's word)
        if self.manifest is None:
            self.manifest = {"format": FORMAT, "pigeon_version": _version(), "backbone": None, "parts": {}}
        for p in self.manifest["parts"]:
            self.part_path(p)  # each part's file a relative path inside the bundle, else refused by name now

    # -- reading -----------------------------------------------------------------------------
    def part_path(self, part: str) -> Path:
        """Where the part in force lives: the file the manifest names, relative to the bundle and inside it
        (`part_file` refuses anything else by name); a record without `file` (written before version
        folders) names the part's top-level file."""
        m = self.meta(part)
        return part_file(self.path, part, m["file"]) if "file" in m else self.path / PART_FILES[part]

    def listed(self, part: str) -> bool:
        """Whether the manifest lists the part (its file may still be missing: `require` says so)."""
        return part in self.manifest["parts"]

    def has(self, part: str) -> bool:
        return self.listed(part) and self.part_path(part).exists()

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
        if not self.has_manifest and any(p != "cells" for p in parts):
            raise UserError(f"bundle {self.path} has no {MANIFEST} (it ties the parts together and records their hashes); "
                            f"restore it, or rebuild the bundle from `pigeon build-cells`")
        for p in parts:
            if self.listed(p) and not self.part_path(p).exists():
                raise UserError(f"bundle {self.path}: the manifest lists {PART_FILES[p]} but {self.part_path(p)} is missing; {_HOW_TO_BUILD[p]}")
            if not self.has(p):
                raise UserError(f"bundle {self.path} has no {PART_FILES[p]}; {_HOW_TO_BUILD[p]}")
        for p in parts:
            m = self.meta(p)
            if "cells_hash" in m and self.cells_hash and m["cells_hash"] != self.cells_hash:
                raise UserError(f"bundle {self.path}: {PART_FILES[p]} was built on other cells than cells.parquet (cells hash {m['cells_hash'][:12]} vs {self.cells_hash[:12]}); rebuild it: {_HOW_TO_BUILD[p]}")
            if "backbone_hash" in m and self.backbone_hash and m["backbone_hash"] != self.backbone_hash:
                raise UserError(f"bundle {self.path}: {PART_FILES[p]} was built with another backbone (hash {m['backbone_hash'][:12]} vs {self.backbone_hash[:12]}, spec {self.backbone_spec}); rebuild it: {_HOW_TO_BUILD[p]}")

    def verify(self, *parts: str, full: bool = False) -> list[str]:
        """Check each listed part's bytes against the sha256 in the manifest (all listed parts if none
        given); refuse a missing or changed part by name. Returns the parts hashed by this call.

        Small parts (`SMALL_PARTS`) are hashed whenever a bundle is opened. A large part (`LARGE_PARTS`)
        whose size and mtime are those `.verified.json` recorded after its last full hash is not hashed
        here, unless `full`: start-up does not wait for a multi-GB index, and the service then checks
        it in full in the background (`BackgroundVerify`; `pigeon verify` also passes `full`), since a
        stamp proves nothing about the bytes (silent corruption keeps both; the file can be forged). A
        part this object has hashed in full, or checked already when not `full`, is not hashed again."""
        cache = _read_verified(self.path / VERIFIED)
        fresh, hashed = {}, []
        for p in parts or tuple(self.manifest["parts"]):
            if p not in PART_FILES or not self.listed(p) or p in self._hashed or (p in self._verified and not full):
                continue
            f = self.part_path(p)
            want = self.meta(p)["sha256"]  # every record carries it (_read_manifest)
            if not f.is_file():
                raise UserError(f"bundle {self.path}: the manifest lists {PART_FILES[p]} but {f} is missing; {_HOW_TO_BUILD[p]}")
            key, stamp = self._stamp(f, want)  # taken before hashing: a change while hashing leaves a stale stamp, never a false one
            if full or p not in LARGE_PARTS or cache.get(key) != stamp:
                if file_sha256(f) != want:
                    raise UserError(f"bundle {self.path}: {key} does not match the sha256 in {MANIFEST} (corrupt, or changed by hand); "
                                    f"restore the file or rebuild it: {_HOW_TO_BUILD[p]}")
                self._hashed.add(p)
                hashed.append(p)
            fresh[key] = stamp
            self._verified.add(p)
        if fresh != {k: cache.get(k) for k in fresh}:
            self._save_verified({**cache, **fresh})
        return hashed

    def unhashed(self, *parts: str) -> list[str]:
        """The listed parts among `parts` that this object has not hashed in full (what the background check must do)."""
        return [p for p in parts if self.listed(p) and p not in self._hashed]

    def _stamp(self, f: Path, sha256: str | None) -> tuple[str, list]:
        """`.verified.json`'s key and record of a part file: what must not change for its hash to hold."""
        st = f.stat()
        return f.relative_to(self.path).as_posix(), [st.st_size, st.st_mtime_ns, sha256]

    def _save_verified(self, records: dict[str, list]) -> None:
        """Write `.verified.json`, keeping only files the manifest names (old versions drop out)."""
        live = {self.part_path(p).relative_to(self.path).as_posix() for p in self.manifest["parts"]}
        with contextlib.suppress(OSError):  # a read-only bundle just verifies again next time
            with atomic_path(self.path / VERIFIED) as tmp:
                tmp.write_text(json.dumps({k: v for k, v in records.items() if k in live}))

    # -- writing -----------------------------------------------------------------------------
    def set_backbone(self, spec: str, backbone_hash: str) -> None:
        self.manifest["backbone"] = {"spec": spec, "hash": backbone_hash}
        self.save_manifest()

    def write_part(self, part: str, writer: Callable[[Path], None], **meta: Any) -> Path:
        """Write one part with `writer(path)` and switch to it atomically (see `write_parts`)."""
        return self.write_parts({part: writer}, {part: meta})[part]

    def write_parts(self, writers: dict[str, Callable[[Path], None]], metas: dict[str, dict[str, Any]] | None = None,
                    **common: Any) -> dict[str, Path]:
        """Write parts together and switch to all of them with one manifest rename.

        Every part, the cells included, goes into a fresh `v-<id>/` folder, so the files in force are
        never touched until the manifest names the new ones (a kill before the rename leaves the old
        bundle, after it the new one). Then whatever the manifest no longer names is removed."""
        metas = metas or {}
        version_dir = self.path / f"v-{uuid.uuid4().hex[:12]}"
        records, paths = {}, {}
        try:
            for part, writer in writers.items():
                dest = version_dir / PART_FILES[part]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dest) as tmp:
                    writer(tmp)
                    digest = file_sha256(tmp)
                pause_point("part-written")
                records[part] = {"file": dest.relative_to(self.path).as_posix(), "sha256": digest,
                                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                 "pigeon_version": _version(), **common, **metas.get(part, {})}
                paths[part] = dest
        except BaseException:
            shutil.rmtree(version_dir, ignore_errors=True)  # an error (not a kill): leave nothing behind
            raise
        pause_point("before-switch")
        self.manifest["parts"].update(records)
        self.save_manifest()  # the switch: one rename
        pause_point("after-switch")
        self.remove_unreferenced()
        # just hashed while writing: this object need not hash them again, nor the next start a large one
        self._verified.update(records)
        self._hashed.update(records)
        self._save_verified({**_read_verified(self.path / VERIFIED),
                             **dict(self._stamp(paths[p], records[p]["sha256"]) for p in records)})
        return paths

    def remove_unreferenced(self) -> None:
        """Remove version folders and staging folders that the manifest no longer names (old versions,
        interrupted writes). Safe to repeat; never touches a file in force."""
        live = {self.part_path(p).resolve() for p in self.manifest["parts"]}
        live_dirs = {f.parent for f in live}
        for d in [*self.path.glob("v-*"), *self.path.glob(".build-index.*")]:
            if d.is_dir() and d.resolve() not in live_dirs:
                shutil.rmtree(d, ignore_errors=True)
        for part in self.manifest["parts"]:  # top-level files of parts written before version folders
            f = self.path / PART_FILES.get(part, "")
            if f.is_file() and f.resolve() not in live:
                f.unlink(missing_ok=True)

    def save_manifest(self) -> None:
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        self.has_manifest = True


class BackgroundVerify:
    """The full hash of a bundle's large parts (`LARGE_PARTS` that its object has not hashed in full yet)
    in a daemon thread, for a service that started on the (size, mtime) cache's word.

    `state`: "verifying" until every part is hashed, then "ok", or "failed" with `error` (one line
    naming the part, as `Bundle.verify` words it) and `part`. `on_done(self)` is called once at the
    end, from the thread. `start()` is idempotent; with nothing to hash the state is "ok" at once."""

    def __init__(self, bundle: Any, on_done: Callable[["BackgroundVerify"], None] | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else None  # a predictor built from parts has none
        self.parts = self.bundle.unhashed(*LARGE_PARTS) if self.bundle is not None else []
        self.state = "verifying" if self.parts else "ok"
        self.error: str | None = None
        self.part: str | None = None
        self.on_done = on_done
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "BackgroundVerify":
        with self._lock:
            if self._thread is None and self.parts:
                self._thread = threading.Thread(target=self._run, name="pigeon-verify", daemon=True)
                self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> str:
        """Wait for the check (at most `timeout` s); its state."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    def _run(self) -> None:
        b = self.bundle
        try:
            for p in self.parts:
                self.part = p
                b.verify(p, full=True)
        except UserError as e:
            self.error = str(e)
        except Exception as e:  # unreadable (I/O error, permissions): as bad as a mismatch
            self.error = f"bundle {b.path}: {PART_FILES[self.part]} could not be read to verify it ({type(e).__name__}: {e})"
        if self.error is None:
            self.part, self.state = None, "ok"
        else:
            self.state = "failed"
        if self.on_done is not None:
            self.on_done(self)


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _read_verified(path: Path) -> dict[str, list]:
    """`.verified.json`'s records `{file: [size, mtime_ns, sha256]}`; {} (everything hashed again) when the
    file is missing, unreadable, or anything but such records (a list, a string, a number, a bad record)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        return {}
    for k, v in data.items():
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in v[:2])
                and isinstance(v[2], str)):
            return {}
    return data


def _read_manifest(mpath: Path) -> dict[str, Any]:
    """Read and check `manifest.json`: a JSON object with a known `format` and a `parts` object."""
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"bundle manifest {mpath} is unreadable ({type(e).__name__}); restore it or rebuild the bundle") from e
    if not isinstance(m, dict) or not isinstance(m.get("parts"), dict):
        raise UserError(f"bundle manifest {mpath} is not a pigeon manifest (a JSON object with `parts`); restore it or rebuild the bundle")
    if m.get("format", FORMAT) != FORMAT:
        raise UserError(f"bundle manifest {mpath} has format {m.get('format')!r}; this pigeon reads format {FORMAT}: upgrade pigeon or rebuild the bundle")
    bad = [p for p, rec in m["parts"].items() if p not in PART_FILES or not isinstance(rec, dict)]
    if bad:
        raise UserError(f"bundle manifest {mpath}: part {bad[0]!r} is unknown or not a record; restore the manifest or rebuild the bundle")
    for p, rec in m["parts"].items():  # without its hash a part could never be verified: refused, not served unchecked
        sha = rec.get("sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            what = "has no sha256" if sha is None else f"has a malformed sha256 {sha!r}"
            raise UserError(f"bundle manifest {mpath}: part {p!r} {what} (the hash {PART_FILES[p]} is verified against); "
                            f"restore the manifest or rebuild the part: {_HOW_TO_BUILD[p]}")
    if m.get("backbone") is not None and not (isinstance(m["backbone"], dict) and isinstance(m["backbone"].get("spec"), str)):
        raise UserError(f"bundle manifest {mpath}: `backbone` must be {{spec, hash}}; restore the manifest or rebuild the bundle")
    return m


_HOW_TO_BUILD = {
    "cells": "run `pigeon build-cells --points FILE --out BUNDLE/cells.parquet`",
    "backbone": "run `pigeon pretrain --data MANIFEST --cells BUNDLE/cells.parquet --out BUNDLE` (or leave it out to use the stock backbone)",
    "head": "run `pigeon train --bundle BUNDLE --data MANIFEST` (or `pigeon train --bundle BUNDLE --zero-shot`)",
    "index": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
    "gallery": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
    "clusters": "run `pigeon build-index --bundle BUNDLE --images MANIFEST`",
}
