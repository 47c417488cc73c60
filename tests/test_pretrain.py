"""`pigeon pretrain`: the loss falls, resume continues exactly, and 2-process torchrun follows 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.backbones import backbone_from_bundle, create_backbone
from pigeon.bundle import Bundle
from pigeon.core.errors import UserError
from pigeon.pretrain import PretrainConfig, contrastive_loss, lr_factor, pretrain

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)

# Synthetic photos: 4 toy cells (boxes) and images whose colour says the cell.
BOXES = [  # (lon0, lat0, lon1, lat1, region, country, driving side)
    (0.0, 40.0, 10.0, 50.0, "Alpha", "Northland", "right"),
    (10.0, 40.0, 20.0, 50.0, "Beta", "Northland", "right"),
    (130.0, -40.0, 140.0, -30.0, "Gamma", "Southland", "left"),
    (140.0, -40.0, 150.0, -30.0, "Delta", "Southland", "left"),
]
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [230, 210, 30]], dtype=np.float64)
CFG = dict(epochs=3, batch_size=8, lr=3e-4, unfreeze_last=-1, warmup=2, seed=0)  # 32 images -> 4 steps/epoch


def toy_cells():
    import geopandas as gpd
    from shapely.geometry import box

    from pigeon.geocells import GeoCells

    gdf = gpd.GeoDataFrame(
        {"admin1": [b[4] for b in BOXES], "country": [b[5] for b in BOXES], "driving_side": [b[6] for b in BOXES]},
        geometry=[box(b[0], b[1], b[2], b[3]) for b in BOXES],
        crs="EPSG:4326",
    )
    return GeoCells.from_frame(gdf)


def make_dataset(folder: Path, per_cell: int = 8, size: int = 48, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, b in enumerate(BOXES):
        for k in range(per_cell):
            img = np.clip(COLOURS[c] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"img_{c}_{k}.png")
            rows.append({"image": f"img_{c}_{k}.png", "lat": rng.uniform(b[1] + 1, b[3] - 1), "lon": rng.uniform(b[0] + 1, b[2] - 1),
                         "taken_at": f"2024-{1 + k % 12:02d}-15", "heading": 45.0 * k})
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    manifest = make_dataset(root / "data")
    cells = toy_cells()
    cells.save(root / "cells.parquet")
    return root, manifest, root / "cells.parquet"


@pytest.fixture(scope="module")
def full_run(world):
    root, manifest, cells = world
    r = pretrain(manifest, cells, "tiny", root / "full", PretrainConfig(**CFG), progress=False)
    return r


def test_pretraining_lowers_the_loss(world, full_run):
    from pigeon.geocells import GeoCells
    from pigeon.captions import CaptionMaker
    from pigeon.datasets import read_manifest

    root, manifest, cells = world
    assert full_run.steps == 12 and len(full_run.losses) == 12
    df = read_manifest(manifest)
    caps = CaptionMaker(GeoCells.load(cells), seed=5).captions(df["lat"], df["lon"], df["taken_at"], df["heading"])
    before = contrastive_loss(create_backbone("tiny"), df, caps, batch_size=32)
    after_bb = backbone_from_bundle(Bundle(root / "full"))
    after = contrastive_loss(after_bb, df, caps, batch_size=32)
    assert after < before - 0.3, (before, after)
    # the bundle records the fine-tuned backbone, tied to its hash
    b = Bundle(root / "full")
    assert b.backbone_spec == "tiny" and b.backbone_hash == full_run.backbone_hash == after_bb.hash
    assert b.meta("backbone")["base_spec"] == "tiny" and b.meta("backbone")["steps"] == 12
    assert after_bb.hash != create_backbone("tiny").hash
    b.require("backbone")


def test_resume_continues_where_it_stopped(world, full_run):
    root, manifest, cells = world
    out = root / "resumed"
    first = pretrain(manifest, cells, "tiny", out, PretrainConfig(**CFG, max_steps=5), progress=False)
    assert first.steps == 5
    assert (out / "pretrain" / "checkpoint.pt").exists()
    second = pretrain(manifest, cells, "tiny", out, PretrainConfig(**CFG), resume=True, progress=False)
    assert second.steps == 12 and second.images == 7 * 8  # only the 7 remaining steps ran
    np.testing.assert_allclose(second.losses, full_run.losses, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="lr"):
        pretrain(manifest, cells, "tiny", out, PretrainConfig(**{**CFG, "lr": 1e-3}), resume=True, progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        pretrain(manifest, cells, "tiny", root / "fresh", PretrainConfig(**CFG), resume=True, progress=False)


def test_torchrun_two_processes_match_one(world, full_run):
    root, manifest, cells = world
    out = root / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000),
        "-m", "pigeon.cli", "pretrain", "--data", str(manifest), "--cells", str(cells), "--backbone", "tiny", "--out", str(out),
        "--epochs", "3", "--batch-size", "8", "--lr", "3e-4", "--unfreeze-last", "-1", "--warmup", "2", "--max-steps", "4", "-q",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4
    log = json.loads((out / "pretrain" / "losses.json").read_text())
    assert log["world_size"] == 2
    np.testing.assert_allclose(log["losses"], full_run.losses[:4], rtol=2e-3, atol=2e-3)
    assert Bundle(out).backbone_hash == summary["backbone_hash"]


def test_bad_options(world):
    root, manifest, cells = world
    with pytest.raises(UserError, match="at least 2"):
        pretrain(manifest, cells, "tiny", root / "x", PretrainConfig(batch_size=1), progress=False)
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        pretrain(manifest, cells, "tiny", root / "x", PretrainConfig(batch_size=16, accum=4), progress=False)


def test_lr_schedule():
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.05
