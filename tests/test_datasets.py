"""Manifests, image loading (EXIF, unreadable files), augmentations and the samplers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pigeon.datasets import EpochSampler, GaussianNoise, ImageDataset, build_train_transform, load_image, rare_cell_weights, read_manifest
from pigeon.core.errors import UserError


def _write_images(folder, n=3, size=(30, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 100, 200)).save(folder / f"im{i}.png")


def test_read_manifest_csv_defaults_and_paths(tmp_path):
    _write_images(tmp_path / "imgs")
    pd.DataFrame({"image": ["imgs/im0.png", "imgs/im1.png"], "lat": [10.0, -20.5], "lon": [5, 179.9]}).to_csv(tmp_path / "m.csv", index=False)
    df = read_manifest(tmp_path / "m.csv")
    assert list(df["image"]) == ["imgs/im0.png", "imgs/im1.png"]
    assert df["path"][1] == str(tmp_path.resolve() / "imgs" / "im1.png")
    assert df["lat"].dtype == np.float64 and df["lon"].tolist() == [5.0, 179.9]
    assert df["taken_at"].isna().all() and df["heading"].isna().all()
    assert (df["split"] == "train").all()


def test_read_manifest_parquet_optional_columns(tmp_path):
    pd.DataFrame({
        "image": ["a.jpg", "/abs/b.jpg", "c.jpg"], "lat": [1, 2, 3], "lon": [4, 5, 6],
        "taken_at": ["2024-03-15T10:00:00", "bad", None], "heading": [370, None, 90], "split": ["train", "val", None],
    }).to_parquet(tmp_path / "m.parquet")
    df = read_manifest(tmp_path / "m.parquet")
    assert df["taken_at"][0].month == 3 and pd.isna(df["taken_at"][1]) and pd.isna(df["taken_at"][2])
    assert df["heading"][0] == pytest.approx(10.0) and np.isnan(df["heading"][1])
    assert df["split"].tolist() == ["train", "val", "train"]
    assert df["path"][1] == "/abs/b.jpg"


@pytest.mark.parametrize(
    "frame, words",
    [
        ({"image": ["a.png"], "lat": [1.0]}, ["lacks column", "lon"]),
        ({"image": ["a.png", "b.png"], "lat": [1.0, 95.0], "lon": [0.0, 0.0]}, ["out-of-range", "rows 1"]),
        ({"image": ["a.png"], "lat": ["north"], "lon": [0.0]}, ["missing or out-of-range"]),
        ({"image": [None], "lat": [1.0], "lon": [0.0]}, ["empty `image`"]),
    ],
)
def test_read_manifest_errors(tmp_path, frame, words):
    pd.DataFrame(frame).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(UserError) as e:
        read_manifest(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_read_manifest_missing_file_and_strict(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="suffix"):
        (tmp_path / "m.json").write_text("{}")
        read_manifest(tmp_path / "m.json")
    pd.DataFrame({"image": ["gone.png"], "lat": [1.0], "lon": [2.0]}).to_csv(tmp_path / "m.csv", index=False)
    assert len(read_manifest(tmp_path / "m.csv")) == 1  # lenient: the loader skips it later
    with pytest.raises(UserError, match="gone.png"):
        read_manifest(tmp_path / "m.csv", strict=True)


def test_load_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    Image.new("L", (8, 6), 128).save(tmp_path / "grey.png")
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40) and out.mode == "RGB"
    assert load_image(tmp_path / "grey.png").mode == "RGB"


def test_load_image_unreadable_names_path(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(UserError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_image_dataset_skips_and_counts(tmp_path):
    from torchvision import transforms as T

    _write_images(tmp_path, n=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    paths = [tmp_path / "im0.png", tmp_path / "broken.png", tmp_path / "im2.png"]
    df = pd.DataFrame({"path": [str(p) for p in paths]})
    tf = T.Compose([T.Resize((16, 16)), T.ToTensor()])
    ds = ImageDataset(df, tf)
    items = list(ds)
    assert [i for _, i in items] == [0, 2]
    assert tuple(items[0][0].shape) == (3, 16, 16)
    assert ds.skipped == [str(paths[1])]
    x, idx = ImageDataset.collate([ds[0], ds[1], ds[2]])
    assert tuple(x.shape) == (2, 3, 16, 16) and idx.tolist() == [0, 2]
    with pytest.raises(UserError, match="broken.png"):
        ImageDataset(df, tf, strict=True)[1]


def test_seeded_augmentations_are_reproducible(tmp_path):
    _write_images(tmp_path, n=2, size=(48, 48))
    df = pd.DataFrame({"path": [str(tmp_path / "im0.png"), str(tmp_path / "im1.png")]})
    tf = build_train_transform(32, (0.5,) * 3, (0.5,) * 3, hflip=0.5, erase=0.5, noise=0.1)
    a, b = ImageDataset(df, tf, seed=3), ImageDataset(df, tf, seed=3)
    torch.testing.assert_close(a[1][0], b[1][0])
    b.set_epoch(1)
    assert not torch.equal(a[1][0], b[1][0])
    assert tuple(a[0][0].shape) == (3, 32, 32)


def test_gaussian_noise():
    torch.manual_seed(0)
    x = torch.zeros(3, 64, 64)
    y = GaussianNoise(std=0.2, p=1.0)(x)
    assert y.std().item() == pytest.approx(0.2, rel=0.05)
    assert torch.equal(GaussianNoise(std=0.2, p=0.0)(x), x)


def test_rare_cell_weights():
    cells = np.array([0] * 8 + [1] * 2)
    w = rare_cell_weights(cells, power=1.0)
    assert w.sum() == pytest.approx(1.0)
    assert w[cells == 0].sum() == pytest.approx(0.5) and w[cells == 1].sum() == pytest.approx(0.5)
    assert np.allclose(rare_cell_weights(cells, power=0.0), 0.1)
    with pytest.raises(UserError):
        rare_cell_weights(np.array([]))


def test_epoch_sampler_shards_one_global_order():
    full = EpochSampler(20, seed=1, drop_last_multiple=8)
    full.set_epoch(2)
    order = full.global_order()
    assert len(order) == 16 and len(set(order.tolist())) == 16
    shards = [EpochSampler(20, seed=1, rank=r, world_size=2, drop_last_multiple=8) for r in range(2)]
    for s in shards:
        s.set_epoch(2, skip=8)
    a, b = list(shards[0]), list(shards[1])
    assert len(shards[0]) == 4
    assert sorted(a + b) == sorted(order[8:].tolist()) and a == order[8::2].tolist()
    full.set_epoch(3)
    assert not np.array_equal(full.global_order(), order)
    # oversampling rare cells draws them more often than their share
    w = rare_cell_weights(np.array([0] * 90 + [1] * 10), power=1.0)
    s = EpochSampler(100, seed=0, weights=w)
    drawn = s.global_order()
    assert 30 < (drawn >= 90).sum() < 70
