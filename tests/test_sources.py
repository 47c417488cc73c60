"""Data sources: WebDataset tar shards and image Parquet files give the same samples as the manifest of the
same photos (keys, coordinates, splits, decoded pixels); patterns, folders and files; fingerprints; bad
input skipped and counted by reason, or refused by name."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pigeon.core.errors import UserError
from pigeon.datasets import Record, Source, load_image, open_source
from pigeon.datasets.manifest import read_manifest
from pigeon.datasets.shards import write_image_parquet, write_webdataset
from pigeon.datasets.sources import ManifestSource, ParquetSource, WebDatasetSource
from pigeon.datasets.synthetic import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """60 small synthetic photos (JPEG) with their manifest, a frame keyed by file stem, and the shards."""
    root = tmp_path_factory.mktemp("sources")
    manifest = make_world(root / "w", n_images=60, image_size=32, seed=5, fmt="jpg")
    df = read_manifest(manifest)
    df["key"] = [Path(p).stem for p in df["image"]]
    tars = write_webdataset(df, root / "wds", per_shard=16)
    parquets = write_image_parquet(df, root / "pq", per_file=25, coord_names=("latitude", "longitude"))
    return {"root": root, "manifest": manifest, "df": df, "tars": tars, "parquets": parquets}


def _rows(src: Source, stem_keys: bool = False) -> dict[str, tuple]:
    """key -> (lat, lon, split, decoded pixels) over every shard."""
    out = {}
    for i in range(len(src.shards)):
        for r in src.records(i):
            assert isinstance(r, Record) and isinstance(r.data, (bytes, str))
            key = Path(r.key).stem if stem_keys else r.key
            out[key] = (r.lat, r.lon, r.split, np.asarray(load_image(r.data, r.key)))
    return out


@pytest.fixture(scope="module")
def expected(world):
    return _rows(ManifestSource(str(world["manifest"]), rows_per_shard=16), stem_keys=True)


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, (lat, lon, split, px) in want.items():
        g = got[k]
        assert (g[0], g[1], g[2]) == (lat, lon, split), k
        assert g[3].shape == px.shape and np.array_equal(g[3], px), k


def test_webdataset_gives_the_manifest_samples_from_folder_pattern_list_and_file(world, expected):
    tars = world["tars"]
    assert [p.name for p in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    folder = world["root"] / "wds"
    for spec in (folder, f"{folder}/{{00000..00003}}.tar", [str(p) for p in tars], f"{folder}/*.tar"):
        src = open_source(spec)
        assert isinstance(src, WebDatasetSource) and src.shards == [str(p) for p in tars], spec
        _assert_same(_rows(src), expected)
        assert not src.skipped
    one = open_source(tars[1])
    assert isinstance(one, WebDatasetSource) and one.shards == [str(tars[1])]
    got = _rows(one)
    assert len(got) == 16
    _assert_same(got, {k: expected[k] for k in got})
    rec = next(open_source(folder).records(0))
    assert rec.meta["heading"] == pytest.approx(world["df"].set_index("key").loc[rec.key, "heading"])


def test_webdataset_reads_pipe_commands_and_file_urls(world, expected, tmp_path):
    """Names with a scheme go through webdataset's gopen: `pipe:` streams a command's output and a
    failing command refuses the shard; file:// URLs are local files (fingerprint size:mtime)."""
    tar = world["tars"][2]
    piped = open_source(f"pipe:cat {tar}")
    assert isinstance(piped, WebDatasetSource) and piped.fingerprint(0) == f"url:pipe:cat {tar}"
    got = _rows(piped)
    assert len(got) == 16
    _assert_same(got, {k: expected[k] for k in got})
    with pytest.raises(UserError, match=r"shard pipe:cat .*nope\.tar 2>/dev/null is unreadable"):
        list(open_source(f"pipe:cat {tmp_path}/nope.tar 2>/dev/null").records(0))
    url = open_source(f"file://{tar}")
    st = os.stat(tar)
    assert url.fingerprint(0) == f"{st.st_size}:{st.st_mtime_ns}" and sorted(_rows(url)) == sorted(got)


