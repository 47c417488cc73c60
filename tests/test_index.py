"""GeoIndex (restricted search, add/remove/save/load, refusal of mismatched parts, interrupted
writes), in-cell clusters (OPTICS equals sklearn's, every image kept) and gallery append/remove."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pigeon.core.errors import UserError
from pigeon.core.sphere import haversine_km
from pigeon.index import ClusterTable, GeoIndex, append_gallery, build_gallery, cluster_points, remove_from_gallery
from pigeon.index.clusters import assign_to_existing, optics_labels
from pigeon.index.gallery import sidecar_path

KINDS = ["flat", "hnsw", "ivf"]


def _data(n=600, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 1000
    return x, ids


@pytest.mark.parametrize("kind", KINDS)
def test_restricted_search_returns_only_allowed_ids(kind):
    x, ids = _data()
    cell = np.arange(len(ids)) % 7
    g = GeoIndex(x.shape[1], kind=kind)
    g.add(x, ids)
    for c in (2, 5):
        allowed = ids[cell == c]
        scores, got = g.search(x[:40], 10, allowed_ids=allowed)
        assert np.isin(got[got >= 0], allowed).all()
        assert (got >= 0).sum() > 0.9 * got.size           # restricted search still finds neighbours
        # a query that is itself in the allowed set finds itself first
        own = np.flatnonzero(cell == c)[:5]
        s, i = g.search(x[own], 3, allowed_ids=allowed)
        np.testing.assert_array_equal(i[:, 0], ids[own])
        np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)
    # fewer allowed ids than k: the rest is -1 with -inf scores
    s, i = g.search(x[:3], 5, allowed_ids=ids[:2])
    assert (i[:, 2:] == -1).all() and np.isneginf(s[:, 2:]).all()
    assert set(i[:, :2].ravel()) == set(ids[:2])


def test_flat_search_is_exact_cosine():
    x, ids = _data(200, 16)
    g = GeoIndex(16)
    g.add(x * 3.0, ids)                                     # scale must not matter: cosine
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[:10] @ xn.T
    s, i = g.search(x[:10], 4)
    np.testing.assert_array_equal(i, ids[np.argsort(-sims, axis=1)[:, :4]])
    np.testing.assert_allclose(s, -np.sort(-sims, axis=1)[:, :4], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_save_load_round_trip(kind, tmp_path):
    x, ids = _data()
    g = GeoIndex(x.shape[1], kind=kind)
    g.add(x[:400], ids[:400])
    g.add(x[400:], ids[400:])
    assert g.ntotal == 600
    gone = ids[::3]
    assert g.remove(np.concatenate([gone, [-5, 7]])) == len(gone)   # unknown ids are ignored
    assert g.ntotal == 600 - len(gone)
    assert not np.isin(g.ids(), gone).any()
    s, i = g.search(x[:50], 5)
    assert not np.isin(i, gone).any()
    kept = np.flatnonzero(~np.isin(ids, gone))
    s_self, i_self = g.search(x[kept[:20]], 1)
    np.testing.assert_array_equal(i_self[:, 0], ids[kept[:20]])
    p = tmp_path / "index.faiss"
    g.save(p, backbone_hash="b" * 64, cells_hash="c" * 64)
    h = GeoIndex.load(p, expect_backbone_hash="b" * 64, expect_cells_hash="c" * 64)
    assert h.kind == kind and h.ntotal == g.ntotal and json.loads(sidecar_path(p).read_text())["count"] == g.ntotal
    s2, i2 = h.search(x[:50], 5)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2, atol=1e-6)
    vid, vec = h.vectors()
    np.testing.assert_array_equal(np.sort(vid), np.sort(ids[kept]))
    row = {v: j for j, v in enumerate(ids)}
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(vec, xn[[row[v] for v in vid]], atol=1e-6)
    # add after load works, re-adding an id does not
    h.add(x[gone[:0].size:][:1], np.array([99_999_999]))
    assert h.ntotal == g.ntotal + 1
    with pytest.raises(UserError, match="unique"):
        h.add(x[:1], ids[kept[:1]])


def test_bad_inputs_are_refused(tmp_path):
    x, ids = _data(50, 8)
    g = GeoIndex(8)
    with pytest.raises(UserError, match="dimension"):
        g.add(np.zeros((3, 9), np.float32), np.arange(3))
    with pytest.raises(UserError, match="ids"):
        g.add(x, ids[:10])
    with pytest.raises(UserError, match="unique"):
        g.add(x[:2], np.array([1, 1]))
    with pytest.raises(UserError, match="kind"):
        GeoIndex(8, kind="lsh")
    with pytest.raises(UserError, match="does not exist"):
        GeoIndex.load(tmp_path / "none.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(UserError, match="not a readable FAISS index"):
        GeoIndex.load(tmp_path / "junk.faiss")


def test_mismatched_backbone_or_cells_is_refused(tmp_path):
    x, ids = _data(100, 8)
    g = GeoIndex(8)
    g.add(x, ids)
    p = tmp_path / "index.faiss"
    g.save(p, backbone_hash="aaaa" * 16, cells_hash="cccc" * 16)
    with pytest.raises(UserError, match=r"backbone \(index built with aaaa"):
        GeoIndex.load(p, expect_backbone_hash="bbbb" * 16, expect_cells_hash="cccc" * 16)
    with pytest.raises(UserError, match=r"cells \(index built on cccc") as e:
        GeoIndex.load(p, expect_backbone_hash="aaaa" * 16, expect_cells_hash="dddd" * 16)
    assert "backbone (" not in str(e.value)
    with pytest.raises(UserError, match="backbone.*cells"):
        GeoIndex.load(p, expect_backbone_hash="bbbb" * 16, expect_cells_hash="dddd" * 16)
    meta = json.loads(sidecar_path(p).read_text())
    meta["count"] = 7
    with pytest.raises(UserError, match="vector count"):
        GeoIndex.load(p, meta=meta)


def test_interrupted_write_leaves_the_old_index_loadable(tmp_path, monkeypatch):
    import faiss

    x, ids = _data(100, 8)
    old = GeoIndex(8)
    old.add(x[:60], ids[:60])
    p = tmp_path / "index.faiss"
    old.save(p, backbone_hash="a" * 64)
    before = p.read_bytes()
    new = GeoIndex(8)
    new.add(x, ids)
    real = faiss.write_index

    def half_then_die(index, path):
        real(index, path)
        with open(path, "r+b") as f:
            f.truncate(100)                                 # a half-written file...
        raise KeyboardInterrupt                             # ...and the writer is killed

    monkeypatch.setattr(faiss, "write_index", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        new.save(p, backbone_hash="a" * 64)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    back = GeoIndex.load(p, expect_backbone_hash="a" * 64)
    assert back.ntotal == 60


# -- clusters ----------------------------------------------------------------------------------

def test_own_optics_equals_sklearn():
    from sklearn.cluster import OPTICS

    rng = np.random.default_rng(3)
    for n in (40, 300):
        c = rng.normal(size=(4, 3)) * 3
        x = c[rng.integers(0, 4, n)] + rng.normal(size=(n, 3)) * 0.5
        ms = max(3, n // 20)
        ref = OPTICS(min_samples=ms, xi=0.05, min_cluster_size=ms).fit(x).labels_
        np.testing.assert_array_equal(optics_labels(x, ms, 0.05), ref)


def _two_spots(rng, n_each=60):
    """One cell with two tight groups of photos 300 km apart, plus a small cell of 5 photos."""
    lat = np.concatenate([rng.normal(45, 0.05, n_each), rng.normal(45, 0.05, n_each), rng.normal(-10, 0.1, 5)])
    lon = np.concatenate([rng.normal(5, 0.05, n_each), rng.normal(9, 0.05, n_each), rng.normal(120, 0.1, 5)])
    cell = np.array([3] * (2 * n_each) + [8] * 5)
    return lat, lon, cell


def test_clusters_split_inside_cells_and_keep_every_point(tmp_path):
    rng = np.random.default_rng(0)
    lat, lon, cell = _two_spots(rng)
    cl = cluster_points(lat, lon, cell)
    assert len(cl) == len(lat) and set(np.unique(cl)) == set(range(cl.max() + 1))
    assert not set(cl[:60]) & set(cl[60:120])                 # no cluster spans the two spots
    assert len(np.unique(cl[120:])) == 1 and cl[120] not in cl[:120]   # a small cell is one cluster
    emb = rng.normal(size=(len(lat), 16)).astype(np.float32)
    t = ClusterTable.from_members(lat, lon, cell, cl, emb)
    np.testing.assert_array_equal(t.frame["size"], np.bincount(cl))
    np.testing.assert_array_equal(t.frame["cell"], [3] * (len(t) - 1) + [8])
    np.testing.assert_allclose(np.linalg.norm(t.prototypes, axis=1), 1.0, atol=1e-5)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    mine = cl == cl[0]
    want = en[mine].mean(0) / np.linalg.norm(en[mine].mean(0))
    np.testing.assert_allclose(t.prototypes[cl[0]], want, atol=1e-5)
    for k in np.unique(cl[60:120]):
        assert haversine_km(t.frame["lat"][k], t.frame["lon"][k], 45, 9) < 10
    t.write(tmp_path / "clusters.parquet")
    back = ClusterTable.read(tmp_path / "clusters.parquet")
    pd.testing.assert_frame_equal(back.frame, t.frame)
    np.testing.assert_array_equal(back.prototypes, t.prototypes)
    # a new photo near the second spot joins that cluster; one in an unknown cell joins none
    got = assign_to_existing(np.array([45.01, 45.0]), np.array([8.99, 0.0]), np.array([3, 5]), t.frame)
    d = np.where(t.frame["cell"] == 3, haversine_km(45.01, 8.99, t.frame["lat"], t.frame["lon"]), np.nan)
    assert got[0] == int(np.nanargmin(d)) and got[0] in cl[60:120] and got[1] == -1


def test_noise_joins_the_nearest_cluster():
    rng = np.random.default_rng(1)
    lat, lon, cell = _two_spots(rng)
    lat = np.append(lat[:120], [45.0, 45.0])
    lon = np.append(lon[:120], [6.0, 8.2])                 # isolated points: OPTICS noise
    cl = cluster_points(lat, lon, np.full(122, 3))
    assert cl[120] in cl[:60] and cl[121] in cl[60:120]


def test_append_and_remove_keep_the_parts_consistent():
    rng = np.random.default_rng(2)
    lat, lon, cell = _two_spots(rng)
    emb = rng.normal(size=(len(lat), 16)).astype(np.float32)
    ids = np.arange(len(lat), dtype=np.int64) * 2
    g = build_gallery(emb, ids, lat, lon, cell, image=[f"img{i}.jpg" for i in range(len(lat))])
    k0 = len(g.clusters)
    g2 = append_gallery(g, emb[:3] + 0.01, np.array([1001, 1003, 1005]), np.array([45.0, 45.0, 60.0]),
                        np.array([5.0, 9.0, 30.0]), np.array([3, 3, 11]))
    assert g2.index.ntotal == len(g2.frame) == len(lat) + 3
    assert len(g2.clusters) == k0 + 1                          # the photo in the new cell 11 makes a new cluster
    f = g2.frame.set_index("id")
    assert f.loc[1001, "cluster"] in set(f.loc[ids[:60], "cluster"]) and f.loc[1003, "cluster"] in set(f.loc[ids[60:120], "cluster"])
    assert g2.clusters.frame["size"].sum() == len(g2.frame)
    g3, removed = remove_from_gallery(g2, np.concatenate([ids[120:], [1005]]))  # drops the small cell and cell 11
    assert removed == 6 and g3.index.ntotal == len(g3.frame) == len(lat) - 5 + 2
    assert len(g3.clusters) == k0 - 1
    assert set(g3.frame["cluster"]) == set(range(len(g3.clusters)))
    np.testing.assert_array_equal(np.bincount(g3.frame["cluster"]), g3.clusters.frame["size"])
    with pytest.raises(UserError, match="empty"):
        remove_from_gallery(g3, g3.frame["id"].to_numpy())
    assert g3.index.ntotal == len(g3.frame)                    # the refused removal changed nothing
