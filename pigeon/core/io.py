"""Atomic file writes: a reader never sees half an artifact, an interrupted writer leaves the old one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any slow work, an output path whose folder cannot be made or written (UserError)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e}); give a writable location") from e
    return path


def pause_point(step: str) -> None:
    """A test hook for kill -9 tests of atomic swaps: with PIGEON_PAUSE_AT=step, announce the step by
    creating the file PIGEON_PAUSE_FILE and wait there (to be killed). A no-op otherwise."""
    if os.environ.get("PIGEON_PAUSE_AT") != step:
        return
    Path(os.environ.get("PIGEON_PAUSE_FILE", "pigeon.paused")).write_text(step)
    time.sleep(600)


BUNDLE_MANIFEST = "manifest.json"  # = pigeon.bundle.MANIFEST (the bundle module is a layer above this one)


def part_file(root: str | os.PathLike, part: str, file: Any) -> Path:
    """The path of the file a bundle manifest's record for `part` names (`file`, relative to the bundle
    folder `root`), refused by name (UserError) unless it is a relative path string, without `..`,
    that stays inside `root` once symlinks are resolved. The one check of a part's file: `Bundle`
    and `bundled_file` both go through it."""
    root = Path(root)
    how = f"restore {BUNDLE_MANIFEST} or rebuild the bundle"
    ok = isinstance(file, str) and file.strip() != "" and "\x00" not in file
    pure = PurePosixPath(file) if ok else None
    if not ok or pure.is_absolute() or PureWindowsPath(file).drive or PureWindowsPath(file).root or ".." in pure.parts:
        raise UserError(f"bundle {root}: part {part!r}'s file {file!r} must be a relative path inside the bundle "
                        f"(e.g. v-<id>/head.safetensors); {how}")
    path = root / pure
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise UserError(f"bundle {root}: part {part!r}'s file {file!r} leads outside the bundle through a symlink; {how}")
    return path


def bundled_file(path: str | os.PathLike) -> Path:
    """Where a part's file really is when it is named the old way, as `BUNDLE/<its name>` (`--cells
    BUNDLE/cells.parquet`): parts now live in version folders (`BUNDLE/v-<id>/cells.parquet`), so
    when the folder holds a manifest whose record of a part names a file of that name, that file
    (checked by `part_file`); otherwise `path` as given (a file outside any bundle, a bundle written
    before version folders, an unreadable manifest: its loader says what is wrong)."""
    path = Path(path)
    manifest = path.parent / BUNDLE_MANIFEST
    try:
        parts = json.loads(manifest.read_bytes()).get("parts") if manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        return path
    for part, rec in (parts.items() if isinstance(parts, dict) else ()):
        file = rec.get("file") if isinstance(rec, dict) else None
        if isinstance(file, str) and file and PurePosixPath(file).name == path.name:
            return part_file(path.parent, part, file)
    return path