def test_webdataset_coords_match_the_manifest(world):
    src = open_source(world["root"] / "wds")
    c = src.coords().set_index("key").sort_index()
    m = ManifestSource(str(world["manifest"])).coords()
    m = m.assign(key=[Path(k).stem for k in m["key"]]).set_index("key").sort_index()
    assert list(c.columns) == ["lat", "lon", "split", "taken_at", "heading"]
    pd.testing.assert_frame_equal(c[["lat", "lon", "split", "heading"]], m[["lat", "lon", "split", "heading"]])
    assert (c["taken_at"] == m["taken_at"]).all()


def test_parquet_gives_the_manifest_samples(world, expected):
    parquets = world["parquets"]
    assert [p.name for p in parquets] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    src = open_source(world["root"] / "pq")
    assert isinstance(src, ParquetSource) and src.shards == [str(p) for p in parquets]
    assert src.describe()["image"] == "image" and src.describe()["lat"] == "latitude" and src.describe()["key"] == "id"
    _assert_same(_rows(src), expected)
    one = open_source(parquets[2])
    assert isinstance(one, ParquetSource) and len(_rows(one)) == 10
    # plain binary image column, lat/lon names, no key column -> FILE_STEM:ROW keys
    write_image_parquet(world["df"].drop(columns=["key"]), world["root"] / "bin", per_file=100, hf_struct=False)
    plain = open_source(world["root"] / "bin")
    got = _rows(plain)
    assert sorted(got)[:2] == ["train-00000-of-00001:0", "train-00000-of-00001:1"]
    stems = [Path(p).stem for p in world["df"]["image"]]
    _assert_same({stems[int(k.split(":")[1])]: v for k, v in got.items()}, expected)


