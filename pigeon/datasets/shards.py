"""Writers of the two sharded layouts `pigeon.datasets.sources` reads (tests, benchmarks, conversions).

- `write_webdataset`: tar shards as img2dataset writes them: per sample KEY.<image_format> and
  KEY.json (key, status, the coordinates and the frame's other columns), members in sorted order
  as webdataset's TarWriter writes them, keys img2dataset-style (shard number + row) unless the
  frame has a `key` column;
- `write_image_parquet`: Parquet files in the Hugging Face `datasets` layout: an `image` column
  (the HF Image struct {bytes, path}, or plain binary), the coordinates, `id` (the frame's `key`) and
  the frame's other columns.

The frame is a manifest (`read_manifest` output: `path` absolute, or `image` paths relative to
`root`) or holds the image bytes in a `data` column (or bytes in `image`). Images whose format
already matches are copied byte for byte (decoded pixels stay equal); others are re-encoded.
Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..core.errors import UserError
from ..core.io import atomic_path

PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
SOURCE_COLUMNS = ("data", "path", "image")   # where a frame's images come from, first present wins
_MTIME = 1_700_000_000                       # fixed member time: the same frame gives the same bytes


def _image_values(frame: pd.DataFrame, root: str | os.PathLike | None) -> tuple[list[Any], str]:
    """Each row's image (bytes or an absolute path) and the column it came from."""
    col = next((c for c in SOURCE_COLUMNS if c in frame.columns), None)
    if col is None:
        raise UserError(f"image frame has none of the columns {', '.join(SOURCE_COLUMNS)} (it has {', '.join(map(str, frame.columns))}); give image bytes or paths")
    values = frame[col].tolist()
    base = Path(root) if root is not None else Path.cwd()
    return [v if isinstance(v, (bytes, bytearray)) or os.path.isabs(str(v)) else str(base / str(v)) for v in values], col


def _encoded(value: Any, fmt: str | None, quality: int) -> bytes:
    """The image as `fmt` bytes: the source bytes unchanged when already `fmt` (or fmt is None), else re-encoded."""
    raw = bytes(value) if isinstance(value, (bytes, bytearray)) else Path(value).read_bytes()
    if fmt is None:
        return raw
    with Image.open(io.BytesIO(raw)) as im:
        if im.format == PIL_FORMATS[fmt]:
            return raw
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def _keys(frame: pd.DataFrame, per: int) -> list[str]:
    """The frame's `key` column, else img2dataset keys: 5-digit shard number + row within the shard."""
    if "key" in frame.columns:
        return frame["key"].astype(str).tolist()
    digits = max(4, len(str(per - 1)))
    rows = np.arange(len(frame))
    return [f"{s:05d}{r:0{digits}d}" for s, r in zip(rows // per, rows % per)]


def _meta_frame(frame: pd.DataFrame, source_col: str, coord_names: Sequence[str]) -> pd.DataFrame:
    """The frame's columns that go beside the image: everything but the image source and `key`, lat/lon renamed."""
    drop = [c for c in ("data", "path", "key", source_col) if c in frame.columns]
    meta = frame.drop(columns=drop).rename(columns={"lat": coord_names[0], "lon": coord_names[1]})
    return meta.rename(columns={"image": "url"})   # a manifest's relative path: img2dataset keeps the source as `url`


def _check(frame: pd.DataFrame, per: int, fmt: str | None, coord_names: Sequence[str]) -> None:
    if per < 1:
        raise UserError(f"samples per shard must be at least 1, got {per}")
    if fmt is not None and fmt not in PIL_FORMATS:
        raise UserError(f"image format {fmt!r} is unknown; give one of {', '.join(PIL_FORMATS)}")
    missing = [c for c in ("lat", "lon") if c not in frame.columns]
    if missing or len(coord_names) != 2:
        raise UserError(f"image frame lacks column(s) {', '.join(missing) or 'lat/lon'}; give lat and lon (and two coord_names)")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(frame: pd.DataFrame, out_dir: str | os.PathLike, per_shard: int = 1000, image_format: str = "jpg",
                     coord_names: Sequence[str] = ("lat", "lon"), root: str | os.PathLike | None = None,
                     quality: int = 95) -> list[Path]:
    """Write `frame` as tar shards OUT/00000.tar, 00001.tar, ... of `per_shard` samples; returns their paths.

    Each sample: KEY.<image_format> and KEY.json ({"key", "status": "success", coord_names[0],
    coord_names[1], split, ... every other column}), as img2dataset writes them.
    """
    _check(frame, per_shard, image_format, coord_names)
    frame = frame.reset_index(drop=True)
    images, source_col = _image_values(frame, root)
    keys = _keys(frame, per_shard)
    metas = json.loads(_meta_frame(frame, source_col, coord_names).to_json(orient="records", date_format="iso"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(frame), per_shard)):
        dest = out / f"{s:05d}.tar"
        with atomic_path(dest) as tmp, tarfile.open(tmp, "w") as tar:
            for j in range(start, min(start + per_shard, len(frame))):
                members = {image_format: _encoded(images[j], image_format, quality),
                           "json": json.dumps({"key": keys[j], "status": "success", **metas[j]}).encode()}
                for ext in sorted(members):   # webdataset's TarWriter order
                    _add_member(tar, f"{keys[j]}.{ext}", members[ext])
        paths.append(dest)
    return paths


def _image_array(data: list[bytes], names: list[str], hf_struct: bool) -> pa.Array:
    """The HF Image column ({bytes, path} struct) or plain binary."""
    raw = pa.array(data, pa.binary())
    if not hf_struct:
        return raw
    return pa.StructArray.from_arrays([raw, pa.array(names, pa.string())], names=["bytes", "path"])


def write_image_parquet(frame: pd.DataFrame, out_dir: str | os.PathLike, per_file: int = 1000, hf_struct: bool = True,
                        coord_names: Sequence[str] = ("lat", "lon"), root: str | os.PathLike | None = None,
                        image_format: str | None = None, row_group_size: int = 256, quality: int = 95) -> list[Path]:
    """Write `frame` as OUT/train-00000-of-0000N.parquet, ... of `per_file` rows; returns their paths.

    Columns: image (HF struct {bytes, path} or binary when not `hf_struct`; bytes as they are unless
    `image_format` asks for another), coord_names, id (the frame's `key` column when it has one and no
    `id`), and the frame's other columns. Row groups of `row_group_size` rows, so readers can stream.
    """
    _check(frame, per_file, image_format, coord_names)
    frame = frame.reset_index(drop=True)
    images, source_col = _image_values(frame, root)
    meta = _meta_frame(frame, source_col, coord_names)
    if "key" in frame.columns and "id" not in meta.columns:
        meta.insert(0, "id", frame["key"].astype(str))
    names = [Path(v).name if isinstance(v, str) else f"{k}.{image_format or 'jpg'}" for v, k in zip(images, _keys(frame, per_file))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = (len(frame) + per_file - 1) // per_file
    paths = []
    for i, start in enumerate(range(0, len(frame), per_file)):
        part = slice(start, min(start + per_file, len(frame)))
        table = pa.Table.from_pandas(meta.iloc[part], preserve_index=False)
        data = [_encoded(v, image_format, quality) for v in images[part]]
        table = table.add_column(0, "image", _image_array(data, names[part], hf_struct))
        dest = out / f"train-{i:05d}-of-{n:05d}.parquet"
        with atomic_path(dest) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_size)
        paths.append(dest)
    return paths


__all__ = ["write_webdataset", "write_image_parquet", "PIL_FORMATS"]
