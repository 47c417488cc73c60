"""The optional per-sample fields `taken_at` and `heading`: the one rule every reader applies.

Whatever holds them (a manifest's columns, a WebDataset sample's `.json`, an image-Parquet file's
columns) and whoever turns them into columns (`read_manifest`, `Source.coords()`, the pretraining
stream's batches, `pigeon embed`'s rows), the values come out the same:

- `taken_at`: datetime64[ns], naive UTC. Text in any form pandas parses, forms mixed within one
  column (`format="mixed"`: "2024-03-15T10:00:00", "2024-03-15 10:00", ...), and timestamps: a value
  with a UTC offset or time zone is converted to UTC, one without is taken as UTC. Numbers are read
  as pandas reads them (nanoseconds since 1970), so give times as text or timestamps. Unknown (None,
  NaN, empty text) or unparseable -> NaT; `unparsed_taken_at` tells the unparseable ones apart
  (`read_manifest(strict=True)` refuses them by row).
- `heading`: float64 degrees clockwise from north, wrapped into [0, 360) (370 -> 10, -90 -> 270,
  720.5 -> 0.5); numbers or numeric text; unknown, not a number or infinite -> NaN.

`Record.meta` keeps the values as the source gives them (records are read sample by sample); the
rule is applied where records become columns, a column (or a batch) at a time.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

FIELDS = ("taken_at", "heading")


def _series(values: Iterable[Any]) -> pd.Series:
    """`values` as a Series: a Series as it is, an array with its dtype, anything else as objects."""
    if isinstance(values, pd.Series):
        return values
    if isinstance(values, (np.ndarray, pd.Index, pd.api.extensions.ExtensionArray)):
        return pd.Series(values)
    return pd.Series(list(values), dtype=object)


def parse_taken_at(values: Iterable[Any]) -> pd.Series:
    """taken_at values as datetime64[ns] naive UTC, NaT where unknown or unparseable (index kept)."""
    s = _series(values)
    t = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    return t.dt.tz_localize(None).astype("datetime64[ns]")


def unparsed_taken_at(raw: Iterable[Any], parsed: pd.Series) -> np.ndarray:
    """Which values were given (not None/NaN/blank text) but did not parse (`parsed` NaT)."""
    raw = _series(raw)
    given = raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    return pd.isna(parsed).to_numpy() & given


def parse_heading(values: Iterable[Any]) -> pd.Series:
    """heading values as float64 degrees in [0, 360), NaN where unknown or not a finite number (index kept)."""
    s = _series(values)
    h = pd.to_numeric(s, errors="coerce")
    a = pd.Series(h, index=s.index).to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    with np.errstate(invalid="ignore"):
        a = np.mod(a, 360.0)                 # inf -> NaN
    a[a >= 360.0] = 0.0                      # a tiny negative wraps to 360.0 in floating point
    return pd.Series(a, index=s.index, name=s.name, dtype=np.float64)


def normalize_fields(df: pd.DataFrame, add_missing: bool = False) -> pd.DataFrame:
    """The frame's taken_at and heading columns under the rule, in place (and returned); with
    `add_missing`, an absent one is added as all NaT / NaN."""
    if "taken_at" in df.columns:
        df["taken_at"] = parse_taken_at(df["taken_at"])
    elif add_missing:
        df["taken_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
    if "heading" in df.columns:
        df["heading"] = parse_heading(df["heading"])
    elif add_missing:
        df["heading"] = pd.Series(np.nan, index=df.index, dtype=np.float64)
    return df


__all__ = ["FIELDS", "normalize_fields", "parse_heading", "parse_taken_at", "unparsed_taken_at"]
