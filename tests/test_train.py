"""Training `tiny` on the synthetic world learns geography; calibration, resume, unfreezing, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.geocells import build_cells
from pigeon.core.sphere import haversine_km, spherical_mean
from pigeon.bundle import Bundle
from pigeon.calibration import ece, softmax
from pigeon.core.errors import UserError
from pigeon.train import TrainConfig, train


def _bundle_with_cells(path, df, min_size=20, max_size=40):
    tr = df[df["split"] == "train"]
    cells = build_cells(tr["lat"].to_numpy(), tr["lon"].to_numpy(), min_size=min_size, max_size=max_size, progress=False)
    b = Bundle(path, create=True)
    b.write_part("cells", cells.save)
    return b


def _copy_cells(path, src_bundle):
    """A fresh bundle with the same cells (cheaper than building them again)."""
    import shutil

    b = Bundle(path, create=True)
    b.write_part("cells", lambda tmp: shutil.copyfile(Bundle(src_bundle).part_path("cells"), tmp))
    return b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pigeon.datasets.synthetic import make_world

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("train")
    manifest = make_world(root / "world", n_images=1500, image_size=64, seed=11)
    df = pd.read_csv(manifest)
    b = _bundle_with_cells(root / "bundle", df)
    cfg = TrainConfig(epochs=60, patience=10, seed=0, cache_dir=str(root / "cache"), progress=False)
    rep = train(manifest, b.path, backbone="tiny", config=cfg)
    return root, manifest, df, rep


def test_training_learns_geography(trained):
    from pigeon.evaluate import evaluate

    root, manifest, df, rep = trained
    m = evaluate(root / "bundle", manifest, split="test", out=root / "eval", cache_dir=str(root / "cache"), progress=False)
    test = df[df["split"] == "test"]
    lat, lon = test["lat"].to_numpy(), test["lon"].to_numpy()
    # Baselines: always the training data's centroid; a uniformly random cell.
    tr = df[df["split"] == "train"]
    clat, clon = spherical_mean(tr["lat"].to_numpy(), tr["lon"].to_numpy())
    centroid = float(np.median(haversine_km(clat, clon, lat, lon)))
    from pigeon.predictor import Predictor

    centres = Predictor.from_bundle(root / "bundle").centres
    r = np.random.default_rng(0).integers(0, len(centres), size=(20, len(lat)))
    random_cell = float(np.median(haversine_km(centres[r, 0], centres[r, 1], lat, lon)))
    assert m["n"] == len(test)
    assert m["median_km"] < 0.35 * centroid, (m["median_km"], centroid)
    assert m["median_km"] < 0.5 * random_cell, (m["median_km"], random_cell)
    assert m["country_accuracy"] > 0.35
    assert m["oracle_cell_median_km"] < m["median_km"]
    for f in ("metrics.json", "per_country.csv", "predictions.csv", "error_cdf.png", "world_map.png"):
        assert (root / "eval" / f).stat().st_size > 100
    assert json.loads((root / "eval" / "metrics.json").read_text())["median_km"] == pytest.approx(m["median_km"])
    # The uncertainty circles: shares of test photos within each radius, calibrated on val photos.
    assert 0 <= m["share_within_radius_50"] <= 1 and 0 <= m["share_within_radius_90"] <= 1
    assert m["radii_calibrated"] is True
    assert m["share_within_radius_50"] == pytest.approx(0.5, abs=0.15), m   # ~140 test photos: loose bounds
    assert m["share_within_radius_90"] == pytest.approx(0.9, abs=0.1), m
    assert 0 < m["median_radius_km_50"] < m["median_radius_km_90"]
    # The head is tied to the bundle's cells and backbone.
    b = Bundle(root / "bundle")
    assert b.meta("head")["cells_hash"] == b.cells_hash and b.meta("head")["backbone_hash"] == b.backbone_hash
    assert b.backbone_spec == "tiny"


def test_temperature_scaling_lowers_ece_on_test(trained):
    from pigeon.datasets import open_source
    from pigeon.embed import cached_embeddings
    from pigeon.head import PrototypeHead
    from pigeon.predictor import Predictor

    root, manifest, df, rep = trained
    assert rep["temperature"] != pytest.approx(1.0)
    assert rep["ece_after"] < rep["ece_before"]
    pred = Predictor.from_bundle(root / "bundle")
    store, _ = cached_embeddings(open_source(manifest), pred.backbone, str(root / "cache"), progress=False)
    sel = np.flatnonzero(store.rows["split"].to_numpy() == "test")
    test = store.rows.iloc[sel]
    emb = store.take(sel)
    head = PrototypeHead.load(Bundle(root / "bundle").part_path("head"))
    with torch.no_grad():
        z = head(torch.from_numpy(emb)).numpy()
    y = pred.cells.cell_of(test["lat"].to_numpy(), test["lon"].to_numpy())
    assert ece(softmax(z, rep["temperature"]), y) < ece(softmax(z), y)
    np.testing.assert_allclose(pred.cell_probs(emb), softmax(z, rep["temperature"]), atol=1e-4)


def test_report_names_speeds_and_stores_calibrated_radii(trained):
    from pigeon.head import PrototypeHead

    root, manifest, df, rep = trained
    assert "embeddings_per_s" not in rep
    # every photo of the manifest (test rows too, for evaluate to reuse) embedded once, in this run
    assert rep["images_embedded"] == len(df) and rep["embeddings_reused"] == 0
    assert rep["head_steps_per_s"] > 0 and rep["head_examples_per_s"] > rep["head_steps_per_s"]
    if rep["images_embedded"]:
        assert rep["images_embedded_per_s"] > 0
    assert rep["radius_calibration"].startswith("calibrated on") and rep["radius_levels"] == [0.5, 0.9]
    assert all(0.2 < s < 5 for s in rep["radius_scales"])
    head = PrototypeHead.load(Bundle(root / "bundle").part_path("head"))
    assert head.radius is not None and head.radius.calibrated
    np.testing.assert_allclose(head.radius.scales, rep["radius_scales"], rtol=1e-6)
    assert head.radius.spread_km.shape == (rep["n_cells"], 16) and (head.radius.spread_km > 0).all()
    assert Bundle(root / "bundle").meta("head")["radius_calibrated"] == "true"


def test_radii_uncalibrated_without_val(trained, tmp_path):
    root, manifest, df, _ = trained
    few = df[df["split"] == "train"].head(9).copy()           # < 10 train rows: no val held out
    few["image"] = [str(root / "world" / p) for p in few["image"]]
    few.to_csv(tmp_path / "few.csv", index=False)
    b = _copy_cells(tmp_path / "b", root / "bundle")
    rep = train(tmp_path / "few.csv", b.path, backbone="tiny", config=TrainConfig(epochs=1, cache_dir=str(root / "cache"), progress=False))
    assert rep["n_val"] == 0 and rep["radius_calibration"].startswith("uncalibrated")
    from pigeon.predictor import Predictor

    pred = Predictor.from_bundle(b.path)
    assert not pred.radius_model.calibrated and (pred.radius_model.spread_km > 0).all()
    a = pred.locate([few["image"].iloc[0]])[0]
    assert 0 < a["radius_km_50"] <= a["radius_km_90"]


def test_embedding_cache_hits(trained, tmp_path):
    """A second run reads the cache folder: nothing is embedded; a changed photo re-embeds only its shard."""
    import os

    from pigeon.backbones import create_backbone
    from pigeon.datasets import load_image, open_source
    from pigeon.embed import cached_embeddings

    root, manifest, df, rep = trained
    bb = create_backbone("tiny")
    before, r1 = cached_embeddings(open_source(manifest), bb, str(root / "cache"), progress=False)
    assert r1["images_embedded_here"] == 0 and len(before) == len(df)
    fresh = bb.embed_images([load_image(root / "world" / df["image"][0])])
    np.testing.assert_allclose(fresh[0], before.take([0])[0], atol=2e-3)  # float16 on disk
    small, r0 = cached_embeddings(open_source(manifest, rows_per_shard=500), bb, str(tmp_path), progress=False)
    assert r0["shards_embedded_here"] == 3 and r0["images_embedded_here"] == len(df)
    np.testing.assert_array_equal(small.take(np.arange(len(df))), before.take(np.arange(len(df))))
    path = root / "world" / df["image"][700]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # "edited": shard 1 is stale
    again, r2 = cached_embeddings(open_source(manifest, rows_per_shard=500), bb, str(tmp_path), progress=False)
    assert r2["shards_embedded_here"] == 1 and r2["shards_reused_here"] == 2 and r2["images_embedded_here"] == 500
    np.testing.assert_array_equal(again.take(np.arange(len(df))), before.take(np.arange(len(df))))


def test_resume_continues_the_same_run(trained, tmp_path):
    root, manifest, df, _ = trained
    b = _copy_cells(tmp_path / "b", root / "bundle")
    cfg = dict(patience=100, cache_dir=str(root / "cache"), progress=False, balanced=True)
    r1 = train(manifest, b.path, backbone="tiny", config=TrainConfig(epochs=2, **cfg))
    r2 = train(manifest, b.path, config=TrainConfig(epochs=4, resume=True, **cfg))
    assert [h["epoch"] for h in r2["history"]] == [1, 2, 3, 4]
    assert r2["history"][:2] == r1["history"]
    with pytest.raises(UserError, match="another run"):
        train(manifest, b.path, config=TrainConfig(epochs=5, resume=True, lr=0.5, **{k: v for k, v in cfg.items()}))
    with pytest.raises(UserError, match="uses backbone"):
        train(manifest, b.path, backbone="lite", config=TrainConfig(epochs=1, **cfg))


def test_unfreeze_last_block_writes_backbone(trained, tmp_path):
    from pigeon.predictor import Predictor

    root, manifest, df, _ = trained
    small = df[df["split"].isin(["train", "val"])].head(300).copy()
    small["image"] = [str(root / "world" / p) for p in small["image"]]
    small.to_csv(tmp_path / "m.csv", index=False)
    b = _copy_cells(tmp_path / "b", root / "bundle")
    rep = train(tmp_path / "m.csv", b.path, backbone="tiny",
                config=TrainConfig(epochs=1, unfreeze_last_block=True, cache_dir=str(tmp_path / "c"), progress=False))
    b = Bundle(b.path)
    assert b.has("backbone") and rep["epochs_run"] == 1
    from pigeon.backbones import create_backbone

    assert b.backbone_hash != create_backbone("tiny").hash  # the weights moved
    pred = Predictor.from_bundle(b.path)
    assert pred.backbone.hash == b.backbone_hash
    assert len(pred.locate([small["image"].iloc[0]])) == 1


def test_unfrozen_run_resumes_with_its_block(trained, tmp_path, monkeypatch):
    """An `--unfreeze-last-block` run stopped after epoch 1 (its checkpoint saved, nothing written)
    resumes to the same epoch 2 and the same tuned backbone as a run never stopped: the checkpoint
    carries the block's weights, not only the head's."""
    import pigeon.train as train_mod

    root, manifest, df, _ = trained
    small = df[df["split"].isin(["train", "val"])].head(150).copy()
    small["image"] = [str(root / "world" / p) for p in small["image"]]
    small.to_csv(tmp_path / "m.csv", index=False)
    cfg = dict(unfreeze_last_block=True, patience=100, batch_size=64, cache_dir=str(tmp_path / "c"), progress=False)
    straight = train(tmp_path / "m.csv", _copy_cells(tmp_path / "a", root / "bundle").path, backbone="tiny", config=TrainConfig(epochs=2, **cfg))

    class Stopped(Exception):
        pass

    def stop(self):
        raise Stopped

    b = _copy_cells(tmp_path / "b", root / "bundle")
    with monkeypatch.context() as m:
        m.setattr(train_mod._Run, "calibrate", stop)  # killed after the epoch's checkpoint, before anything is written
        with pytest.raises(Stopped):
            train(tmp_path / "m.csv", b.path, backbone="tiny", config=TrainConfig(epochs=1, **cfg))
    assert not Bundle(b.path).has("backbone")
    resumed = train(tmp_path / "m.csv", b.path, config=TrainConfig(epochs=2, resume=True, **cfg))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"] == straight["history"]
    assert Bundle(b.path).backbone_hash == Bundle(tmp_path / "a").backbone_hash


def test_zero_shot_then_bad_inputs(trained, tmp_path):
    root, manifest, df, _ = trained
    with pytest.raises(UserError, match="does not exist"):
        train(manifest, tmp_path / "missing")
    empty = Bundle(tmp_path / "nocells", create=True)
    with pytest.raises(UserError, match="cells.parquet"):
        train(manifest, empty.path, backbone="tiny")
    b = _copy_cells(tmp_path / "b", root / "bundle")
    bad = tmp_path / "bad.csv"
    df.drop(columns=["lat"]).to_csv(bad, index=False)
    with pytest.raises(UserError, match="lat"):
        train(bad, b.path, backbone="tiny", config=TrainConfig(progress=False))
    broken = df.head(30).copy()
    broken["image"] = [str(root / "world" / p) for p in broken["image"]]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    broken.loc[3, "image"] = str(tmp_path / "broken.png")
    broken.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(UserError, match="broken.png"):  # --strict: the first bad photo stops the run, by name
        train(tmp_path / "broken.csv", b.path, backbone="tiny", config=TrainConfig(progress=False, strict=True, cache_dir=str(tmp_path / "c")))
    rep = train(tmp_path / "broken.csv", b.path, backbone="tiny", config=TrainConfig(epochs=1, progress=False, cache_dir=str(tmp_path / "c")))
    assert rep["skipped"] == {"unreadable image": 1} and rep["n_train"] + rep["n_val"] == (broken["split"] != "test").sum() - (broken.loc[3, "split"] != "test")
    with pytest.raises(UserError, match="--tau"):
        train(manifest, b.path, backbone="tiny", config=TrainConfig(tau=-1))
    nosplit = df.assign(split="test")
    nosplit.to_csv(tmp_path / "nosplit.csv", index=False)
    with pytest.raises(UserError, match="train"):
        train(tmp_path / "nosplit.csv", b.path, backbone="tiny", config=TrainConfig(progress=False))
    from pigeon.evaluate import evaluate

    with pytest.raises(UserError, match="split"):
        evaluate(root / "bundle", manifest, split="holdout", progress=False)
