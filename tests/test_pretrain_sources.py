"""`pigeon pretrain` and `pigeon build-cells` on WebDataset shards and image Parquet: streamed training
writes a backbone with finite losses, a corrupt sample is skipped and counted, resume restarts at the
first unfinished shard, and the cells from shards equal those from the manifest of the same photos."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.bundle import Bundle
from pigeon.core.errors import UserError
from pigeon.datasets import read_manifest
from pigeon.datasets.shards import write_image_parquet, write_webdataset
from pigeon.datasets.sources import open_source
from pigeon.datasets.stream import ShardStream, epoch_order, positions_for
from pigeon.pretrain import PretrainConfig, pretrain
from test_pretrain import BOXES, make_dataset, toy_cells

torch.set_num_threads(2)
CFG = dict(epochs=1, batch_size=8, lr=3e-4, unfreeze_last=-1, warmup=1, seed=0)   # 32 photos -> 4 steps


def _corrupt(tar: Path, member_ext: str = ".jpg") -> str:
    """Replace the first image member of `tar` by bytes that are no image; returns its key."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith(member_ext))
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            data = b"not an image at all" if m.name == bad else data
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return bad.split(".")[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """32 toy photos in 4 boxes (test_pretrain's data) as a manifest, 8 WebDataset shards of 4 (one of
    them with a corrupt image), a clean copy of the shards, and 4 image-Parquet files."""
    root = tmp_path_factory.mktemp("pretrain_sources")
    manifest = make_dataset(root / "data", size=32)
    df = read_manifest(manifest)
    df["split"] = np.where(np.arange(len(df)) % 8 == 7, "test", "train")   # 4 test rows: left out of cells
    df[["lat", "lon"]] = df[["lat", "lon"]].round(6)   # exact in CSV and in the shards' JSON alike
    df.drop(columns=["path"]).to_csv(manifest, index=False)
    df["key"] = [Path(p).stem for p in df["image"]]
    train = df[df["split"] == "train"].reset_index(drop=True)
    cells = toy_cells()
    cells.save(root / "cells.parquet")
    w = {"root": root, "manifest": manifest, "df": df, "cells": root / "cells.parquet"}
    w["clean"] = write_webdataset(df, root / "clean", per_shard=4)
    w["wds"] = write_webdataset(pd.concat([train, train.iloc[:4]], ignore_index=True).assign(
        key=lambda f: [f"{k}_{i}" for i, k in enumerate(f["key"])]), root / "wds", per_shard=4)   # 32 train samples
    w["bad_key"] = _corrupt(w["wds"][2])
    w["pq"] = write_image_parquet(df, root / "pq", per_file=8)
    return w


def test_streamed_pretraining_on_webdataset_and_parquet(world):
    """Both kinds train `tiny` with finite losses and write the backbone; the WebDataset's corrupt
    sample is skipped and counted (31 readable -> 3 full steps of 8); strict mode refuses it by name."""
    root = world["root"]
    r = pretrain(str(root / "wds"), world["cells"], "tiny", root / "b_wds", PretrainConfig(**CFG), progress=False)
    assert r.steps == 3 and len(r.losses) == 3 and all(math.isfinite(x) for x in r.losses), r.losses
    assert r.skipped_counts == {"unreadable image": 1} and len(r.skipped) == 1 and world["bad_key"] in r.skipped[0]
    b = Bundle(root / "b_wds")
    assert b.backbone_spec == "tiny" and b.backbone_hash == r.backbone_hash and b.meta("backbone")["images"] == 32
    b.require("backbone")

    r = pretrain(str(root / "pq"), world["cells"], "tiny", root / "b_pq", PretrainConfig(**CFG, num_workers=2), progress=False)
    # 28 train rows in 4 files of 7 over 2 workers: each worker drops its last partial batch (14 -> 8)
    assert r.steps == 2 and r.images == 16 and all(math.isfinite(x) for x in r.losses) and r.skipped_counts == {}
    assert Bundle(root / "b_pq").backbone_hash == r.backbone_hash

    with pytest.raises(UserError, match=f"sample {world['bad_key']} is unreadable"):
        pretrain(str(root / "wds"), world["cells"], "tiny", root / "b_strict", PretrainConfig(**CFG, strict=True), progress=False)


def test_resume_restarts_at_the_next_unfinished_shard(world):
    """Stopped after 2 steps (16 samples = shards 0-3 of the epoch's order, no shuffle buffer), the
    checkpoint says 4 shards are done; the resumed run trains on the other 4 only."""
    root, out = world["root"], world["root"] / "b_resume"
    cfg = dict(CFG, shuffle_buffer=1)
    first = pretrain(str(root / "clean"), world["cells"], "tiny", out, PretrainConfig(**cfg, max_steps=2, split=""), progress=False)
    assert first.steps == 2
    state = torch.load(out / "pretrain" / "checkpoint.pt", map_location="cpu", weights_only=False)["stream"]
    assert (state["epoch"], state["shards_done"]) == (0, 4)
    second = pretrain(str(root / "clean"), world["cells"], "tiny", out, PretrainConfig(**cfg, split=""), resume=True, progress=False)
    assert second.steps == 4 and second.images == 16 and second.losses[:2] == first.losses
    with pytest.raises(UserError, match="manifest"):
        pretrain(world["manifest"], world["cells"], "tiny", out, PretrainConfig(**cfg, split=""), resume=True, progress=False)


def test_shards_split_over_ranks_and_workers(world):
    """Rank r of W takes epoch positions r, r+W, ...; worker w of N every N-th of those; a resumed
    epoch starts at position k; the shuffle buffer reorders samples but loses none."""
    assert positions_for(8, 0, 1, 2, 0, 2) == [1, 5] and positions_for(8, 0, 1, 2, 1, 2) == [3, 7]
    assert positions_for(8, 4, 0, 2, 0, 1) == [4, 6]
    src = open_source(str(world["root"] / "clean"))
    order = epoch_order(len(src.shards), seed=0, epoch=0)
    keys_of = {i: [r.key for r in src.records(i)] for i in range(len(src.shards))}

    def seen(**kw):
        ds = ShardStream(src, lambda im: torch.zeros(1), batch_size=1, split=None, seed=0, epoch=0, **kw)
        return [k for b in ds if b.images is not None for k in b.keys]

    ranks = [seen(rank=r, world=2, buffer_size=3) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    for r in (0, 1):
        assert sorted(ranks[r]) == sorted(k for p in range(r, 8, 2) for k in keys_of[order[p]])
    resumed = seen(start=5, buffer_size=100)
    assert sorted(resumed) == sorted(k for p in range(5, 8) for k in keys_of[order[p]])
    assert resumed != [k for p in range(5, 8) for k in keys_of[order[p]]]   # shuffled


def test_build_cells_from_shards_equals_manifest(world, tmp_path):
    """Cells from the WebDataset equal those from the manifest of the same photos; the 4 test rows are
    left out (and counted) by default in both, and kept with splits=None."""
    import geopandas as gpd
    from shapely.geometry import box

    from pigeon.commands.cells import build_cells_file
    from pigeon.geocells import GeoCells

    bounds = tmp_path / "boxes.geojson"
    gpd.GeoDataFrame({"adm0_a3": ["AAA", "AAA", "BBB", "BBB"], "admin1": [b[4] for b in BOXES]},
                     geometry=[box(*b[:4]) for b in BOXES], crs="EPSG:4326").to_file(bounds, driver="GeoJSON")
    kw = dict(boundaries=str(bounds), min_size=3, max_size=8, progress=False)
    a = build_cells_file(world["manifest"], tmp_path / "a.parquet", **kw)
    b = build_cells_file(str(world["root"] / "clean"), tmp_path / "b.parquet", **kw)
    assert (a["points"], a["left_out_rows"], b["points"], b["left_out_rows"]) == (28, 4, 28, 4)
    assert GeoCells.load(tmp_path / "a.parquet").hash == GeoCells.load(tmp_path / "b.parquet").hash
    c = build_cells_file(str(world["root"] / "clean" / "{00000..00007}.tar"), tmp_path / "c.parquet", **kw, splits=None)
    d = build_cells_file(world["manifest"], tmp_path / "d.parquet", **kw, splits=None)
    assert (c["points"], c["left_out_rows"], d["points"]) == (32, 0, 32)
    assert GeoCells.load(tmp_path / "c.parquet").hash == GeoCells.load(tmp_path / "d.parquet").hash
