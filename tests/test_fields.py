"""The optional per-sample fields `taken_at` and `heading` follow one rule (pigeon.datasets.fields),
whichever way the photos come: the same awkward values through a CSV manifest (`read_manifest`, a
manifest source's coords), WebDataset tar shards and an image-Parquet file (coords), the pretraining
stream's batches, and `pigeon embed`'s folder give the same columns: taken_at naive UTC (mixed ISO
forms, an offset converted), heading wrapped into [0, 360), NaT / NaN where unknown or unparseable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pigeon.core.errors import UserError
from pigeon.datasets import open_source, read_manifest
from pigeon.datasets.fields import normalize_fields, parse_heading, parse_taken_at
from pigeon.datasets.shards import write_image_parquet, write_webdataset
from pigeon.datasets.stream import ShardStream
from pigeon.embeddings import EmbeddingStore

from worlds import cli

KEYS = ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]
TAKEN = ["2024-03-15T10:00:00", "2024-03-16 11:30", "2024-03-17T12:00:00+02:00", "", None, "not a date", "2024-03-18T23:30:00-01:00"]
HEADING = [-90, 370, 720.5, "abc", None, 45, "-0.0000000000000001"]
WANT_TAKEN = pd.to_datetime(["2024-03-15 10:00", "2024-03-16 11:30", "2024-03-17 10:00", None, None, None, "2024-03-19 00:30"])
WANT_HEADING = np.array([270.0, 10.0, 0.5, np.nan, np.nan, 45.0, 0.0])


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 7 photos as a CSV manifest, WebDataset shards (the raw values in each .json) and an
    image-Parquet file (text columns: Parquet cannot mix numbers and text in one column)."""
    root = tmp_path_factory.mktemp("fields")
    (root / "img").mkdir()
    for i, k in enumerate(KEYS):
        (root / "img" / f"{k}.png").write_bytes(_png(i))
    lat, lon = np.linspace(-40, 50, len(KEYS)), np.linspace(-120, 140, len(KEYS))
    manifest = root / "manifest.csv"
    pd.DataFrame({"image": [f"img/{k}.png" for k in KEYS], "lat": lat, "lon": lon, "taken_at": TAKEN, "heading": HEADING}).to_csv(manifest, index=False)
    frame = pd.DataFrame({"key": KEYS, "data": [_png(i) for i in range(len(KEYS))], "lat": lat, "lon": lon,
                          "taken_at": pd.Series(TAKEN, dtype=object), "heading": pd.Series(HEADING, dtype=object)})
    write_webdataset(frame, root / "wds", per_shard=4, image_format="png")
    text = frame.assign(heading=[None if h is None else str(h) for h in HEADING])
    write_image_parquet(text, root / "pq", per_file=100)
    return {"root": root, "manifest": manifest, "wds": root / "wds", "parquet": root / "pq"}


def _check(keys, taken_at, heading) -> None:
    """The columns, matched to KEYS by key, are the expected ones."""
    got = pd.DataFrame({"taken_at": np.asarray(taken_at), "heading": np.asarray(heading)},
                       index=[Path(str(k)).stem for k in keys]).loc[KEYS]
    assert got["taken_at"].dtype == np.dtype("datetime64[ns]")
    assert got["heading"].dtype == np.float64
    pd.testing.assert_series_equal(got["taken_at"], pd.Series(WANT_TAKEN, index=KEYS, name="taken_at"), check_freq=False)
    np.testing.assert_array_equal(got["heading"].to_numpy(), WANT_HEADING)
    h = got["heading"].dropna()
    assert ((h >= 0) & (h < 360)).all()


def test_the_rule_on_plain_values():
    t = parse_taken_at(TAKEN)
    assert t.dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(t.to_numpy(), WANT_TAKEN.to_numpy())
    np.testing.assert_array_equal(parse_heading(HEADING).to_numpy(), WANT_HEADING)
    # timestamps already parsed (aware -> UTC, naive kept) and numbers pass through the same rule
    aware = pd.Series(pd.to_datetime(["2024-03-17T12:00:00+02:00"]))
    assert parse_taken_at(aware).iloc[0] == pd.Timestamp("2024-03-17 10:00")
    assert parse_taken_at([pd.Timestamp("2024-03-17 10:00"), "2024-03-16 11:30"]).tolist() == [pd.Timestamp("2024-03-17 10:00"), pd.Timestamp("2024-03-16 11:30")]
    assert parse_heading(pd.Series([1, None], dtype="Int64")).tolist()[0] == 1.0
    # a frame: columns present are normalised, index kept; absent ones added only when asked
    df = pd.DataFrame({"heading": ["370"]}, index=[7])
    assert normalize_fields(df) is df and df["heading"].loc[7] == 10.0 and "taken_at" not in df.columns
    normalize_fields(df, add_missing=True)
    assert df["taken_at"].dtype == np.dtype("datetime64[ns]") and df["taken_at"].isna().all()


def test_read_manifest_and_every_source_kind_coords(sources):
    df = read_manifest(sources["manifest"])
    _check(df["image"], df["taken_at"], df["heading"])
    for spec in (sources["manifest"], sources["wds"], sources["parquet"]):
        c = open_source(spec).coords()
        _check(c["key"], c["taken_at"], c["heading"])


def test_read_manifest_strict_refuses_text_that_is_not_a_time(sources):
    with pytest.raises(UserError, match=r"`taken_at` in rows 5 is not a date/time"):
        read_manifest(sources["manifest"], strict=True)


@pytest.mark.parametrize("kind", ["manifest", "wds", "parquet"])
def test_stream_batches(sources, kind):
    src = open_source(sources[kind])
    stream = ShardStream(src, lambda im: torch.zeros(1), batch_size=1, split=None, buffer_size=1)
    batches = [b for b in stream if b.images is not None]
    _check([k for b in batches for k in b.keys], np.concatenate([b.taken_at for b in batches]),
           np.concatenate([b.heading for b in batches]))
    # all samples in one batch: its values are parsed together, in their mixed forms
    (whole,) = [b for b in ShardStream(src, lambda im: torch.zeros(1), batch_size=len(KEYS), split=None, buffer_size=1)
                if b.images is not None]
    _check(whole.keys, whole.taken_at, whole.heading)


@pytest.mark.parametrize("kind", ["manifest", "wds", "parquet"])
def test_pigeon_embed_folder(sources, kind, tmp_path):
    out = tmp_path / "emb"
    assert cli(["embed", "--data", str(sources[kind]), "--out", str(out), "--backbone", "tiny", "--device", "cpu",
                "--batch-size", "4", "-q"]) == 0
    store = EmbeddingStore(out)
    assert len(store) == len(KEYS)
    _check(store.keys(), store.rows["taken_at"], store.rows["heading"])
