"""Progress for a person at a terminal and for the log of a job: the one owner of progress output.

`progress(...)` takes tqdm's arguments (those pigeon uses). When stderr is a terminal it returns a tqdm
bar. When it is not (SLURM, docker, CI, a pipe), it returns a `PlainProgress`, which writes one plain
line at most every `interval_s()` seconds (30, or $PIGEON_PROGRESS_INTERVAL_S) and one when it
closes (unless the last line already showed the final count), never a carriage return:

    embed webdataset shards: 120/470 shard, 0.0667 shard/s, ETA 1:27:30, elapsed 0:30:00

(without a total: no ETA). Under torchrun (WORLD_SIZE > 1) every line, and a terminal bar's
description, starts with `[rank R] `. `disable=True` writes nothing in either case; `leave=False` (a
bar that tqdm erases when done) writes no closing line.

It imports nothing of pigeon's (tqdm only when a terminal gets a bar), so every layer may use it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator, Protocol, TextIO

INTERVAL_S = 30.0
"""Seconds between two plain lines when stderr is not a terminal."""
INTERVAL_ENV = "PIGEON_PROGRESS_INTERVAL_S"
"""The environment variable that overrides INTERVAL_S (seconds, >= 0)."""


class ProgressBar(Protocol):
    """What pigeon's call sites use of a bar: tqdm and PlainProgress both have it."""

    n: int | float

    def __iter__(self) -> Iterator[Any]: ...
    def update(self, n: int | float = 1) -> Any: ...
    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None: ...
    def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...
    def close(self) -> None: ...


def interval_s() -> float:
    """INTERVAL_S, or $PIGEON_PROGRESS_INTERVAL_S when it is set to a number >= 0 (a warning names a bad value)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        warnings.warn(f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; progress lines every {INTERVAL_S:g} s", stacklevel=3)
        return INTERVAL_S
    return value


def rank_prefix() -> str:
    """`[rank R] ` in a process of a torchrun job of several processes (env WORLD_SIZE > 1), else ''."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):   # a stream without isatty, or a closed one
        return False


def progress(iterable: Iterable[Any] | None = None, *, total: int | float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, initial: int | float = 0, leave: bool = True) -> ProgressBar:
    """A progress bar over `iterable` (or updated by hand with `update(n)`): tqdm when stderr is a
    terminal, else plain lines at most every `interval_s()` seconds; tqdm's meaning for every argument."""
    desc = rank_prefix() + desc
    if _is_terminal(sys.stderr) and not disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, leave=leave)


def _clock(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _number(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.3g}"


def _rate(r: float) -> str:
    return f"{r:.0f}" if r >= 1000 else f"{r:.3g}"


class PlainProgress:
    """tqdm's interface (iteration, update, set_postfix, set_description, close, `with`) as plain
    lines on a stream that is not a terminal: `desc: done/total unit, rate unit/s, ETA H:MM:SS, elapsed
    H:MM:SS[, key=value ...]`, at most one every `interval` seconds and one when it closes."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | float | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, initial: int | float = 0, leave: bool = True, interval: float | None = None,
                 file: TextIO | None = None) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.leave = disable, leave
        self.n = self.initial = initial
        self.interval = interval_s() if interval is None else float(interval)
        self.file = file if file is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.written: tuple | None = None      # the count and postfix the last line showed
        self.closed = False

    # -- tqdm's interface ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable; call update(n)")
        try:
            for obj in self.iterable:
                yield obj
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        """Count `n` more done; a line when `interval` seconds have passed since the last one."""
        self.n += n
        if self.disable or self.closed:
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """key=value pairs at the end of the next lines (numbers as tqdm shows them)."""
        self.postfix = {k: (f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in {**(ordered_dict or {}), **kwargs}.items()}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """A new description (the rank prefix kept under torchrun)."""
        self.desc = rank_prefix() + (desc or "")

    def refresh(self) -> None:
        """tqdm redraws here; a log gets its lines on the clock only."""

    def close(self) -> None:
        """The closing line (unless disabled, `leave=False`, or the last line showed this count and postfix); once."""
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.leave and self._shown() != self.written:
            self._write(time.monotonic())

    # -- the line --------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The current state as one line (no newline)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        count = f"{_number(self.n)}/{_number(self.total)}" if self.total is not None else _number(self.n)
        parts = [f"{count} {self.unit}", f"{_rate(rate)} {self.unit}/s" if rate is not None else f"? {self.unit}/s"]
        if self.total is not None:
            left = max(self.total - self.n, 0)
            parts.append(f"ETA {_clock(left / rate)}" if rate else ("ETA 0:00:00" if not left else "ETA ?"))
        parts.append(f"elapsed {_clock(elapsed)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        head = f"{self.desc}: " if self.desc else ""
        return head + ", ".join(parts)

    def _shown(self) -> tuple:
        return self.n, tuple(self.postfix.items())

    def _write(self, now: float) -> None:
        self.last, self.written = now, self._shown()
        if self.file is None:
            return
        try:
            self.file.write(self.line(now).replace("\r", " ").replace("\n", " ") + "\n")
            self.file.flush()
        except (ValueError, OSError):   # a closed or broken stream: progress never stops the work
            pass
