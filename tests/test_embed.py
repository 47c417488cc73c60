"""`pigeon embed`: shards on disk, identical under 2-process torchrun, resumed after kill -9, read
memory-mapped by train / build-index / evaluate; bad inputs refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.backbones import create_backbone
from pigeon.core.errors import UserError
from pigeon.datasets import open_source
from pigeon.datasets.shards import write_webdataset
from pigeon.datasets.sources import WebDatasetSource
from pigeon.embed import cached_embeddings, embed_source
from pigeon.embeddings import EmbeddingStore, ShardFiles
from pigeon.core.sphere import haversine_km
from pigeon.head import BatchTargets

from worlds import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pigeon.datasets.synthetic import make_world

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("embed")
    manifest = make_world(root / "world", n_images=240, image_size=32, seed=5)
    bb = create_backbone("tiny")
    ref = embed_source(open_source(manifest, rows_per_shard=40), bb, root / "ref", batch_size=16, progress=False)
    return root, manifest, bb, ref


def _all(store: EmbeddingStore) -> np.ndarray:
    return store.take(np.arange(len(store)))


def test_shards_hold_the_backbone_embeddings_of_every_row(world):
    root, manifest, bb, ref = world
    assert ref["shards"] == 6 and ref["vectors"] == 240 and ref["missing_shards"] == [] and ref["skipped"] == {}
    store = EmbeddingStore(root / "ref", expect_backbone_hash=bb.hash)
    df = pd.read_csv(manifest)
    np.testing.assert_array_equal(store.keys(), df["image"].to_numpy())
    np.testing.assert_allclose(store.rows["lat"], df["lat"]) and np.testing.assert_allclose(store.rows["lon"], df["lon"])
    assert (store.rows["split"].to_numpy() == df["split"].to_numpy()).all()
    assert np.load(ShardFiles(root / "ref", 0).vectors, mmap_mode="r").dtype == np.float16
    from pigeon.datasets import load_image

    direct = bb.embed_images([load_image(root / "world" / p) for p in df["image"][:8]])
    np.testing.assert_allclose(store.take(np.arange(8)), direct, atol=2e-3)      # float16 on disk
    rows = np.array([200, 3, 41, 3])
    np.testing.assert_array_equal(store.take(rows), _all(store)[rows])


def test_workers_and_webdataset_give_the_same_vectors(world, tmp_path):
    root, manifest, bb, ref = world
    a = embed_source(open_source(manifest, rows_per_shard=40), bb, tmp_path / "w2", batch_size=16, workers=2, progress=False)
    assert a["vectors"] == 240
    np.testing.assert_array_equal(_all(EmbeddingStore(tmp_path / "w2")), _all(EmbeddingStore(root / "ref")))
    df = pd.read_csv(manifest)
    df["path"] = [str(root / "world" / p) for p in df["image"]]
    write_webdataset(df, tmp_path / "wds", per_shard=100, image_format="png")
    w = embed_source(open_source(tmp_path / "wds"), bb, tmp_path / "from-wds", batch_size=16, progress=False)
    store = EmbeddingStore(tmp_path / "from-wds")
    assert w["shards"] == 3 and len(store) == 240
    np.testing.assert_allclose(store.rows["lat"], df["lat"])
    np.testing.assert_allclose(_all(store), _all(EmbeddingStore(root / "ref")), atol=1e-3)


class _CountingSource(WebDatasetSource):
    """A WebDataset source that leaves a marker file each time a shard's records are opened: the
    markers survive the loader's worker processes, and name the shard and the process that read it."""

    def __init__(self, spec, marks):
        super().__init__(spec)
        self.marks = marks

    def records(self, shard):
        (self.marks / f"open-{shard}-{os.getpid()}-{uuid.uuid4().hex}").touch()
        yield from super().records(shard)


