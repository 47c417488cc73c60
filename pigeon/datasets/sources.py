"""Data sources: one reader interface over the three ways photo data sets ship.

- a manifest of loose image files (CSV/Parquet with image, lat, lon[, split, ...]): `ManifestSource`;
- WebDataset tar shards as img2dataset writes them (`.jpg`/`.webp`/`.png` + `.json` with the
  coordinates), given as a brace pattern, a folder, a file or a list: `WebDatasetSource`;
- Parquet files with an image-bytes column (the Hugging Face / OSV-5M layout): `ParquetSource`.

Why one interface: `pigeon embed` (and every command that reads photos) works shard by shard, so a
killed run resumes at a shard boundary and each torchrun rank takes its own shards. A source is a
list of `shards` (stable names, fixed order); `records(i)` streams shard i's samples *undecoded*
(bytes or a file path), so nothing holds the data set in memory and decoding happens wherever the
caller wants it (DataLoader workers). A sample with missing/out-of-range coordinates or no image is
skipped and counted in `skipped` by reason (a `UserError` naming it with `strict=True`); an image
that does not decode is the caller's to catch (`load_image` raises a UserError naming it).
Coordinates are found under lat/latitude and lon/lng/long/longitude (case ignored) unless named.

`open_source(spec)` picks the reader from what `spec` is (docs/data.md).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..core.errors import UserError
from ..core.provenance import SOURCE_COLUMNS
from ..core.splits import TRAIN, normalise as normalise_splits, normalise_one as normalise_split
from .fields import normalize_fields
from .manifest import read_manifest

META_COLUMNS = ("split", "taken_at", "heading", "location_id", "id")  # optional per-sample fields kept in `meta` and coords()
# what a Record's `meta` keeps: META_COLUMNS and the source columns (url, source, license, author: pigeon.core.provenance),
# which `pigeon embed` passes on to the gallery; coords() leaves them out (the cells need none of them)
RECORD_COLUMNS = (*META_COLUMNS, *SOURCE_COLUMNS)


@dataclass
class Record:
    """One undecoded sample: `data` is the image's bytes or the path of its file."""

    key: str                                    # unique within the source (manifest: the `image` value)
    lat: float
    lon: float
    data: bytes | str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)   # taken_at, heading, location_id, id, url, source, license,
                                                         # author when known, as the source gives them (RECORD_COLUMNS;
                                                         # columns of them: pigeon.datasets.fields, pigeon.core.provenance)


class Source(ABC):
    """A data set as a fixed list of shards of undecoded records."""

    kind: str = "?"
    # Whether reading a shard's records costs nothing (they are rows held in memory, the image read only
    # when decoded): then loader workers may share a shard (`pigeon embed`); else each worker takes
    # whole shards, so a tar or Parquet file is read once.
    shared_reads: bool = False

    def __init__(self, spec: str, strict: bool = False):
        self.spec = str(spec)
        self.strict = bool(strict)
        self.skipped: Counter[str] = Counter()      # reason -> count, over all records() calls

    @property
    @abstractmethod
    def shards(self) -> list[str]:
        """Stable names of the input shards, in order (index i is shard i)."""

    @abstractmethod
    def records(self, shard: int) -> Iterator[Record]:
        """Shard `shard`'s samples in a stable order, undecoded; bad samples skipped and counted."""

    @abstractmethod
    def fingerprint(self, shard: int) -> str:
        """Changes whenever shard `shard`'s content may have changed (resume refuses a changed shard)."""

    def coords(self) -> pd.DataFrame:
        """key, lat, lon, split (+ meta columns; taken_at/heading under the rule of `fields`) of every
        sample, shard by shard (`build-cells` input)."""
        rows = [dict(key=r.key, lat=r.lat, lon=r.lon, split=r.split, **r.meta)
                for i in range(len(self.shards)) for r in self.records(i)]
        if not rows:
            raise UserError(f"data source {self.spec} holds no usable sample; check it (skipped: {dict(self.skipped)})")
        return normalize_fields(pd.DataFrame(rows))

    def skip(self, reason: str, where: str) -> None:
        """Count a bad sample, or refuse it by name when strict."""
        if self.strict:
            raise UserError(f"{where}: {reason}; fix or drop the sample, or leave out --strict to skip such samples")
        self.skipped[reason] += 1

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "shards": len(self.shards)}


