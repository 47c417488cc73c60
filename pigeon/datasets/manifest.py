"""Dataset manifests: a CSV or Parquet table of photos with their coordinates.

Columns: `image` (path relative to the manifest's folder, or absolute), `lat`, `lon`, and optional
`taken_at` (date/time), `heading` (degrees clockwise from north), both read by the rule of
`pigeon.datasets.fields`, and `split` ('train' when absent). Other columns are kept as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.splits import TRAIN, normalise as normalise_splits
from .fields import normalize_fields, unparsed_taken_at

REQUIRED = ("image", "lat", "lon")


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq", ".geoparquet"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as e:
        raise UserError(f"manifest {path} is unreadable ({type(e).__name__}: {e}); give a CSV or Parquet table") from e
    raise UserError(f"manifest {path} has suffix {suffix!r}; give a .csv or .parquet table with columns image, lat, lon")


def _bad_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return ", ".join(str(r) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")


def read_manifest(path: str | os.PathLike, strict: bool = False) -> pd.DataFrame:
    """Read and check a manifest. Returns columns image (as given), path (absolute), lat, lon,
    taken_at (datetime64[ns] naive UTC, NaT when absent or unparseable), heading (float in [0, 360),
    NaN when absent) as `pigeon.datasets.fields` reads them, split (str), plus any others. `strict`:
    every image file must exist (otherwise missing files are left for the loader to skip and count)
    and a non-empty taken_at that is not a date/time is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; give a CSV or Parquet file with columns image, lat, lon")
    df = _read_table(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"manifest {path} lacks column(s) {', '.join(missing)} (it has {', '.join(map(str, df.columns[:8]))}); add them")
    if len(df) == 0:
        raise UserError(f"manifest {path} has no rows; add photos")
    df = df.reset_index(drop=True).copy()
    for c in ("lat", "lon"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    bad = df["lat"].isna().to_numpy() | df["lon"].isna().to_numpy()
    bad |= ~df["lat"].between(-90, 90).to_numpy() | ~df["lon"].between(-180, 180).to_numpy()
    if bad.any():
        raise UserError(f"manifest {path}: {bad.sum()} row(s) have missing or out-of-range lat/lon (rows {_bad_rows(bad)}); lat must be in [-90, 90], lon in [-180, 180]")
    img = df["image"]
    if img.isna().any() or (img.astype(str).str.strip() == "").any():
        rows = (img.isna() | (img.astype(str).str.strip() == "")).to_numpy()
        raise UserError(f"manifest {path}: empty `image` in rows {_bad_rows(rows)}; give every row a file")
    root = path.resolve().parent
    df["image"] = img.astype(str)
    df["path"] = [str(p if os.path.isabs(p) else root / p) for p in df["image"]]
    raw_times = df["taken_at"].copy() if "taken_at" in df.columns else None
    normalize_fields(df, add_missing=True)
    if strict and raw_times is not None:
        unparsed = unparsed_taken_at(raw_times, df["taken_at"])
        if unparsed.any():
            raise UserError(f"manifest {path}: `taken_at` in rows {_bad_rows(unparsed)} is not a date/time; use ISO 8601 (2024-03-15T10:00:00)")
    df["split"] = normalise_splits(df["split"]) if "split" in df.columns else TRAIN
    if strict:
        exists = np.array([os.path.isfile(p) for p in df["path"]])
        if not exists.all():
            first = df["path"][~exists].iloc[0]
            raise UserError(f"manifest {path}: {int((~exists).sum())} image file(s) do not exist (first: {first}); fix the paths or drop --strict to skip them")
    return df