def _write_tars(df: pd.DataFrame, root, out, per_shard: int, bad_coords=(), bad_images=()):
    """WebDataset shards by hand (image + .json per sample); rows in `bad_coords` get a latitude of 999
    (the source skips them), rows in `bad_images` bytes that are no image (the decoder skips them)."""
    import io
    import tarfile

    out.mkdir()
    for s in range(0, len(df), per_shard):
        with tarfile.open(out / f"{s // per_shard:05d}.tar", "w") as tar:
            for j in range(s, min(s + per_shard, len(df))):
                r = df.iloc[j]
                img = b"not an image" if j in bad_images else (root / "world" / r["image"]).read_bytes()
                meta = {"lat": 999.0 if j in bad_coords else float(r["lat"]), "lon": float(r["lon"]), "split": r["split"]}
                for ext, data in (("json", json.dumps(meta).encode()), ("png", img)):
                    info = tarfile.TarInfo(f"{j:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_each_shard_is_read_once_by_one_worker(world, tmp_path):
    """Under --workers 2 each input shard is opened exactly once (each worker takes whole shards), the
    skip counts of both workers are all there, and the files are byte for byte those of --workers 0."""
    root, manifest, bb, ref = world
    df = pd.read_csv(manifest).head(120)
    _write_tars(df, root, tmp_path / "wds", per_shard=30, bad_coords={35}, bad_images={70, 100})
    reps, readers = {}, {}
    for w in (0, 2):
        marks = tmp_path / f"marks{w}"
        marks.mkdir()
        reps[w] = embed_source(_CountingSource(str(tmp_path / "wds"), marks), bb, tmp_path / f"out{w}", batch_size=8, workers=w,
                               progress=False)
        opened = [m.name.split("-") for m in marks.iterdir()]
        assert sorted(int(o[1]) for o in opened) == [0, 1, 2, 3]            # each shard once
        readers[w] = {o[2] for o in opened}
    assert readers[0] == {str(os.getpid())} and len(readers[2]) == 2 and str(os.getpid()) not in readers[2]  # both workers read
    want = {"coordinates out of range": 1, "unreadable image": 2}
    assert reps[0]["skipped"] == reps[2]["skipped"] == want and reps[2]["vectors"] == 117
    assert [json.loads(ShardFiles(tmp_path / "out2", i).done.read_text())["skipped"] for i in range(4)] == \
        [{}, {"coordinates out of range": 1}, {"unreadable image": 1}, {"unreadable image": 1}]
    names = sorted(p.name for p in (tmp_path / "out0").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out2").iterdir()) and len(names) == 13
    for name in names:
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    # the first shard holds the manifest's first 30 photos: the same vectors as the manifest's run
    np.testing.assert_array_equal(_all(EmbeddingStore(tmp_path / "out2"))[:30], _all(EmbeddingStore(root / "ref"))[:30])


def test_torchrun_two_processes_write_the_same_files(world, tmp_path):
    root, manifest, bb, ref = world
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29600 + os.getpid() % 300),
           "-m", "pigeon.cli", "embed", "--data", str(manifest), "--backbone", "tiny", "--out", str(tmp_path / "ddp"),
           "--rows-per-shard", "40", "--batch-size", "16", "-q"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["world_size"] == 2 and rep["vectors"] == 240 and rep["shards_embedded_here"] == 3
    for i in range(6):
        a, b = ShardFiles(root / "ref", i), ShardFiles(tmp_path / "ddp", i)
        assert np.array_equal(np.load(a.vectors), np.load(b.vectors)), i
        pd.testing.assert_frame_equal(pd.read_parquet(a.rows), pd.read_parquet(b.rows))
    # a resume with another world size finds the same files: nothing to redo
    again = embed_source(open_source(manifest, rows_per_shard=40), bb, tmp_path / "ddp", batch_size=16, progress=False)
    assert again["shards_reused_here"] == 6 and again["images_embedded_here"] == 0


def test_a_killed_run_resumes_and_loses_at_most_one_shard(world, tmp_path):
    root, manifest, bb, ref = world
    out, flag = tmp_path / "killed", tmp_path / "paused"
    env = {**os.environ, "PIGEON_PAUSE_AT": "embed-shard-written", "PIGEON_PAUSE_FILE": str(flag), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pigeon.cli", "embed", "--data", str(manifest), "--backbone", "tiny", "--out", str(out),
           "--rows-per-shard", "40", "--batch-size", "16", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "never paused"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(UserError, match="lacks shard 1"):
        EmbeddingStore(out)                                       # unfinished: refused by name
    again = embed_source(open_source(manifest, rows_per_shard=40), bb, out, batch_size=16, progress=False)
    assert again["shards_reused_here"] == 1 and again["shards_embedded_here"] == 5   # only the first shard was kept
    np.testing.assert_array_equal(_all(EmbeddingStore(out)), _all(EmbeddingStore(root / "ref")))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_folders_and_options_are_refused_by_name(world, tmp_path, capsys):
    root, manifest, bb, ref = world
    other = create_backbone("tiny")
    with torch.no_grad():
        next(iter(other.model.parameters())).add_(1.0)
    other.invalidate_hash()
    with pytest.raises(UserError, match="backbone"):
        EmbeddingStore(root / "ref", expect_backbone_hash=other.hash)
    import shutil

    shutil.copytree(root / "ref", tmp_path / "copy")
    with pytest.raises(UserError, match="another backbone"):
        embed_source(open_source(manifest, rows_per_shard=40), other, tmp_path / "copy", progress=False)
    sub = pd.read_csv(manifest).head(50)
    sub["image"] = [str(root / "world" / p) for p in sub["image"]]
    sub.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(UserError, match="other.csv"):
        embed_source(open_source(tmp_path / "other.csv"), bb, tmp_path / "copy", progress=False)
    ShardFiles(tmp_path / "copy", 3).done.unlink()
    with pytest.raises(UserError, match="lacks shard 3"):
        EmbeddingStore(tmp_path / "copy")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not an embedding folder"):
        embed_source(open_source(manifest), bb, tmp_path / "junk", progress=False)
    with pytest.raises(UserError, match="not an embedding folder"):
        EmbeddingStore(tmp_path / "junk")
    with pytest.raises(UserError, match="--batch-size"):
        embed_source(open_source(manifest), bb, tmp_path / "z", batch_size=0, progress=False)
    assert cli(["embed", "--data", str(manifest), "--out", str(tmp_path / "nb")]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_a_corrupt_photo_is_skipped_and_counted(world, tmp_path):
    root, manifest, bb, ref = world
    df = pd.read_csv(manifest).head(30)
    df["image"] = [str(root / "world" / p) for p in df["image"]]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    df.loc[7, "image"] = str(tmp_path / "bad.png")
    df.to_csv(tmp_path / "m.csv", index=False)
    rep = embed_source(open_source(tmp_path / "m.csv"), bb, tmp_path / "e", workers=2, progress=False)
    assert rep["vectors"] == 29 and rep["skipped"] == {"unreadable image": 1}
    assert str(tmp_path / "bad.png") not in set(EmbeddingStore(tmp_path / "e").keys())
    with pytest.raises(UserError, match="bad.png"):
        embed_source(open_source(tmp_path / "m.csv", strict=True), bb, tmp_path / "e2", progress=False)


def test_per_batch_targets_equal_the_dense_targets(world):
    """Head training computes each batch's soft targets from its coordinates: the same rows of the old N x C matrix."""
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, 500), rng.uniform(-180, 180, 500)
    centres = np.stack([rng.uniform(-60, 70, 40), rng.uniform(-180, 180, 40)], 1)
    cell = rng.integers(0, 40, 500)
    d = haversine_km(lat[:, None], lon[:, None], centres[None, :, 0], centres[None, :, 1])   # the old N x C matrix, by hand
    w = np.exp(-(d - d[np.arange(500), cell][:, None]) / 65.0)
    dense = w / w.sum(1, keepdims=True)
    rows = rng.choice(500, 64, replace=False)
    got = BatchTargets(lat, lon, cell, centres, 65.0)(rows)
    assert got.shape == (64, 40) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), dense[rows], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)
    with pytest.raises(UserError, match="tau 0.0"):
        BatchTargets(lat, lon, cell, centres, 0.0)