def test_parquet_coords_read_only_the_metadata_columns(world, monkeypatch):
    read: list[list[str]] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        read.append(list(kw.get("columns") or []))
        return real(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    src = open_source(world["root"] / "pq")
    c = src.coords()
    assert len(c) == 60 and read and all("image" not in cols for cols in read)
    assert set(read[0]) == {"latitude", "longitude", "id", "split", "taken_at", "heading"}
    m = world["df"].set_index("key").sort_index()
    c = c.set_index("key").sort_index()
    assert np.array_equal(c["lat"].to_numpy(), m["lat"].to_numpy()) and (c["split"] == m["split"]).all()
    read.clear()
    next(src.records(0))
    assert "image" in read[0]


def test_fingerprint_changes_when_a_shard_is_rewritten(world, tmp_path):
    wds = tmp_path / "wds"
    shutil.copytree(world["root"] / "wds", wds)
    src = open_source(wds)
    before = [src.fingerprint(i) for i in range(4)]
    assert len(set(before)) == 4 and before == [src.fingerprint(i) for i in range(4)]
    (small,) = write_webdataset(world["df"].iloc[:5], tmp_path / "other", per_shard=16)
    os.replace(small, wds / "00001.tar")
    after = [src.fingerprint(i) for i in range(4)]
    assert after[1] != before[1] and [after[i] for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]
    st = os.stat(wds / "00002.tar")      # same size, new time: changed too
    os.utime(wds / "00002.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert src.fingerprint(2) != after[2]
    pqd = tmp_path / "pq"
    shutil.copytree(world["root"] / "pq", pqd)
    psrc = open_source(pqd)
    fp = psrc.fingerprint(0)
    write_image_parquet(world["df"].iloc[:7], pqd, per_file=25, coord_names=("latitude", "longitude"))  # rewrites file 0 of 1
    assert psrc.fingerprint(0) == fp  # different name (of-00001): file 0 of 3 untouched
    os.replace(pqd / "train-00000-of-00001.parquet", pqd / "train-00000-of-00003.parquet")
    assert psrc.fingerprint(0) != fp


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _j(**kw) -> bytes:
    return json.dumps(kw).encode()


@pytest.fixture()
def bad_tar(world, tmp_path):
    jpg = Path(world["df"]["path"][0]).read_bytes()
    return _tar(tmp_path / "bad.tar", [
        ("a0.jpg", jpg), ("a0.json", _j(lat=10.0, lon=20.0, split="val", location_id="L1")),
        ("a1.json", _j(lat=1.0, lon=2.0)),                                  # no image
        ("a2.json", _j(lat=1.0, lon=2.0)), ("a2.txt", b"a caption"),         # a caption, no image
        ("a3.jpg", jpg),                                                     # no .json
        ("a4.jpg", jpg), ("a4.json", _j(lat=None, lon=3.0)),                 # missing lat
        ("a5.jpg", jpg), ("a5.json", _j(lat=95.0, lon=3.0)),                 # out of range
        ("a6.jpg", jpg), ("a6.json", _j(foo=1)),                             # no coordinate field
        ("a7.jpg", b"not an image at all"), ("a7.json", _j(latitude=1.5, lng=2.5)),  # undetected here
        ("a8.jpg", jpg), ("a8.json", b"{not json"),                          # unreadable json
        ("a9.webp", jpg), ("a9.json", _j(Latitude="12.5", Longitude="-3")),  # names in any case, numbers as text
    ])


SKIPPED = Counter({"no image": 2, "missing coordinates": 2, "coordinates out of range": 1,
                   "no lat/lon field in .json": 1, "unreadable .json": 1})


def test_webdataset_bad_samples_are_skipped_and_counted(bad_tar):
    src = open_source(bad_tar)
    recs = {r.key: r for r in src.records(0)}
    assert sorted(recs) == ["a0", "a7", "a9"]
    assert src.skipped == SKIPPED
    assert (recs["a0"].lat, recs["a0"].lon, recs["a0"].split, recs["a0"].meta) == (10.0, 20.0, "val", {"location_id": "L1"})
    assert (recs["a7"].lat, recs["a7"].lon, recs["a9"].lat, recs["a9"].lon) == (1.5, 2.5, 12.5, -3.0)
    load_image(recs["a0"].data, "a0")
    with pytest.raises(UserError, match="a7 is unreadable"):     # a non-image member: the caller's decode refuses it
        load_image(recs["a7"].data, "a7")
    fresh = open_source(bad_tar)
    c = fresh.coords()
    assert sorted(c["key"]) == ["a0", "a7", "a9"] and fresh.skipped == SKIPPED
    with pytest.raises(UserError, match=r"bad\.tar sample a1: no image.*--strict"):
        list(open_source(bad_tar, strict=True).records(0))


def test_webdataset_coordinate_names_can_be_given(tmp_path, world):
    jpg = Path(world["df"]["path"][0]).read_bytes()
    path = _tar(tmp_path / "gps.tar", [("k.jpg", jpg), ("k.json", _j(gps_lat=-33.9, gps_lon=18.4))])
    src = open_source(path)
    assert list(src.records(0)) == [] and src.skipped == Counter({"no lat/lon field in .json": 1})
    (rec,) = open_source(path, lat_key="gps_lat", lon_key="gps_lon").records(0)
    assert (rec.key, rec.lat, rec.lon) == ("k", -33.9, 18.4)


def test_truncated_tar_yields_the_samples_before_then_refuses_the_shard(world, tmp_path):
    whole = world["tars"][0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    full = [r.key for r in open_source(world["tars"][0]).records(0)]
    got = []
    with pytest.raises(UserError, match=r"cut\.tar is unreadable or truncated.*re-download it or leave it out"):
        for r in open_source(cut).records(0):
            got.append(r.key)
    assert 0 < len(got) < len(full) and got == full[: len(got)]
    with pytest.raises(UserError, match=r"cut\.tar"):
        open_source(cut).coords()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(UserError, match=r"junk\.tar is unreadable"):
        list(open_source(junk).records(0))


def test_patterns_and_paths_that_match_nothing_are_refused_by_name(world, tmp_path):
    folder = world["root"] / "wds"
    with pytest.raises(UserError, match=r"nope/\{00000\.\.00003\}\.tar match no file"):
        open_source(f"{tmp_path}/nope/{{00000..00003}}.tar")
    with pytest.raises(UserError, match=r"6 of 10 do not exist \(first: .*00004\.tar\)"):
        open_source(f"{folder}/{{00000..00009}}.tar")
    with pytest.raises(UserError, match="does not exist; give one of: a manifest .*WebDataset tar shards.*Parquet files"):
        open_source(tmp_path / "missing.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds no \.tar or \.parquet files"):
        open_source(tmp_path / "empty")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match="not a known kind of file; give one of"):
        open_source(tmp_path / "notes.md")
    with pytest.raises(UserError, match="match no file"):
        WebDatasetSource(f"{tmp_path}/empty/*.tar")


def test_parquet_without_an_image_column_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"lat": [1.0], "lon": [2.0], "name": ["x"]}), path)
    for make in (lambda: open_source(path), lambda: ParquetSource(str(path))):
        with pytest.raises(UserError, match=r"meta\.parquet has no image column .*it has lat, lon, name.*`image` column of paths"):
            make()
    with pytest.raises(UserError, match=r"column 'name' is string, not image bytes; it holds file paths"):
        ParquetSource(str(path), image_column="name")
    pq.write_table(pa.table({"img": pa.array([b"x"]), "y": [1.0], "x": [2.0]}), tmp_path / "nocoord.parquet")
    with pytest.raises(UserError, match=r"nocoord\.parquet has no latitude column .*lat_column"):
        ParquetSource(str(tmp_path / "nocoord.parquet"))
    assert ParquetSource(str(tmp_path / "nocoord.parquet"), lat_column="y", lon_column="x").describe()["image"] == "img"