class ManifestSource(Source):
    """Today's manifest of loose files, cut into shards of `rows_per_shard` rows (resume granularity)."""

    kind = "manifest"
    shared_reads = True   # records() lists in-memory rows (paths); each worker opens only the files it decodes

    def __init__(self, spec: str, strict: bool = False, rows_per_shard: int = 4096):
        super().__init__(spec, strict)
        if rows_per_shard < 1:
            raise UserError(f"rows per shard must be at least 1, got {rows_per_shard}")
        self.df = read_manifest(spec, strict=strict)
        self.rows_per_shard = int(rows_per_shard)

    @property
    def shards(self) -> list[str]:
        n = (len(self.df) + self.rows_per_shard - 1) // self.rows_per_shard
        return [f"rows {i * self.rows_per_shard}-{min(len(self.df), (i + 1) * self.rows_per_shard) - 1}" for i in range(n)]

    def _rows(self, shard: int) -> pd.DataFrame:
        return self.df.iloc[shard * self.rows_per_shard:(shard + 1) * self.rows_per_shard]

    def records(self, shard: int) -> Iterator[Record]:
        part = self._rows(shard)
        extra = [c for c in RECORD_COLUMNS if c in part.columns and c != "split"]
        metas = part[extra].to_dict("records") if extra else [{}] * len(part)
        for key, path, lat, lon, split, meta in zip(part["image"], part["path"], part["lat"], part["lon"], part["split"], metas):
            yield Record(str(key), float(lat), float(lon), str(path), str(split), _clean_meta(meta))

    def fingerprint(self, shard: int) -> str:
        """Keys, coordinates, splits and files' stamps; plus the source columns (url, ...) when the manifest has
        them, so embeddings cached before they were added or read are made again and carry them to the gallery."""
        h = hashlib.sha1()
        rows = self._rows(shard)
        for key, path, lat, lon, split in rows[["image", "path", "lat", "lon", "split"]].itertuples(index=False):
            try:
                st = os.stat(path)
                stamp = f"{st.st_mtime_ns}:{st.st_size}"
            except OSError:
                stamp = "missing"
            h.update(f"{key}\x00{lat!r}\x00{lon!r}\x00{split}\x00{stamp}\x01".encode())
        for c in (c for c in SOURCE_COLUMNS if c in rows.columns):
            h.update(f"{c}\x02".encode() + "\x01".join(rows[c].astype(str)).encode())
        return h.hexdigest()

    def coords(self) -> pd.DataFrame:
        out = self.df.rename(columns={"image": "key"})
        return out[["key", "lat", "lon", "split"] + [c for c in META_COLUMNS if c in out.columns and c != "split"]]


# --------------------------------------------------------------------------- shared helpers

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")          # WebDataset members that hold the photo
LAT_NAMES = ("lat", "latitude")                      # coordinate names detected (case ignored)
LON_NAMES = ("lon", "lng", "long", "longitude")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt", ".geoparquet")   # a .parquet is decided by its schema
# Skip reasons (the keys of `Source.skipped`).
NO_IMAGE = "no image"
NO_COORDS = "missing coordinates"
NO_COORD_FIELDS = "no lat/lon field in .json"
BAD_COORDS = "coordinates out of range"
BAD_JSON = "unreadable .json"
FORMS = ("give one of: a manifest (.csv or .parquet with columns image (file paths), lat, lon); WebDataset tar "
         "shards (a .tar file, a folder of .tar files, or a pattern such as shards/{00000..00099}.tar); Parquet "
         "files with an image-bytes column (a .parquet file or a folder of them)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")   # two letters at least, so C:\ stays a path


def _find_name(names: Any, candidates: tuple[str, ...], given: str | None) -> str | None:
    """The field for a coordinate: `given` when set (None if absent), else the first of `candidates` present (case ignored)."""
    if given:
        return given if given in names else None
    exact = next((c for c in candidates if c in names), None)   # the common case, without lower-casing every name
    if exact is not None:
        return exact
    low: dict[str, str] = {}
    for n in names:
        low.setdefault(str(n).lower(), n)
    return next((low[c] for c in candidates if c in low), None)


