"""Country and admin-1 probabilities follow each cell's composition: a cell that straddles a border splits its mass."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely

from pigeon.geocells import build_cells
from pigeon.head import PrototypeHead
from pigeon.predictor import Predictor


@pytest.fixture(scope="module")
def straddling():
    """Two cells: cell 0 holds 21 points of Aland/a1 and 9 of Bland/b1 (70/30), cell 1 30 points of Bland/b2."""
    rows = [("AAA", "AA", "Aland", "a1", 0), ("BBB", "BB", "Bland", "b1", 1), ("BBB", "BB", "Bland", "b2", 5)]
    b = gpd.GeoDataFrame({"adm0_a3": [r[0] for r in rows], "iso_a2": [r[1] for r in rows], "country": [r[2] for r in rows],
                          "admin1": [r[3] for r in rows], "admin2": ""},
                         geometry=[shapely.box(r[4], 0, r[4] + 1, 1) for r in rows], crs="EPSG:4326")
    rng = np.random.default_rng(0)
    n = [21, 9, 30]
    lon = np.concatenate([rng.uniform(x + 0.1, x + 0.9, k) for x, k in zip((0, 1, 5), n)])
    lat = rng.uniform(0.1, 0.9, sum(n))
    cells = build_cells(lat, lon, b, min_size=20, max_size=100, progress=False)
    head = PrototypeHead(np.random.default_rng(1).normal(size=(len(cells), 8)))
    return cells, Predictor(cells, head, backbone=None)


def test_straddling_cell_splits_its_country_mass(straddling):
    cells, pred = straddling
    assert cells.gdf["name"].tolist() == ["AA-a1-0", "BB-b2-0"]
    for m in (pred._country_m, pred._admin_m):
        np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
    emb = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
    p = pred.predict_embeddings(emb, top_k=2)
    probs = p["probs"]
    assert pred.country_keys == [("AA", "Aland"), ("BB", "Bland")]
    np.testing.assert_allclose(p["country_probs"][:, 0], 0.7 * probs[:, 0], rtol=1e-5)
    np.testing.assert_allclose(p["country_probs"][:, 1], 0.3 * probs[:, 0] + probs[:, 1], rtol=1e-5)
    assert pred.admin1_keys == [("a1", "Aland"), ("b1", "Bland"), ("b2", "Bland")]
    np.testing.assert_allclose(p["admin1_probs"], np.c_[0.7 * probs[:, 0], 0.3 * probs[:, 0], probs[:, 1]], rtol=1e-5)
    np.testing.assert_allclose(p["country_probs"].sum(1), 1.0, rtol=1e-5)
    # the answer's dicts carry the split, and each top cell its one (majority) label
    out = pred.format(p, top_k=2)
    for i, a in enumerate(out):
        got = {c["iso_a2"]: c["probability"] for c in a["countries"]}
        assert got["AA"] == pytest.approx(0.7 * probs[i, 0], rel=1e-5) and got["BB"] == pytest.approx(0.3 * probs[i, 0] + probs[i, 1], rel=1e-5)
        labels = {c["cell_id"]: (c["iso_a2"], c["country"], c["admin1"]) for c in a["top_cells"]}
        assert labels == {0: ("AA", "Aland", "a1"), 1: ("BB", "Bland", "b2")}
