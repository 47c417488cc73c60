"""Atomic file writes: a reader never sees half an artifact, an interrupted writer leaves the old one."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

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
