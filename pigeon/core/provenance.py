"""Where a gallery photo comes from: the optional per-photo columns a data source may carry, the one owner of their names.

A manifest's columns, a WebDataset sample's `.json` (img2dataset writes `url`) or an image-Parquet file's
columns named `url`, `source`, `license`, `author` travel with the photo: `pigeon embed` keeps them in the
embedding rows, `pigeon build-index` in the gallery rows, and an answer asked with evidence shows them for
each gallery photo that decided it, so a reader can open the photo, credit its author and respect its license.
Values are text; a missing or empty one means the source did not say.
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

SOURCE_COLUMNS = ("url", "source", "license", "author")
TEXT = "string[pyarrow]"   # one Arrow buffer per column: millions of urls without a Python str each


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v)


def source_text(values: Iterable[Any]) -> pd.Series:
    """Values of a source column as text (`TEXT`; numbers become their text), <NA> where missing or blank.
    A column that is `TEXT` already is checked in Arrow (no Python string per row)."""
    s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    if s.dtype != TEXT:
        s = s.astype(object).map(lambda v: None if _missing(v) else str(v)).astype(TEXT)
    blank = (s.str.strip() == "").fillna(False).astype(bool)
    return s.where(~blank, None) if blank.any() else s   # no copy of a clean column (a loaded gallery's)


__all__ = ["SOURCE_COLUMNS", "TEXT", "source_text"]