def _to_float(value: Any) -> float:
    """A coordinate as float; NaN when absent or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _coord_reason(lat: float, lon: float) -> str:
    """`_coord_reasons` for one sample, without numpy's per-call cost (WebDataset reads sample by sample)."""
    if math.isnan(lat) or math.isnan(lon):
        return NO_COORDS
    return BAD_COORDS if abs(lat) > 90 or abs(lon) > 180 else ""


def _coord_reasons(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Per sample '' when the coordinates are usable, else the skip reason (NaN: missing; inf or beyond range: out of range)."""
    missing = np.isnan(lat) | np.isnan(lon)
    out = ~missing & ((np.abs(lat) > 90) | (np.abs(lon) > 180))
    return np.where(missing, NO_COORDS, np.where(out, BAD_COORDS, "")).astype(object)


def _local_path(name: str) -> Path | None:
    """The local file a shard name means (plain path or file:// URL); None for remote URLs and pipe: commands."""
    m = _SCHEME.match(name)
    if not m:
        return Path(name)
    if m.group(1).lower() == "file":
        return Path(url2pathname(urlparse(name).path))
    return None


def _file_fingerprint(name: str) -> str:
    """size:mtime_ns of a local file ('missing' when gone); the URL itself for remote shards."""
    local = _local_path(name)
    if local is None:
        return f"url:{name}"
    try:
        st = os.stat(local)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _has_magic(name: str) -> bool:
    return any(c in name for c in "*?[")


def _finish_coords(frames: list[pd.DataFrame], source: Source) -> pd.DataFrame:
    """One coords frame from per-shard pieces, taken_at/heading under the rule of `fields` (as read_manifest's)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        raise UserError(f"data source {source.spec} holds no usable sample; check it (skipped: {dict(source.skipped)})")
    df = normalize_fields(pd.concat(frames, ignore_index=True))
    return df[["key", "lat", "lon", "split"] + [c for c in META_COLUMNS if c in df.columns and c != "split"]]


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Meta fields without the absent ones (None, NaN, NaT)."""
    return {k: v for k, v in meta.items() if not (v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v)))}


# --------------------------------------------------------------------------- WebDataset


