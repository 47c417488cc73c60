"""A zero-shot bundle (cells + text prototypes, no training data) answers; the answer's pieces add up."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pigeon.core.sphere import haversine_km
from pigeon.bundle import Bundle
from pigeon.core.errors import UserError
from pigeon.predictor import Predictor, collect_images


@pytest.fixture(scope="module")
def zs(tmp_path_factory):
    from worlds import world_bundle

    root = tmp_path_factory.mktemp("zs")
    manifest, _, _, rep = world_bundle(root, n_images=240, image_size=64, seed=5, min_size=10, max_size=20)
    return root, manifest, rep


def test_zero_shot_bundle_answers(zs):
    root, manifest, rep = zs
    pred = Predictor.from_bundle(root / "bundle")
    assert rep["n_cells"] == pred.n_cells > 5
    df = pd.read_csv(manifest)
    paths = [str(root / "world" / p) for p in df["image"][:6]]
    out = pred.locate(paths, top_k=3)
    assert len(out) == 6
    for a in out:
        assert -90 <= a["lat"] <= 90 and -180 <= a["lon"] <= 180
        top = a["top_cells"][0]
        assert (a["lat"], a["lon"]) == (top["lat"], top["lon"])  # no index: the top cell's centre
        assert a["confidence"] == pytest.approx(top["probability"])
        assert [c["probability"] for c in a["top_cells"]] == sorted((c["probability"] for c in a["top_cells"]), reverse=True)
        assert 0 <= a["radius_km_50"] <= a["radius_km_90"] <= 20016
        # the top country holds at least the top cell's mass times that cell's largest country share
        comp = pred.cells.composition("country")
        top_share = comp.loc[comp["cell_id"] == top["cell_id"], "share"].max()
        assert a["countries"][0]["probability"] >= top["probability"] * top_share - 1e-6
        assert a["refinement"]["mode"] == "cell" and a["refinement"]["moved_km"] == 0.0
        assert a["timings_ms"]["total_ms"] > 0
    # PIL images answer the same as their files.
    pil = pred.locate([Image.open(p) for p in paths[:2]])
    assert pil[0]["lat"] == out[0]["lat"] and pil[1]["top_cells"][0]["cell_id"] == out[1]["top_cells"][0]["cell_id"]
    json.dumps(out)  # JSON-ready


def test_probabilities_sum_by_country_and_region(zs):
    root, *_ = zs
    pred = Predictor.from_bundle(root / "bundle")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, pred.head.embed_dim)).astype(np.float32)
    p = pred.predict_embeddings(emb, top_k=4)
    np.testing.assert_allclose(p["probs"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p["country_probs"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p["admin1_probs"].sum(1), 1.0, rtol=1e-5)
    # A country's probability is the sum of its cells', each weighted by its share of points in that country.
    comp = pred.cells.composition("country")
    for j, (iso, name) in enumerate(pred.country_keys):
        mine = comp[(comp["iso_a2"] == iso) & (comp["country"] == name)]
        w = np.bincount(mine["cell_id"], mine["share"], minlength=pred.n_cells)
        np.testing.assert_allclose(p["country_probs"][:, j], p["probs"] @ w, rtol=1e-5, atol=1e-7)
    assert p["top_cells"].shape == (7, 4)


def test_radii_hand_computed(zs):
    root, *_ = zs
    pred = Predictor.from_bundle(root / "bundle")
    C = pred.n_cells
    d = haversine_km(pred.centres[0, 0], pred.centres[0, 1], pred.centres[:, 0], pred.centres[:, 1])
    far = int(np.argmax(d))
    rings = pred.radius_model.spread_km              # zero-shot head: each cell's area as a disk, uncalibrated
    assert not pred.radius_model.calibrated and rings.shape == (C, 16) and (rings > 0).all()
    probs = np.zeros((2, C))
    probs[0, 0] = 1.0                        # all mass on the answer's cell: its own spread, never 0 km
    probs[1, 0], probs[1, far] = 0.4, 0.6    # 50% needs the far cell too
    r50, r90 = pred.radii(pred.centres[[0, 0], 0], pred.centres[[0, 0], 1], probs)
    # Answer at the centre: each ring holds 1/16 of the cell; 8 rings hold 50%, 15 rings hold >= 90%.
    assert r50[0] > 0 and r50[0] == pytest.approx(rings[0, 7], rel=1e-3) and r90[0] == pytest.approx(rings[0, 14], rel=1e-3)
    # The far cell's photos lie within its outermost ring of its centre, d[far] km away.
    assert r50[1] == pytest.approx(d[far], abs=rings[far, -1]) and r90[1] == pytest.approx(d[far], abs=rings[far, -1])
    assert r50[1] <= r90[1]


def test_radii_never_zero_and_grow_with_spread(zs):
    root, *_ = zs
    pred = Predictor.from_bundle(root / "bundle")
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(pred.n_cells, 0.05), size=6)
    probs[:3] *= 0.3 / probs[:3].sum(1, keepdims=True)
    probs[np.arange(3), [0, 1, 2]] += 0.7                       # one cell holds >= 70% of the mass
    top = probs.argmax(1)
    lat, lon = pred.centres[top, 0], pred.centres[top, 1]
    r50, r90 = pred.radii(lat, lon, probs)
    assert (r50 > 0).all() and (r50 <= r90).all()
    base = pred.radius_model.spread_km.copy()
    pred.radius_model.spread_km = base * 3.0                    # every cell spreads three times as far
    w50, w90 = pred.radii(lat, lon, probs)
    assert (w50[:3] > 2.5 * r50[:3]).all()                      # dominated by the answer's cell: ~3x
    one = np.eye(pred.n_cells)[:1]                              # one cell, answer at its centre: exactly 3x
    o50, o90 = pred.radii(pred.centres[:1, 0], pred.centres[:1, 1], one)
    pred.radius_model.spread_km = base
    b50, b90 = pred.radii(pred.centres[:1, 0], pred.centres[:1, 1], one)
    assert o50[0] == pytest.approx(3 * b50[0], rel=1e-3) and o90[0] == pytest.approx(3 * b90[0], rel=1e-3)
    pred.radius_model.spread_km[top[0]] *= 3.0                  # only the answer's cell spreads wider
    g50, _ = pred.radii(lat[:1], lon[:1], probs[:1])
    assert g50[0] > 1.5 * r50[0]


def test_bad_inputs(zs, tmp_path):
    root, *_ = zs
    pred = Predictor.from_bundle(root / "bundle")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg"):
        pred.locate([str(bad)])
    with pytest.raises(UserError, match="shape"):
        pred.predict_embeddings(np.zeros((2, pred.head.embed_dim + 1), np.float32))
    with pytest.raises(UserError, match="does not exist"):
        collect_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(UserError, match="head"):
        Predictor.from_bundle(Bundle(tmp_path / "nohead", create=True).path)


def test_locate_files_csv_and_geojson(zs, tmp_path):
    from pigeon.commands.locate import locate_files

    root, *_ = zs
    folder = root / "world" / "images"
    ans, failures = locate_files([folder], root / "bundle", out=tmp_path / "r.csv", top_k=2)
    assert len(ans) == 240 and failures == []
    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table.columns[:3]) == ["image", "lat", "lon"] and len(table) == 240
    locate_files([folder / "000001.png"], root / "bundle", out=tmp_path / "r.geojson")
    gj = json.loads((tmp_path / "r.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"][0]["geometry"]["type"] == "Point"
    with pytest.raises(UserError, match="--out"):
        locate_files([folder], root / "bundle", out=tmp_path / "r.txt")


def test_cli_locate_and_errors(zs, tmp_path, capsys):
    from pigeon.cli import main

    root, *_ = zs
    img = root / "world" / "images" / "000002.png"
    with pytest.raises(SystemExit) as e:  # typer exits 0 on success
        main(["locate", str(img), "--bundle", str(root / "bundle"), "--out", str(tmp_path / "o.csv")])
    assert e.value.code in (0, None)
    assert len(pd.read_csv(tmp_path / "o.csv")) == 1
    with pytest.raises(SystemExit) as e:
        main(["locate", str(tmp_path / "missing.jpg"), "--bundle", str(root / "bundle")])
    assert e.value.code == 2
    assert "missing.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--bundle", str(root / "bundle")])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err


def test_served_probabilities_are_the_heads_own_maths(zs):
    """One formula for the logits: the Predictor's probabilities are softmax(head(x, calibrated=True)),
    also after the head changes in place (no stale copy of the prototypes is served)."""
    import torch

    root, _, _ = zs
    pred = Predictor.from_bundle(root / "bundle")
    x = np.random.default_rng(0).normal(size=(7, pred.head.embed_dim)).astype(np.float32)
    with torch.no_grad():
        pred.head.temperature.fill_(1.7)
        pred.head.centre.add_(0.05)

    def heads(x):
        return torch.softmax(pred.head(torch.from_numpy(x), calibrated=True), dim=-1).detach().numpy()

    want = heads(x)
    np.testing.assert_allclose(pred.cell_probs(x), want, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        pred.head.prototypes.mul_(-1.0)   # as an optimizer step would, in place
    after = heads(x)
    assert not np.allclose(after, want, atol=1e-4)
    np.testing.assert_allclose(pred.cell_probs(x), after, rtol=1e-6, atol=1e-9)
