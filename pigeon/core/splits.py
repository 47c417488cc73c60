"""Which rows a command reads: the one owner of the `split` rule.

Every photo carries a split (`train`, `val`, `test`, or a name of the user's). Each command reads
some of them: build-cells and the gallery the train rows, pretrain and train the train rows (train
also val), evaluate the test rows. These functions are the only place a split is parsed, normalised
and selected, so that ` Train`, `TRAIN` and `train` are one split everywhere and a named split
with no rows is the same one-line error (exit 2) in every command.

- `normalise`: strip and lower-case; a missing or empty value is `train` (a file without splits
  is all training photos).
- `parse`: a flag's value (`train,val`, `all`, a list) as a tuple of normalised names; None = all.
- `select` / `rows_of`: the rows of those splits; a named split with no rows is refused.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import UserError

TRAIN = "train"
VAL = "val"
TEST = "test"
ALL = "all"
CELL_SPLITS = (TRAIN, VAL)     # build-cells: test rows never shape the cells unless asked for
GALLERY_SPLITS = (TRAIN,)      # build-index: test photos never answer for themselves unless asked for


def normalise_one(value: Any) -> str:
    """One split value, normalised: stripped, lower-case; missing or empty is `train`."""
    if value is None or (isinstance(value, float) and value != value):
        return TRAIN
    text = str(value).strip().lower()
    return text or TRAIN


def normalise(values: Iterable[Any] | pd.Series | np.ndarray) -> np.ndarray:
    """A column of split values, normalised (see `normalise_one`), as an object array of str."""
    arr = values.to_numpy(dtype=object) if isinstance(values, pd.Series) else np.asarray(
        values if isinstance(values, np.ndarray) else list(values), dtype=object)
    s = pd.Series(arr, dtype=object)
    out = s.where(s.notna(), TRAIN).astype(str).str.strip().str.lower()
    return out.mask(out == "", TRAIN).to_numpy(dtype=object)


def parse(value: str | Sequence[str] | None, flag: str = "--splits") -> tuple[str, ...] | None:
    """A flag's splits: a comma list (`train,val`), a sequence, or `all`/None (every row: None).
    Names are normalised; an empty list is refused by name."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [p.strip().lower() for p in parts if p.strip()]
    if not names:
        raise UserError(f"{flag} {value!r}: give split names such as train or train,val, or {ALL}")
    if ALL in names:
        return None
    return tuple(dict.fromkeys(names))


def describe(splits: tuple[str, ...] | None) -> str | list[str]:
    """How a summary records the splits read: their list, or `all`."""
    return list(splits) if splits else ALL


def select(values: Iterable[Any] | pd.Series | np.ndarray, splits: str | Sequence[str] | None, where: str,
           flag: str | None = "--splits") -> np.ndarray:
    """(n,) bool: rows whose split is one of `splits` (None: every row). A named split that no row
    carries (or, of several named, none) is refused in one line that names `where`, the splits it
    does have and `flag` (None: the command has no flag for it; the data must be marked)."""
    norm = normalise(values)
    wanted = parse(splits, flag) if not isinstance(splits, tuple) else splits
    if wanted is None or len(norm) == 0:
        return np.ones(len(norm), dtype=bool)
    keep = np.isin(norm, list(wanted))
    missing = [s for s in wanted if not (norm == s).any()]
    if missing and (len(wanted) == 1 or not keep.any()):
        have = ", ".join(sorted(set(norm.tolist()))[:8]) or "none: no rows"
        fix = (f"pass {flag} with the splits you want, or {flag} {ALL}" if flag else
               "mark those rows in its `split` column (a file without one is all train)")
        raise UserError(f"{where} has no rows with split in {', '.join(missing)} (its splits: {have}); {fix}")
    return keep


def rows_of(values: Iterable[Any] | pd.Series | np.ndarray, splits: str | Sequence[str] | None, where: str,
            flag: str | None = "--splits") -> np.ndarray:
    """Positions of the rows `select` keeps."""
    return np.flatnonzero(select(values, splits, where, flag))