def _expand_tar_spec(spec: str | os.PathLike | list | tuple) -> list[str]:
    """Shard names from a brace pattern ('::' joins several), a glob, a folder, a file or a list; local ones must exist."""
    parts = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else str(spec).split("::")
    out: list[str] = []
    for name in (n for part in parts for n in braceexpand(part)):
        local = _local_path(name)
        if local is not None and local.is_dir():
            tars = sorted(str(p) for p in local.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
            if not tars:
                raise UserError(f"folder {name} holds no .tar shards; give the folder img2dataset wrote or a pattern such as {name}/{{00000..00099}}.tar")
            out += tars
        elif local is not None and _has_magic(name):
            out += sorted(glob.glob(name))
        else:
            out.append(name)
    missing = [n for n in out if (p := _local_path(n)) is not None and not p.is_file()]
    if not out or len(missing) == len(out):
        raise UserError(f"WebDataset shards {spec} match no file; check the folder and the pattern (e.g. shards/{{00000..00099}}.tar)")
    if missing:
        raise UserError(f"WebDataset shards {spec}: {len(missing)} of {len(out)} do not exist (first: {missing[0]}); "
                        "fix the pattern's range or leave them out")
    return out


def _open_stream(name: str) -> Any:
    """A binary stream of one shard: local files directly, URLs through webdataset's gopen (pipe:, http(s):,
    gs:, ...), other schemes (s3:, hf:, az:, ...) through fsspec."""
    local = _local_path(name)
    if local is not None:
        return open(local, "rb")
    if _SCHEME.match(name).group(1).lower() in gopen_schemes:
        return gopen(name, "rb")
    try:
        import fsspec  # optional: only URLs webdataset's gopen does not handle need it
    except ImportError as e:
        raise UserError(f"WebDataset shard {name}: no reader for this URL scheme; install fsspec (and its backend, e.g. s3fs) or use pipe:COMMAND") from e
    return fsspec.open(name, "rb").open()


def _shard_error(name: str, e: BaseException) -> UserError:
    """The UserError for a shard webdataset could not open or read to its end."""
    if isinstance(e, FileNotFoundError):
        return UserError(f"WebDataset shard {name} does not exist; fix the pattern or leave it out")
    msg = str(e.args[0]).split(" @ ")[0] if e.args else ""
    return UserError(f"WebDataset shard {name} is unreadable or truncated ({type(e).__name__}: {msg}); "
                     "re-download it or leave it out of the shard pattern")


class WebDatasetSource(Source):
    """WebDataset tar shards as img2dataset writes them: per sample KEY.jpg|jpeg|webp|png + KEY.json.

    The key of a sample is its webdataset `__key__` (the member name up to its first dot); img2dataset
    keys start with the shard number, so they are unique across shards; other writers' keys may repeat
    across shards and are passed on as they are. The .json holds the coordinates (lat/latitude,
    lon/lng/long/longitude, or the `lat_key`/`lon_key` given) and optionally split, taken_at, heading,
    location_id, id, and url, source, license, author (img2dataset writes `url`: the photo's address). A truncated or corrupt tar yields the samples read before the damage (webdataset
    drops the sample it was assembling) and then raises a UserError naming the shard; a tar cut exactly
    at a member boundary cannot be told from a shorter complete one.
    """

    kind = "webdataset"

    def __init__(self, spec: str | os.PathLike | list | tuple, strict: bool = False, image_key: str | None = None,
                 lat_key: str | None = None, lon_key: str | None = None):
        super().__init__(",".join(map(str, spec)) if isinstance(spec, (list, tuple)) else str(spec), strict)
        self._shards = _expand_tar_spec(spec)
        self.image_exts: tuple[str, ...] = (image_key.lower().lstrip("."),) if image_key else IMAGE_EXTS
        self.lat_key, self.lon_key = lat_key, lon_key

    @property
    def shards(self) -> list[str]:
        return list(self._shards)

    def fingerprint(self, shard: int) -> str:
        return _file_fingerprint(self._shards[shard])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image": list(self.image_exts), "lat": self.lat_key, "lon": self.lon_key}

    def _groups(self, shard: int, select: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
        """webdataset's tar iterators over one shard (members grouped by key); a shard that cannot be
        opened or read to its end -> UserError naming it, after the samples before the damage."""
        name = self._shards[shard]
        try:
            stream = _open_stream(name)
        except UserError:
            raise
        except Exception as e:
            raise _shard_error(name, e) from e
        closed = False
        try:
            files = tar_file_expander([{"url": name, "stream": stream}], handler=reraise_exception, select_files=select)
            yield from group_by_keys(files, handler=reraise_exception)
            closed = True
            stream.close()          # a pipe: command's exit status is checked here
        except Exception as e:
            raise _shard_error(name, e) from e
        finally:
            if not closed:          # damaged, or the caller stopped early
                with contextlib.suppress(Exception):
                    stream.close()

    def _where(self, shard: int, key: str) -> str:
        return f"WebDataset shard {self._shards[shard]} sample {key}"

    def _parse(self, raw: bytes | None, where: str) -> tuple[float, float, str, dict[str, Any]] | None:
        """lat, lon, split, meta from a sample's .json; None (skipped and counted) when unusable."""
        if raw is None:
            self.skip(NO_COORDS, where)
            return None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict):
            self.skip(BAD_JSON, where)
            return None
        lat_name, lon_name = _find_name(meta, LAT_NAMES, self.lat_key), _find_name(meta, LON_NAMES, self.lon_key)
        if lat_name is None or lon_name is None:
            self.skip(NO_COORD_FIELDS, where)
            return None
        lat, lon = _to_float(meta[lat_name]), _to_float(meta[lon_name])
        reason = _coord_reason(lat, lon)
        if reason:
            self.skip(reason, where)
            return None
        extra = _clean_meta({k: meta.get(k) for k in RECORD_COLUMNS if k != "split"})
        return lat, lon, normalise_split(meta.get("split")), extra

    def records(self, shard: int) -> Iterator[Record]:
        for sample in self._groups(shard, None):
            key = sample["__key__"]
            ext = next((e for e in self.image_exts if e in sample), None)
            if ext is None:
                self.skip(NO_IMAGE, self._where(shard, key))
                continue
            parsed = self._parse(sample.get("json"), self._where(shard, key))
            if parsed is not None:
                lat, lon, split, meta = parsed
                yield Record(key, lat, lon, sample[ext], split, meta)

    def _coord_rows(self, shard: int) -> Iterator[dict[str, Any]]:
        """coords() of one shard without reading image members: they are noted by name as the tar streams
        past (so a sample is known to have one) but not copied; image-only samples are counted at the end."""
        seen: set[str] = set()

        def select(fname: str) -> bool:
            key, ext = base_plus_ext(fname)
            if key is not None and ext.lower() in self.image_exts:
                seen.add(key)
                return False
            return True

        grouped: set[str] = set()
        for sample in self._groups(shard, select):
            key = sample["__key__"]
            grouped.add(key)
            if key not in seen:
                self.skip(NO_IMAGE, self._where(shard, key))
                continue
            parsed = self._parse(sample.get("json"), self._where(shard, key))
            if parsed is not None:
                yield dict(key=key, lat=parsed[0], lon=parsed[1], split=parsed[2], **parsed[3])
        for key in sorted(seen - grouped):
            self.skip(NO_COORDS, self._where(shard, key))

    def coords(self) -> pd.DataFrame:
        """key, lat, lon, split (+ meta) from the .json members only; images are never decoded or copied."""
        return _finish_coords([pd.DataFrame(list(self._coord_rows(i))) for i in range(len(self._shards))], self)


# --------------------------------------------------------------------------- Parquet with image bytes


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)