def test_parquet_bad_rows_are_skipped_and_counted(world):
    jpg = Path(world["df"]["path"][0]).read_bytes()
    img = pa.array([{"bytes": jpg, "path": "a.jpg"}, {"bytes": jpg, "path": None}, {"bytes": jpg, "path": None},
                    None, {"bytes": None, "path": "images/000003.jpg"}],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = world["manifest"].parent / "rows.parquet"   # beside images/, for the path-only row
    pq.write_table(pa.table({"image": img, "lat": [1.0, None, 95.0, 3.0, 4.0], "lon": [1.0] * 5,
                             "id": ["r0", "r1", "r2", "r3", "r4"]}), path)
    src = open_source(path)
    assert isinstance(src, ParquetSource)
    recs = {r.key: r for r in src.records(0)}
    assert sorted(recs) == ["r0", "r4"] and recs["r4"].data == str(path.parent / "images/000003.jpg")
    assert np.array_equal(np.asarray(load_image(recs["r4"].data)), np.asarray(load_image(world["df"]["path"][3])))
    assert src.skipped == Counter({"missing coordinates": 1, "coordinates out of range": 1, "no image": 1})
    fresh = open_source(path)
    assert sorted(fresh.coords()["key"]) == ["r0", "r4"] and fresh.skipped == src.skipped
    with pytest.raises(UserError, match=r"rows\.parquet row 1 \(key r1\): missing coordinates"):
        list(open_source(path, strict=True).records(0))


def test_detection_kinds_and_options(world, expected):
    df = world["df"]
    man_pq = world["manifest"].parent / "manifest.parquet"   # a Parquet manifest: `image` holds paths
    df[["image", "lat", "lon", "split"]].to_parquet(man_pq)
    src = open_source(man_pq, rows_per_shard=25, image_column="ignored here", lat_key="ignored")
    assert isinstance(src, ManifestSource) and len(src.shards) == 3
    _assert_same(_rows(src, stem_keys=True), expected)
    csv = open_source(world["manifest"], rows_per_shard=10)
    assert isinstance(csv, ManifestSource) and len(csv.shards) == 6
    assert isinstance(open_source(world["tars"][0], rows_per_shard=10), WebDatasetSource)
    with pytest.raises(UserError, match=r"manifest\.parquet has no image column"):
        open_source(man_pq, kind="parquet")
    with pytest.raises(UserError, match="kind 'zip' is unknown"):
        open_source(man_pq, kind="zip")
    with pytest.raises(TypeError, match="unknown option"):
        open_source(man_pq, image_colum="image")