def test_train_build_index_and_evaluate_read_the_folder(world, tmp_path):
    """The same head from --embeddings as from --data (they read the same vectors); build-index and evaluate too."""
    from pigeon.indexing import build_index
    from pigeon.bundle import Bundle
    from pigeon.evaluate import evaluate
    from pigeon.geocells import build_cells
    from pigeon.train import TrainConfig, train

    root, manifest, bb, ref = world
    df = pd.read_csv(manifest)
    tr = df[df["split"] == "train"]
    cells = build_cells(tr["lat"].to_numpy(), tr["lon"].to_numpy(), min_size=10, max_size=30, progress=False)
    reps = {}
    for name, kw in (("data", {"data": manifest}), ("folder", {"data": None, "embeddings": str(root / "ref")})):
        b = Bundle(tmp_path / name, create=True)
        b.write_part("cells", cells.save)
        b.set_backbone(bb.spec, bb.hash)
        cfg = TrainConfig(epochs=3, seed=0, progress=False, cache_dir=str(tmp_path / "cache"), embeddings=kw.get("embeddings"))
        reps[name] = train(kw["data"], b.path, backbone="tiny", config=cfg)
    assert reps["folder"]["images_embedded"] == 0 and reps["data"]["images_embedded"] == 240
    assert [h["val_loss"] for h in reps["folder"]["history"]] == pytest.approx([h["val_loss"] for h in reps["data"]["history"]], rel=1e-5)
    g = build_index(None, tmp_path / "folder", embeddings=root / "ref", progress=False)
    assert g["images"] == (df["split"] == "train").sum() and g["skipped"] == 0   # the gallery holds train rows only
    m = evaluate(tmp_path / "folder", None, embeddings=root / "ref", progress=False, plots=False)
    assert m["n"] == (df["split"] == "test").sum() and m["baseline_centroid_of"] == "train rows"