def _image_kind(t: pa.DataType) -> str | None:
    """'binary' (image bytes), 'struct' (the Hugging Face Image feature {bytes, path}) or None."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _image_kind(t.field("bytes").type) == "binary":
        return "struct"
    return None


@dataclass(frozen=True)
class _Layout:
    """Which columns of one Parquet file hold what."""

    image: str
    struct: bool                # HF Image struct {bytes, path}; else plain binary
    lat: str
    lon: str
    key: str | None             # None: keys are FILE_STEM:ROW
    split: str | None
    meta: tuple[str, ...]
    source: tuple[str, ...] = ()    # the source columns present (records read them, coords() does not)

    def columns(self, with_image: bool, with_source: bool = False) -> list[str]:
        cols = ([self.image] if with_image else []) + [self.lat, self.lon, self.key, self.split, *self.meta, *(self.source if with_source else ())]
        return list(dict.fromkeys(c for c in cols if c))


def _pick_image_column(path: Path, schema: pa.Schema, given: str | None, has: str) -> str:
    """The image-bytes column: `given` (checked), else the only binary / {bytes, path} column."""
    if given is not None:
        if given not in schema.names:
            raise UserError(f"Parquet file {path} has no column {given!r} (it has {has}); give image_column one of them")
        t = schema.field(given).type
        if _image_kind(t) is None:
            hint = "it holds file paths: open the file as a manifest (kind='manifest')" if _is_string(t) else "give a binary or {bytes, path} struct column"
            raise UserError(f"Parquet file {path}: column {given!r} is {t}, not image bytes; {hint}")
        return given
    found = [f.name for f in schema if _image_kind(f.type)]
    if len(found) > 1:
        named = [n for n in found if n.lower() in ("image", "img", "jpg", "jpeg", "png", "webp")]
        if len(named) == 1:
            return named[0]
        raise UserError(f"Parquet file {path} has several image-bytes columns ({', '.join(found)}); choose one with image_column")
    if not found:
        raise UserError(f"Parquet file {path} has no image column (binary, or a {{bytes, path}} struct; it has {has}); "
                        "give image_column, or for a manifest of file paths use an `image` column of paths")
    return found[0]


def _parquet_layout(path: Path, schema: pa.Schema, image: str | None, lat: str | None, lon: str | None,
                    key: str | None) -> _Layout:
    """Detect (or check the given) image, lat, lon and key columns of one file; UserError naming what it has."""
    names = schema.names
    has = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    img = _pick_image_column(path, schema, image, has)
    lat_c, lon_c = _find_name(names, LAT_NAMES, lat), _find_name(names, LON_NAMES, lon)
    for found, given, what in ((lat_c, lat, "latitude"), (lon_c, lon, "longitude")):
        if found is None:
            named = f" {given!r}" if given else ""
            raise UserError(f"Parquet file {path} has no {what} column{named} (it has {has}); name it lat/lon or "
                            "latitude/longitude, or give lat_column/lon_column")
    if key is not None and key not in names:
        raise UserError(f"Parquet file {path} has no key column {key!r} (it has {has}); give one of its columns as key_column")
    meta = tuple(c for c in META_COLUMNS if c != "split" and c in names)
    source = tuple(c for c in SOURCE_COLUMNS if c in names and c not in (img, lat_c, lon_c, key))
    return _Layout(img, _image_kind(schema.field(img).type) == "struct", lat_c, lon_c, key or ("id" if "id" in names else None),
                   "split" if "split" in names else None, meta, source)


def _parquet_files(spec: str | os.PathLike) -> list[Path]:
    """One .parquet file, a glob of them, or the .parquet files of a folder (sorted by name)."""
    path = _local_path(str(spec)) or Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES)
        if not files:
            nested = sorted(path.rglob("*.parquet"))[:1]
            hint = f" (there are some in {nested[0].parent}: give that folder)" if nested else ""
            raise UserError(f"folder {path} holds no .parquet files{hint}; give a .parquet file or a folder of them")
        return files
    if _has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec)) if p.lower().endswith(PARQUET_SUFFIXES))
        if not files:
            raise UserError(f"Parquet pattern {spec} matches no file; check the folder and the pattern")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"Parquet source {spec} does not exist; give a .parquet file or a folder of them")


def _may_lack_images(pf: pq.ParquetFile, lay: _Layout) -> bool:
    """Whether any image cell may be empty, from the row groups' null counts (no data read). False lets
    coords() skip the image column; unknown statistics count as 'may'."""
    md = pf.metadata
    leaf = f"{lay.image}.bytes" if lay.struct else lay.image
    cols = [j for j in range(md.num_columns) if md.schema.column(j).path == leaf]
    if not cols:
        return True
    for r in range(md.num_row_groups):
        for j in cols:
            st = md.row_group(r).column(j).statistics
            if st is None or not st.has_null_count or st.null_count > 0:
                return True
    return False


class ParquetSource(Source):
    """Parquet files with an image-bytes column (the Hugging Face `datasets` layout, OSV-5M): each file one
    shard. The image column is binary or the HF Image struct {bytes, path} (detected: the one such column,
    or `image_column`); a struct row with no bytes but a path reads that file (relative to the Parquet
    file's folder). Keys: `key_column`, else an `id` column, else FILE_STEM:ROW. Files are streamed in
    batches of `batch_size` rows, reading only the columns needed."""

    kind = "parquet"

    def __init__(self, spec: str | os.PathLike, strict: bool = False, image_column: str | None = None,
                 lat_column: str | None = None, lon_column: str | None = None, key_column: str | None = None,
                 batch_size: int = 256):
        super().__init__(str(spec), strict)
        if batch_size < 1:
            raise UserError(f"Parquet batch size must be at least 1, got {batch_size}")
        self._files = _parquet_files(spec)
        self._options = dict(image=image_column, lat=lat_column, lon=lon_column, key=key_column)
        self.batch_size = int(batch_size)
        self._layouts: dict[int, _Layout] = {}
        self._open(0)[0].close()   # a first file without an image or coordinate column fails here, not mid-run

    @property
    def shards(self) -> list[str]:
        return [str(f) for f in self._files]

    def fingerprint(self, shard: int) -> str:
        return _file_fingerprint(str(self._files[shard]))

    def describe(self) -> dict[str, Any]:
        lay = self._layouts[0]
        return {**super().describe(), "image": lay.image, "lat": lay.lat, "lon": lay.lon, "key": lay.key}

    def _open(self, shard: int) -> tuple[pq.ParquetFile, _Layout]:
        """The file (caller closes it) and its column layout (detected once per file)."""
        path = self._files[shard]
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError as e:
            raise UserError(f"Parquet file {path} does not exist; give the folder again or leave it out") from e
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"Parquet file {path} is unreadable ({type(e).__name__}: {e}); re-download it or leave it out") from e
        if shard not in self._layouts:
            try:
                self._layouts[shard] = _parquet_layout(path, pf.schema_arrow, **self._options)
            except UserError:
                pf.close()
                raise
        return pf, self._layouts[shard]

    def _batches(self, shard: int, pf: pq.ParquetFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        try:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"Parquet file {self._files[shard]} is unreadable ({type(e).__name__}: {e}); re-download it or leave it out") from e

    def _keys(self, shard: int, lay: _Layout, batch: pa.RecordBatch, row0: int) -> np.ndarray:
        """Each row's key: the key column's value, else FILE_STEM:ROW."""
        default = np.char.add(f"{self._files[shard].stem}:", np.arange(row0, row0 + batch.num_rows).astype(str)).astype(object)
        if lay.key is None:
            return default
        try:
            keys = batch.column(lay.key).cast(pa.string()).to_numpy(zero_copy_only=False)
        except pa.ArrowException as e:
            raise UserError(f"Parquet file {self._files[shard]}: key column {lay.key!r} is not text or numbers; give another key_column") from e
        return np.where(pd.isna(keys), default, keys)

    def _images(self, shard: int, lay: _Layout, batch: pa.RecordBatch) -> tuple[list[Any], np.ndarray]:
        """Each row's image (bytes, or a file path for HF rows holding only a path) and which rows have none."""
        col = batch.column(lay.image)
        if not lay.struct:
            return col.to_pylist(), col.is_null().to_numpy(zero_copy_only=False)
        fields = {f.name: a for f, a in zip(col.type, col.flatten())}
        data = fields["bytes"].to_pylist()
        empty = fields["bytes"].is_null().to_numpy(zero_copy_only=False)
        if "path" in fields and empty.any():
            paths = fields["path"].to_pylist()
            root = self._files[shard].parent
            for j in np.flatnonzero(empty):
                if paths[j]:
                    data[j], empty[j] = str(root / paths[j]), False
        return data, empty

    def _batch(self, shard: int, lay: _Layout, batch: pa.RecordBatch, row0: int,
               with_image: bool) -> tuple[pd.DataFrame, np.ndarray, list[Any] | None]:
        """One batch as a frame (key, lat, lon, split, meta), each row's skip reason ('' when usable) and,
        with `with_image`, each row's image."""
        lat = pd.to_numeric(batch.column(lay.lat).to_pandas(), errors="coerce").to_numpy(np.float64)
        lon = pd.to_numeric(batch.column(lay.lon).to_pandas(), errors="coerce").to_numpy(np.float64)
        split = normalise_splits(batch.column(lay.split).cast(pa.string()).to_pandas()) if lay.split else TRAIN
        frame = pd.DataFrame({"key": self._keys(shard, lay, batch, row0), "lat": lat, "lon": lon, "split": split,
                              **{c: batch.column(c).to_pandas() for c in (*lay.meta, *lay.source) if c in batch.schema.names}})
        reasons = _coord_reasons(lat, lon)
        images = None
        if with_image:
            images, empty = self._images(shard, lay, batch)
            reasons[empty] = NO_IMAGE
        return frame, reasons, images

    def _skip_rows(self, shard: int, reasons: np.ndarray, keys: np.ndarray, row0: int) -> None:
        """Count a batch's unusable rows by reason (strict: refuse the first by file, row and key)."""
        bad = np.flatnonzero(reasons != "")
        if not len(bad):
            return
        if self.strict:
            j = bad[0]
            self.skip(reasons[j], f"Parquet file {self._files[shard]} row {row0 + j} (key {keys[j]})")
        names, counts = np.unique(reasons[bad].astype(str), return_counts=True)
        self.skipped.update(dict(zip(names.tolist(), counts.tolist())))

    def records(self, shard: int) -> Iterator[Record]:
        pf, lay = self._open(shard)
        with contextlib.closing(pf):
            row0 = 0
            for batch in self._batches(shard, pf, lay.columns(True, with_source=True), self.batch_size):
                frame, reasons, images = self._batch(shard, lay, batch, row0, True)
                self._skip_rows(shard, reasons, frame["key"].to_numpy(), row0)
                good = np.flatnonzero(reasons == "")
                kept = [*lay.meta, *lay.source]
                metas = frame[kept].iloc[good].to_dict("records") if kept else [{}] * len(good)
                keys, lat, lon, split = (frame[c].to_numpy() for c in ("key", "lat", "lon", "split"))
                for j, meta in zip(good, metas):
                    yield Record(str(keys[j]), float(lat[j]), float(lon[j]), images[j], str(split[j]), _clean_meta(meta))
                row0 += batch.num_rows

    def coords(self) -> pd.DataFrame:
        """key, lat, lon, split (+ meta) reading only those columns; the image column too only where the
        row groups' null counts say an image may be missing."""
        frames = []
        for shard in range(len(self._files)):
            pf, lay = self._open(shard)
            with contextlib.closing(pf):
                need = _may_lack_images(pf, lay)
                row0 = 0
                for batch in self._batches(shard, pf, lay.columns(need), self.batch_size if need else 65536):
                    frame, reasons, _ = self._batch(shard, lay, batch, row0, need)
                    self._skip_rows(shard, reasons, frame["key"].to_numpy(), row0)
                    frames.append(frame[reasons == ""])
                    row0 += batch.num_rows
        return _finish_coords(frames, self)


# --------------------------------------------------------------------------- detection

SOURCES: dict[str, type[Source]] = {"manifest": ManifestSource, "webdataset": WebDatasetSource, "parquet": ParquetSource}


def _parquet_file_kind(path: Path) -> str:
    """A .parquet file: a manifest when its `image` column holds strings (paths), else image bytes."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"Parquet file {path} is unreadable ({type(e).__name__}: {e}); re-download it or give another") from e
    return "manifest" if "image" in schema.names and _is_string(schema.field("image").type) else "parquet"


def _kind_of_files(spec: Any, names: list[str]) -> str:
    """The kind of a folder's or a glob's files: any .tar -> webdataset (an img2dataset folder also holds
    .parquet stats), else .parquet -> parquet."""
    low = [n.lower() for n in names]
    if any(n.endswith(TAR_SUFFIXES) for n in low):
        return "webdataset"
    if any(n.endswith(PARQUET_SUFFIXES) for n in low):
        return "parquet"
    raise UserError(f"data source {spec} holds no .tar or .parquet files; {FORMS}")


def detect_kind(spec: str | os.PathLike | list | tuple) -> str:
    """'manifest', 'webdataset' or 'parquet' for `spec` (see open_source); UserError for anything else."""
    if isinstance(spec, (list, tuple)):
        return "webdataset"
    s = str(spec)
    names = [n for part in s.split("::") for n in braceexpand(part)]
    if len(names) > 1 or _local_path(s) is None:       # a pattern, a URL or a pipe: command
        if s.startswith("pipe:") or all(n.lower().endswith(TAR_SUFFIXES) for n in names):
            return "webdataset"
        raise UserError(f"data source {s} is a pattern or URL of something other than .tar shards; {FORMS}")
    path = _local_path(s)   # a plain path or a file:// URL
    if path.is_dir():
        return _kind_of_files(s, [p.name for p in path.iterdir() if p.is_file()])
    if _has_magic(s) and not path.exists():
        return _kind_of_files(s, glob.glob(s))
    if not path.is_file():
        raise UserError(f"data source {s} does not exist; {FORMS}")
    low = path.name.lower()
    if low.endswith(TAR_SUFFIXES):
        return "webdataset"
    if low.endswith(PARQUET_SUFFIXES):
        return _parquet_file_kind(path)
    if low.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    raise UserError(f"data source {s} is not a known kind of file; {FORMS}")


def _options_of(cls: type[Source]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "spec", "strict"}


def open_source(spec: str | os.PathLike | list | tuple, *, strict: bool = False, kind: str | None = None,
                **options: Any) -> Source:
    """The reader for `spec`:

    - a .tar file, a folder holding .tar files, a brace pattern / glob / list of .tar shards, a URL or
      `pipe:` command -> WebDatasetSource (options image_key, lat_key, lon_key);
    - a .parquet file whose `image` column holds strings (paths), or a .csv/.tsv -> ManifestSource
      (option rows_per_shard);
    - a .parquet file with a binary / {bytes, path} image column, or a folder of .parquet files ->
      ParquetSource (options image_column, lat_column, lon_column, key_column, batch_size).

    `kind` ('manifest' | 'webdataset' | 'parquet') skips detection. Options that the chosen reader does
    not take are ignored (so one call site can pass them all); a name no reader takes is a TypeError.
    """
    known = set().union(*(_options_of(c) for c in SOURCES.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"open_source() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if kind is not None and kind not in SOURCES:
        raise UserError(f"data source kind {kind!r} is unknown; give one of {', '.join(SOURCES)}")
    cls = SOURCES[kind or detect_kind(spec)]
    mine = _options_of(cls)
    return cls(spec, strict=strict, **{k: v for k, v in options.items() if k in mine})


__all__ = ["Record", "Source", "ManifestSource", "WebDatasetSource", "ParquetSource", "open_source", "detect_kind",
           "META_COLUMNS", "RECORD_COLUMNS", "IMAGE_EXTS", "LAT_NAMES", "LON_NAMES"]
