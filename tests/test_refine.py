"""Refinement: picks the right neighbour on constructed cases, respects the guard, matches a per-query
reference loop, and beats "top cell centre" on a world where embeddings follow location."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pigeon.core.errors import UserError
from pigeon.core.sphere import haversine_km, to_xyz
from pigeon.index import ClusterTable, Refiner, build_gallery
from pigeon.index.refine import MODES


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _hand_world():
    """Two cells (centres 0,0 and 0,10); cell 0 holds clusters A (near 0,-1) and B (near 0,1),
    cell 1 holds cluster C (near 0,10). Embeddings are axis vectors so similarities are exact."""
    d = 6
    e = np.eye(d, dtype=np.float32)
    emb = np.stack([e[0], _unit(e[0] + 0.2 * e[3]), e[1], _unit(e[1] + 0.2 * e[4]), e[2], _unit(e[2] + 0.2 * e[5])])
    lat = np.array([0.0, 0.05, 0.0, 0.05, 0.0, 0.05])
    lon = np.array([-1.0, -1.05, 1.0, 1.05, 10.0, 10.05])
    cell = np.array([0, 0, 0, 0, 1, 1])
    cluster = np.array([0, 0, 1, 1, 2, 2])
    ids = np.array([10, 11, 20, 21, 30, 31])
    table = ClusterTable.from_members(lat, lon, cell, cluster, emb)
    gallery = pd.DataFrame({"id": ids, "lat": lat, "lon": lon, "cell": cell, "cluster": cluster, "image": ""})
    centres = np.array([[0.0, 0.0], [0.0, 10.0]])
    return Refiner(centres, table, gallery, ids, emb), emb


def test_picks_the_exact_neighbour_in_the_best_cluster():
    ref, emb = _hand_world()
    q = np.stack([emb[3], emb[0]])                     # exactly image 21, exactly image 10
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    r = ref.refine(q, probs, mode="cluster+nn", neighbours=2)
    assert list(r.neighbour_ids[:, 0]) == [21, 10]
    assert list(r.cluster_id) == [1, 0]
    np.testing.assert_allclose(r.lat, [0.05, 0.0])
    np.testing.assert_allclose(r.lon, [1.05, -1.0])
    np.testing.assert_allclose(r.neighbour_sims[:, 0], 1.0, atol=1e-6)
    assert r.neighbour_ids[0, 1] == 20 and r.neighbour_sims[0, 1] < 1.0
    assert list(r.mode) == ["cluster+nn"] * 2
    np.testing.assert_allclose(r.moved_km, haversine_km(0, 0, r.lat, r.lon))


def test_score_weighs_cell_probability_against_prototype_distance():
    ref, emb = _hand_world()
    q = emb[4:5]                                       # looks exactly like cluster C in cell 1
    near_tie = ref.refine(q, np.array([[0.55, 0.45]]), mode="cluster+nn", max_refinement_km=None)
    assert near_tie.cluster_id[0] == 2 and near_tie.cell[0] == 1 and near_tie.neighbour_ids[0, 0] == 30
    # a confident head keeps its cell: the best cluster inside cell 0 wins instead
    sure = ref.refine(q, np.array([[0.99, 0.01]]), mode="cluster+nn")
    assert sure.cell[0] == 0 and sure.cluster_id[0] in (0, 1)
    # lower temperature sharpens the softmax, so the look-alike cluster wins even then
    sharp = ref.refine(q, np.array([[0.99, 0.01]]), mode="cluster+nn", temperature=0.05, max_refinement_km=None)
    assert sharp.cluster_id[0] == 2


def test_modes_and_guard():
    ref, emb = _hand_world()
    q = emb[2:3]
    p = np.array([[0.8, 0.2]])
    none = ref.refine(q, p, mode="none")
    assert (none.lat[0], none.lon[0]) == (0.0, 0.0) and none.mode[0] == "none" and none.neighbour_ids[0, 0] == -1
    cl = ref.refine(q, p, mode="cluster")
    np.testing.assert_allclose([cl.lat[0], cl.lon[0]], [0.025, 1.025], atol=1e-3)
    assert cl.cluster_id[0] == 1 and cl.mode[0] == "cluster" and cl.neighbour_ids[0, 0] == -1
    nn = ref.refine(q, p, mode="nn")
    assert nn.neighbour_ids[0, 0] == 20 and nn.cluster_id[0] == -1 and nn.mode[0] == "nn"
    # the refined point is ~111 km from the top cell's centre: a 50 km guard cancels it
    ok = ref.refine(q, p, max_refinement_km=500)
    assert ok.mode[0] == "cluster+nn" and 100 < ok.moved_km[0] < 125
    back = ref.refine(q, p, max_refinement_km=50)
    assert back.mode[0] == "none" and (back.lat[0], back.lon[0]) == (0.0, 0.0)
    assert back.moved_km[0] == 0.0 and back.neighbour_ids[0, 0] == -1 and back.cluster_id[0] == -1


def test_guard_undoes_a_far_switch_of_cell_first():
    ref, emb = _hand_world()
    q, p = emb[4:5], np.array([[0.55, 0.45]])
    far = ref.refine(q, p, max_refinement_km=None)
    assert far.cell[0] == 1 and far.moved_km[0] > 1000
    # the switch to cell 1 (~1100 km away) is undone: cell 0's own best cluster answers (PIGEON)
    undone = ref.refine(q, p, max_refinement_km=500)
    assert undone.cell[0] == 0 and undone.cluster_id[0] in (0, 1) and undone.mode[0] == "cluster+nn"
    assert 100 < undone.moved_km[0] < 125 and undone.neighbour_ids[0, 0] in (10, 11, 20, 21)
    cl = ref.refine(q, p, mode="cluster", max_refinement_km=500)
    assert cl.cell[0] == 0 and cl.mode[0] == "cluster"
    # and when even that is too far, the top cell's centre
    centre = ref.refine(q, p, max_refinement_km=50)
    assert centre.mode[0] == "none" and (centre.lat[0], centre.lon[0]) == (0.0, 0.0) and centre.cluster_id[0] == -1


def test_average_of_neighbours_is_a_weighted_spherical_mean():
    ref, emb = _hand_world()
    r = ref.refine(_unit(emb[2] + emb[3])[None], np.array([[0.9, 0.1]]), neighbours=2, average=2)
    assert 0.0 < r.lat[0] < 0.05 and 1.0 < r.lon[0] < 1.05


def test_cell_without_gallery_falls_back_and_bad_input_is_refused():
    ref, emb = _hand_world()
    centres = np.array([[0.0, 0.0], [0.0, 10.0], [40.0, 40.0]])
    ref3 = Refiner(centres, ClusterTable(ref_frame(ref), ref.prototypes), _gal(ref), ref.g_id, emb)
    r = ref3.refine(emb[:1], np.array([[0.0, 0.0, 1.0]]), top_k=1)
    assert r.mode[0] == "none" and (r.lat[0], r.lon[0]) == (40.0, 40.0)
    with pytest.raises(UserError, match="mode"):
        ref.refine(emb[:1], np.array([[1.0, 0.0]]), mode="bogus")
    with pytest.raises(UserError, match="shape"):
        ref.refine(emb[:1], np.array([[1.0, 0.0, 0.0]]))


def ref_frame(ref):
    return pd.DataFrame({"cluster_id": np.arange(len(ref.c_cell)), "cell": ref.c_cell, "lat": ref.c_lat,
                         "lon": ref.c_lon, "size": np.bincount(ref.g_cluster)})


def _gal(ref):
    return pd.DataFrame({"id": ref.g_id, "lat": ref.g_lat, "lon": ref.g_lon, "cell": ref.g_cell,
                         "cluster": ref.g_cluster, "image": ""})


# -- a constructed world: embeddings are a smooth noisy function of location --------------------

def make_world(n_gallery=3000, n_query=300, n_cells=12, dim=64, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.stack([rng.uniform(-50, 60, n_cells), rng.uniform(-120, 140, n_cells)], 1)
    freq = rng.normal(scale=12.0, size=(3, dim // 2))        # random Fourier features of xyz

    def sample(n):
        c = rng.integers(0, n_cells, n)
        lat = np.clip(centres[c, 0] + rng.normal(0, 2.5, n), -89, 89)
        lon = centres[c, 1] + rng.normal(0, 2.5, n)
        z = to_xyz(lat, lon) @ freq
        emb = np.concatenate([np.sin(z), np.cos(z)], 1) + noise * rng.normal(size=(n, dim))
        return lat, lon, emb.astype(np.float32)

    def cell_of(lat, lon):
        return np.argmax(to_xyz(lat, lon) @ to_xyz(centres[:, 0], centres[:, 1]).T, axis=1)

    def head(lat, lon):
        """A noisy head: probabilities fall with distance to each cell centre, plus noise."""
        d = haversine_km(lat[:, None], lon[:, None], centres[None, :, 0], centres[None, :, 1])
        logit = -d / 800.0 + rng.normal(0, 0.5, d.shape)
        p = np.exp(logit - logit.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    g = sample(n_gallery)
    q = sample(n_query)
    return centres, g, q, cell_of, head


def _naive(ref, q, p, k=5, T=1.6):
    """Per-query loop, the way PIGEON writes it: the reference the vectorised path must equal."""
    out = []
    for i in range(len(q)):
        top = np.argsort(-p[i])[:k]
        best, scores = [], []
        for c in top:
            ks = np.flatnonzero(ref.c_cell == c)
            if len(ks) == 0:
                best.append(-1); scores.append(-np.inf); continue
            d = np.linalg.norm(ref.prototypes[ks] - q[i], axis=1)
            best.append(ks[np.argmin(d)]); scores.append(-d.min() / T)
        s = np.exp(np.array(scores) - max(scores)) * p[i, top]
        kbest = best[int(np.argmax(s))]
        members = np.flatnonzero(ref.g_cluster == kbest)
        j = members[np.argmax(ref.vectors[members] @ q[i])]
        out.append(ref.g_id[j])
    return np.array(out)


@pytest.fixture(scope="module")
def world():
    centres, (glat, glon, gemb), (qlat, qlon, qemb), cell_of, head = make_world()
    gal = build_gallery(gemb, np.arange(len(glat)) * 7 + 3, glat, glon, cell_of(glat, glon))
    ref = Refiner.from_index(centres, gal.clusters, gal.frame, gal.index)
    return ref, qlat, qlon, qemb, head(qlat, qlon)


def test_vectorised_equals_per_query_reference(world):
    ref, qlat, qlon, qemb, p = world
    r = ref.refine(qemb, p, mode="cluster+nn", max_refinement_km=None)
    qn = qemb / np.linalg.norm(qemb, axis=1, keepdims=True)
    np.testing.assert_array_equal(r.neighbour_ids[:, 0], _naive(ref, qn, p))


def test_refinement_improves_median_error_over_cell_centre(world):
    ref, qlat, qlon, qemb, p = world
    err = {m: np.median(haversine_km(qlat, qlon, *(lambda r: (r.lat, r.lon))(ref.refine(qemb, p, mode=m))))
           for m in MODES}
    assert err["cluster+nn"] < 0.7 * err["none"], err
    assert err["cluster"] < err["none"], err
    assert err["nn"] < err["none"], err


def test_batch_of_one_equals_batch(world):
    ref, qlat, qlon, qemb, p = world
    whole = ref.refine(qemb[:20], p[:20])
    ones = [ref.refine(qemb[i:i + 1], p[i:i + 1]) for i in range(20)]
    np.testing.assert_array_equal(whole.neighbour_ids, np.concatenate([o.neighbour_ids for o in ones]))
    np.testing.assert_allclose(whole.lat, np.concatenate([o.lat for o in ones]))
