"""Training points (lat/lon) from CSV or Parquet, checked row by row with errors that name the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pigeon.core.errors import UserError
from pigeon.core.sphere import wrap_lon
from pigeon.core.splits import select as select_splits

LAT_NAMES = ("lat", "latitude", "y", "gps_lat", "lat_deg")
LON_NAMES = ("lon", "lng", "long", "longitude", "x", "gps_lon", "lon_deg")


@dataclass
class Points:
    """Usable points plus what was skipped. `rows` are the kept rows' positions in the file; `left_out`
    counts rows of other splits than those asked for."""

    lat: np.ndarray
    lon: np.ndarray
    rows: np.ndarray
    skipped: int
    path: Path | None = None
    left_out: int = 0

    def __len__(self) -> int:
        return len(self.lat)


def detect_column(columns: list[str], names: tuple[str, ...]) -> str | None:
    """The first column whose lower-cased name is one of `names`."""
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def load_points(path: str | os.PathLike, lat_col: str | None = None, lon_col: str | None = None,
                splits: Sequence[str] | None = None) -> Points:
    """Read lat/lon from a CSV or Parquet file. NaN rows are skipped and counted; impossible values are errors.
    With `splits`, a file with a `split` column keeps only rows of those splits (empty: train)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"points file {path} does not exist; give a CSV or Parquet file with lat/lon columns")
    if path.is_dir():
        raise UserError(f"points path {path} is a folder; give a CSV or Parquet file with lat/lon columns")
    try:
        if path.suffix.lower() in (".parquet", ".pq", ".geoparquet"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"points file {path} is empty; it needs a header with lat/lon columns and at least one row") from None
    except Exception as e:
        raise UserError(f"points file {path} could not be read ({type(e).__name__}: {e}); give a CSV or Parquet file") from e
    return points_from_frame(df, lat_col, lon_col, path, splits)


def _split_mask(df: pd.DataFrame, splits: Sequence[str] | None, where: str) -> np.ndarray:
    """Rows whose `split` (missing: train) is one of `splits` (`pigeon.core.splits`); every row when
    there is no such column or no `splits`."""
    col = detect_column([str(c) for c in df.columns], ("split",))
    if not splits or col is None:
        return np.ones(len(df), dtype=bool)
    return select_splits(df[col], splits, where)


def points_from_frame(df: pd.DataFrame, lat_col: str | None = None, lon_col: str | None = None, path: Path | None = None,
                      splits: Sequence[str] | None = None) -> Points:
    """Validate lat/lon columns of a DataFrame (see `load_points`); every row is checked, rows of other
    `splits` are then left out and counted."""
    where = f"points file {path}" if path else "points"
    cols = [str(c) for c in df.columns]
    la = lat_col or detect_column(cols, LAT_NAMES)
    lo = lon_col or detect_column(cols, LON_NAMES)
    for given, found, what in ((lat_col, la, "latitude"), (lon_col, lo, "longitude")):
        if found is None or found not in df.columns:
            hint = f"--{what[:3]}-col {given}" if given else f"--{what[:3]}-col NAME"
            raise UserError(f"{where} has no {what} column" + (f" '{given}'" if given else "") + f" (columns: {cols}); name it with {hint}")
    if len(df) == 0:
        raise UserError(f"{where} has no rows; give at least one point")
    lat = pd.to_numeric(df[la], errors="coerce").to_numpy(np.float64)
    lon = pd.to_numeric(df[lo], errors="coerce").to_numpy(np.float64)
    bad_text = (np.isnan(lat) & df[la].notna().to_numpy()) | (np.isnan(lon) & df[lo].notna().to_numpy())
    if bad_text.any():
        r = int(np.flatnonzero(bad_text)[0])
        raise UserError(f"{where} row {_row(r, path)}: lat/lon ({df[la].iloc[r]!r}, {df[lo].iloc[r]!r}) is not a number; fix or delete the row")
    ok = np.isfinite(lat) & np.isfinite(lon)
    out = ok & (np.abs(lat) > 90)
    if out.any():
        r = int(np.flatnonzero(out)[0])
        raise UserError(f"{where} row {_row(r, path)}: latitude {lat[r]} is outside [-90, 90] ({int(out.sum())} such rows); are the lat/lon columns swapped? (columns used: {la}, {lo})")
    out = ok & (np.abs(lon) > 360)
    if out.any():
        r = int(np.flatnonzero(out)[0])
        raise UserError(f"{where} row {_row(r, path)}: longitude {lon[r]} is outside [-180, 360]; fix the row")
    keep = _split_mask(df, splits, where)
    rows = np.flatnonzero(ok & keep)
    if len(rows) == 0:
        raise UserError(f"{where} has no usable rows: all {int(keep.sum())} have a missing lat or lon")
    lon_ok = wrap_lon(lon[rows])
    return Points(lat=lat[rows], lon=lon_ok, rows=rows, skipped=int(keep.sum() - len(rows)), path=path, left_out=int((~keep).sum()))


def _row(r: int, path: Path | None) -> str:
    """Human row number: the CSV line (header is line 1) or the 0-based Parquet row."""
    if path is not None and path.suffix.lower() == ".csv":
        return f"{r + 2} (line {r + 2}, data row {r})"
    return str(r)
