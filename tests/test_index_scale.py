"""Index at scale (issue 11): the ivfpq kind (IVF-PQ search, float16 vectors for refinement), builds
from memory-mapped float16 shards in chunks, memory-mapped loading, and refusals of bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from pigeon.core.errors import UserError
from pigeon.core.sphere import haversine_km
from pigeon.index import (IVFPQ_MIN_TRAIN, GeoIndex, Refiner, StackedRows, append_gallery, build_gallery,
                          index_in_cluster_order, remove_from_gallery)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's k-means with 2 OpenMP threads on a busy 2-core machine spins (measured 17 s vs 5 s for
    one thread to train this test's index): train on one thread, then restore."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _world(n: int = 20_000, d: int = 64, n_cells: int = 100, seed: int = 0):
    """Photos clustered by place: cell centres on the sphere, 4 spots a cell; embedding = cell
    direction + spot direction + noise (as bench/index.py makes them)."""
    rng = np.random.default_rng(seed)
    cen = np.stack([np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n_cells))), rng.uniform(-180, 180, n_cells)], 1)
    spot_off = rng.normal(0, 0.3, (n_cells, 4, 2))
    cell_dir = rng.normal(size=(n_cells, d)).astype(np.float32) / np.sqrt(d)
    spot_dir = rng.normal(size=(n_cells * 4, d)).astype(np.float32) / np.sqrt(d)

    def photos(m: int, r: np.random.Generator):
        cell, spot = r.integers(0, n_cells, m), r.integers(0, 4, m)
        lat = np.clip(cen[cell, 0] + spot_off[cell, spot, 0] + r.normal(0, 0.02, m), -89.9, 89.9)
        lon = cen[cell, 1] + spot_off[cell, spot, 1] + r.normal(0, 0.02, m)
        emb = cell_dir[cell] + 0.8 * spot_dir[cell * 4 + spot] + r.standard_normal((m, d), dtype=np.float32) * (0.9 / np.sqrt(d))
        return emb.astype(np.float32), lat, lon, cell

    emb, lat, lon, cell = photos(n, rng)
    q, qlat, qlon, qcell = photos(300, np.random.default_rng(seed + 1))
    logits = np.random.default_rng(seed + 2).normal(0, 1.0, (len(q), n_cells))
    logits[np.arange(len(q)), qcell] += 4.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return dict(cen=cen, emb=emb, lat=lat, lon=lon, cell=cell, ids=np.arange(n, dtype=np.int64) * 3 + 7,
                q=q, probs=probs / probs.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.fixture(scope="module")
def galleries(world):
    w = world
    flat = build_gallery(w["emb"], w["ids"], w["lat"], w["lon"], w["cell"])
    pq = build_gallery(w["emb"], w["ids"], w["lat"], w["lon"], w["cell"], kind="ivfpq")
    return flat, pq


def _refine(gal, w, **kw):
    return Refiner.from_index(w["cen"], gal.clusters, gal.frame, gal.index).refine(w["q"], w["probs"], **kw)


def _agree(a, b, km: float = 1.0) -> float:
    return float(np.mean(haversine_km(a.lat, a.lon, b.lat, b.lon) <= km))


def test_ivfpq_refinement_agrees_with_flat(galleries, world):
    flat, pq = galleries
    pd.testing.assert_frame_equal(flat.frame, pq.frame)                      # same clusters: lat/lon/cell only
    pd.testing.assert_frame_equal(flat.clusters.frame, pq.clusters.frame)
    np.testing.assert_array_equal(flat.clusters.prototypes, pq.clusters.prototypes)  # from the input, not the codes
    assert pq.index.kind == "ivfpq" and pq.index.pq_m == 8 and pq.index.nlist == 512   # d/8; min(4 sqrt(n), n/39)
    vid, vec = pq.index.vectors()
    assert vec.dtype == np.float16 and vec.shape == (20_000, 64)
    ref = Refiner.from_index(world["cen"], pq.clusters, pq.frame, pq.index)
    assert ref.vectors.dtype == np.float16 and np.shares_memory(ref.vectors, vec)   # no float32 copy
    for mode in ("cluster+nn", "nn"):
        a, b = _refine(flat, world, mode=mode), _refine(pq, world, mode=mode)
        assert _agree(a, b) >= 0.95, mode
        assert _agree(a, b, km=1e-6) >= 0.9, mode                             # most answers are the very same photo
    # the float16 kernel gives exactly what the float32 kernel gives on the same (widened) rows
    wide = Refiner(world["cen"], pq.clusters, pq.frame, vid, vec.astype(np.float32)).refine(world["q"], world["probs"])
    got = ref.refine(world["q"], world["probs"])
    np.testing.assert_array_equal(got.neighbour_ids, wide.neighbour_ids)
    np.testing.assert_array_equal(got.neighbour_sims, wide.neighbour_sims)
    # unrestricted search: PQ candidates re-ranked by the float16 vectors
    _, want = flat.index.search(world["q"], 10)
    s, have = pq.index.search(world["q"], 10)
    recall = np.mean([len(np.intersect1d(x, y)) / 10 for x, y in zip(want, have)])
    assert recall >= 0.9
    assert np.all(np.diff(s, axis=1) <= 1e-6)


def test_chunked_build_from_float16_shards_equals_one_shot(world, tmp_path):
    w = world
    half = w["emb"].astype(np.float16)
    cut = 7_001
    np.save(tmp_path / "a.npy", half[:cut])
    np.save(tmp_path / "b.npy", half[cut:])
    shards = StackedRows([np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")])
    assert shards.shape == half.shape and np.array_equal(shards[[5, cut, cut - 1, 19_999]], half[[5, cut, cut - 1, 19_999]])
    one = build_gallery(half.astype(np.float32), w["ids"], w["lat"], w["lon"], w["cell"])
    chunked = build_gallery(shards, w["ids"], w["lat"], w["lon"], w["cell"], chunk=1_000)
    pd.testing.assert_frame_equal(one.frame, chunked.frame)
    pd.testing.assert_frame_equal(one.clusters.frame, chunked.clusters.frame)
    np.testing.assert_allclose(one.clusters.prototypes, chunked.clusters.prototypes, atol=1e-6)
    np.testing.assert_array_equal(one.index.ids(), chunked.index.ids())
    np.testing.assert_array_equal(one.index.vectors()[1], chunked.index.vectors()[1])
    a, b = _refine(one, w), _refine(chunked, w)
    np.testing.assert_array_equal(a.neighbour_ids, b.neighbour_ids)
    np.testing.assert_array_equal(a.lat, b.lat)
    # stored cluster by cluster: each cluster's rows are one contiguous run of storage
    cl = one.frame.set_index("id").loc[one.index.ids(), "cluster"].to_numpy()
    assert (np.diff(cl) >= 0).all()
    # a plain float16 memmap works too, and index_in_cluster_order takes one
    direct = index_in_cluster_order(np.load(tmp_path / "a.npy", mmap_mode="r"), w["ids"][:cut], one.frame["cluster"][:cut].to_numpy(),
                                    chunk=999)
    assert direct.ntotal == cut


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_memory_mapped_index_answers_like_the_one_in_ram(galleries, world, kind, tmp_path):
    gal = galleries[kind == "ivfpq"]
    p = tmp_path / "index.faiss"
    gal.index.save(p, backbone_hash="b" * 64, cells_hash="c" * 64)
    ram = GeoIndex.load(p)
    mm = GeoIndex.load(p, mmap=True, expect_backbone_hash="b" * 64)
    assert mm.kind == kind and mm.read_only and not ram.read_only and mm.ntotal == gal.index.ntotal
    s1, i1 = ram.search(world["q"], 10)
    s2, i2 = mm.search(world["q"], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    allowed = gal.frame["id"].to_numpy()[gal.frame["cell"].to_numpy() == 3]
    np.testing.assert_array_equal(ram.search(world["q"][:20], 5, allowed)[1], mm.search(world["q"][:20], 5, allowed)[1])
    np.testing.assert_array_equal(mm.vectors()[1], gal.index.vectors()[1])
    mapped = gal.__class__(mm, gal.frame, gal.clusters)
    a, b = _refine(gal, world), _refine(mapped, world)
    np.testing.assert_array_equal(a.neighbour_ids, b.neighbour_ids)
    with pytest.raises(UserError, match="memory-mapped.*mmap=False"):
        mm.add(world["emb"][:1], np.array([1]))
    with pytest.raises(UserError, match="memory-mapped"):
        mm.remove(gal.frame["id"].to_numpy()[:1])


def test_ivfpq_remove_and_append_keep_working(galleries, world, tmp_path):
    flat, pq = galleries
    w = world
    pq.index.save(tmp_path / "pq.faiss")
    flat.index.save(tmp_path / "flat.faiss")
    pq = pq.__class__(GeoIndex.load(tmp_path / "pq.faiss"), pq.frame, pq.clusters)       # own copies to change
    flat = flat.__class__(GeoIndex.load(tmp_path / "flat.faiss"), flat.frame, flat.clusters)
    gone = w["ids"][w["cell"] % 5 == 0][::2]
    pq, n_pq = remove_from_gallery(pq, gone)
    flat, n_flat = remove_from_gallery(flat, gone)
    assert n_pq == n_flat == len(gone) and pq.index.ntotal == len(pq.frame) == 20_000 - len(gone)
    vid, vec = pq.index.vectors()
    assert not np.isin(vid, gone).any()
    row = (vid - 7) // 3
    xn = w["emb"][row] / np.linalg.norm(w["emb"][row], axis=1, keepdims=True)
    np.testing.assert_allclose(vec.astype(np.float32), xn, atol=1e-3)          # rows still line up with their ids
    _, own = pq.index.search(w["emb"][row[:50]], 1)
    np.testing.assert_array_equal(own[:, 0], vid[:50])                         # the IVF lists were renumbered too
    assert _agree(_refine(flat, w), _refine(pq, w)) >= 0.95
    new = w["emb"][:5] + 0.01
    pq = append_gallery(pq, new, np.array([1, 2, 4, 5, 8]), w["lat"][:5], w["lon"][:5], w["cell"][:5])
    assert pq.index.ntotal == len(pq.frame) == 20_000 - len(gone) + 5
    _, got = pq.index.search(new, 1)
    np.testing.assert_array_equal(got[:, 0], [1, 2, 4, 5, 8])
    pq.index.save(tmp_path / "pq2.faiss")
    back = GeoIndex.load(tmp_path / "pq2.faiss", mmap=True)
    np.testing.assert_array_equal(back.search(w["q"], 5)[1], pq.index.search(w["q"], 5)[1])


def test_bad_input_is_refused(world):
    with pytest.raises(UserError, match="kind 'pq' is unknown; use one of flat, hnsw, ivf, ivfpq"):
        GeoIndex(64, kind="pq")
    few = world["emb"][:IVFPQ_MIN_TRAIN - 1]
    with pytest.raises(UserError, match=f"at least {IVFPQ_MIN_TRAIN} vectors to train.*got {IVFPQ_MIN_TRAIN - 1}"):
        GeoIndex(64, kind="ivfpq").add(few, np.arange(len(few)))
    w = world
    with pytest.raises(UserError, match=f"at least {IVFPQ_MIN_TRAIN}"):
        build_gallery(w["emb"][:500], w["ids"][:500], w["lat"][:500], w["lon"][:500], w["cell"][:500], kind="ivfpq")
    with pytest.raises(UserError, match="pq_m 10 must divide the dimension 64.*try 8"):
        GeoIndex(64, kind="ivfpq", pq_m=10)
    g = GeoIndex(64, kind="ivfpq", nlist=16)
    g.train(w["emb"][:2_000])
    with pytest.raises(UserError, match="already trained"):
        g.train(w["emb"][:2_000])
    with pytest.raises(UserError, match="dimension 32"):
        g.add(np.zeros((3, 32), np.float32), np.arange(3))
    with pytest.raises(UserError, match="unique"):
        build_gallery(w["emb"][:10], np.zeros(10, np.int64), w["lat"][:10], w["lon"][:10], w["cell"][:10])
    with pytest.raises(UserError, match="2-D arrays"):
        StackedRows([np.zeros((3, 4)), np.zeros((3, 5))])
    with pytest.raises(UserError, match="2-D array"):
        build_gallery(np.zeros(10), np.arange(10), w["lat"][:10], w["lon"][:10], w["cell"][:10])
