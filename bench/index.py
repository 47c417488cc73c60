"""Benchmark the gallery index and refinement; prints one JSON line per gallery size.

Synthetic 512-d gallery "clustered by location": cells are random places on the sphere, images
scatter around a few spots per cell, and an image's embedding is its cell's direction + its spot's
direction + noise (float32, generated in chunks). For each size: build time (FAISS add, in-cell
OPTICS clusters, prototypes), peak RSS, recall@10 of hnsw/ivf against flat on a sample (--kinds),
and refinement latency per query at batch 1 and 64 (best of 20 runs) for the compiled `Refiner` against the same
refinement written PIGEON's way (a per-sample Python loop of `torch.cdist` over each candidate
cell's prototypes and over the images of each candidate cell's best cluster), all in this run,
with two references:
- `PigeonStyleRefiner`, a lean in-memory loop: PIGEON's loop given precomputed per-cell /
  per-cluster tensors (leaner than PIGEON's code);
- `PigeonHFRefiner`, PIGEON's storage and calls (`ProtoRefiner.forward`): one HuggingFace `Dataset`
  of prototypes per cell and the gallery in a `DatasetDict`, read per query and candidate as PIGEON
  reads them (needs the `datasets` package, in the dev extra; `--no-hf` skips it).
Both must pick the same images as ours (agreement rates in the output).

    .venv/bin/python bench/index.py --sizes 100000 1000000 --cells-per-100k 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


from pigeon.core.sphere import haversine_km  # noqa: E402
from pigeon.index import GeoIndex, Refiner, index_in_cluster_order  # noqa: E402
from pigeon.index.clusters import ClusterTable, cluster_points  # noqa: E402


def rss_gib() -> float:
    """Current resident memory of this process (GiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_gallery(n: int, n_cells: int, dim: int, seed: int = 0):
    """Locations, cells and embeddings; embeddings written chunk by chunk into one float32 array."""
    rng = np.random.default_rng(seed)
    cen = np.stack([np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n_cells))), rng.uniform(-180, 180, n_cells)], 1)
    spots_per_cell = 4
    spot_off = rng.normal(0, 0.6, (n_cells, spots_per_cell, 2))                 # degrees around the centre
    cell = rng.integers(0, n_cells, n)
    spot = rng.integers(0, spots_per_cell, n)
    lat = np.clip(cen[cell, 0] + spot_off[cell, spot, 0] + rng.normal(0, 0.05, n), -89.9, 89.9)
    lon = cen[cell, 1] + spot_off[cell, spot, 1] + rng.normal(0, 0.05, n)
    cell_dir = rng.normal(size=(n_cells, dim)).astype(np.float32) / np.sqrt(dim)
    spot_dir = rng.normal(size=(n_cells * spots_per_cell, dim)).astype(np.float32) / np.sqrt(dim)
    emb = np.empty((n, dim), np.float32)
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        emb[s:e] = cell_dir[cell[s:e]] + 0.8 * spot_dir[cell[s:e] * spots_per_cell + spot[s:e]]
        emb[s:e] += rng.standard_normal((e - s, dim), dtype=np.float32) * (0.9 / np.sqrt(dim))
    return cen, lat, lon, cell, emb, (cell_dir, spot_dir, spot_off, spots_per_cell)


def make_queries(b: int, cen, parts, dim: int, seed: int = 1):
    cell_dir, spot_dir, spot_off, spc = parts
    rng = np.random.default_rng(seed)
    n_cells = len(cen)
    cell = rng.integers(0, n_cells, b)
    spot = rng.integers(0, spc, b)
    lat = cen[cell, 0] + spot_off[cell, spot, 0]
    lon = cen[cell, 1] + spot_off[cell, spot, 1]
    q = cell_dir[cell] + 0.8 * spot_dir[cell * spc + spot] + rng.standard_normal((b, dim), dtype=np.float32) * (0.9 / np.sqrt(dim))
    # a head that is right about the cell most of the time, with the truth among a few confusers
    logits = rng.normal(0, 1.0, (b, n_cells)).astype(np.float64)
    logits[np.arange(b), cell] += 4.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    return q.astype(np.float32), p / p.sum(1, keepdims=True), lat, lon


class PigeonStyleRefiner:
    """Refinement written the way PIGEON writes it: a Python loop per query, per candidate cell,
    `torch.cdist` to that cell's prototypes, then `torch.cdist` to the best cluster's images."""

    def __init__(self, ref: Refiner):
        import torch

        self.torch = torch
        vec = torch.from_numpy(np.ascontiguousarray(ref.vectors))
        protos = torch.from_numpy(ref.prototypes)
        self.cell_protos, self.cell_clusters = {}, {}
        for c in range(ref.n_cells):
            ks = ref.c_order[ref.c_offs[c]:ref.c_offs[c + 1]]
            if len(ks):
                self.cell_protos[c] = protos[ks]
                self.cell_clusters[c] = ks
        self.cluster_members = [torch.from_numpy(ref.gk_order[ref.gk_offs[k]:ref.gk_offs[k + 1]]) for k in range(len(ref.prototypes))]
        self.vec, self.lat, self.lon = vec, ref.g_lat, ref.g_lon
        self.centres = ref.centres

    def __call__(self, q: np.ndarray, p: np.ndarray, top_k: int = 5, temperature: float = 1.6):
        torch = self.torch
        qt = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))
        pt = torch.from_numpy(p)
        out = []
        for emb, probs in zip(qt, pt):
            top_p, top_c = torch.topk(probs, top_k)
            dists, preds = [], []
            for c in top_c.tolist():
                if c not in self.cell_protos:
                    dists.append(-1e5)
                    preds.append(tuple(self.centres[c]))
                    continue
                d = torch.cdist(self.cell_protos[c], emb[None]).flatten()
                j = int(torch.argmin(d))
                dists.append(-float(d[j]))
                members = self.cluster_members[self.cell_clusters[c][j]]
                dm = torch.cdist(self.vec[members], emb[None]).flatten()
                m = int(members[int(torch.argmin(dm))])
                preds.append((self.lat[m], self.lon[m]))
            w = torch.softmax(torch.tensor(dists, dtype=torch.float64) / temperature, 0) * top_p
            out.append(preds[int(torch.argmax(w))])
        return np.array(out)


def _haversine_t(a, b):
    """Great-circle km between (lng, lat) tensors, as PIGEON's torch `preprocessing.haversine`."""
    import torch

    lng1, lat1, lng2, lat2 = (torch.deg2rad(x) for x in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    h = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lng2 - lng1) / 2) ** 2
    return 2 * 6371.0 * torch.asin(torch.sqrt(h))


class PigeonHFRefiner:
    """PIGEON's `ProtoRefiner.forward` with PIGEON's storage and calls (models/proto_refiner.py).

    Storage as PIGEON keeps it: `protos`, a list with one HuggingFace `Dataset` per geocell (columns
    embedding, count, indices, lat, lng; `set_format('torch')`; None for a cell without images), and
    the gallery as a `DatasetDict` whose 'train' split holds embedding and labels = [lng, lat]. PIGEON
    loads both from disk (`load_from_disk`, memory-mapped Arrow); here they are built in memory from
    the same arrays with `Dataset.from_dict` (no hub, and no slower than a page-cached file).
    Per query, per candidate cell, the same calls as PIGEON: materialise the cell's prototype column,
    `-torch.cdist` to it, argmax, fetch that prototype's row, and for a cluster of more than one image
    gather its rows from the gallery (`dataset['train'][entry['indices']]`) and `torch.cdist` to them;
    then a temperature softmax times the cell probabilities, argmax, and the haversine guard.

    One deliberate difference: PIGEON's `_within_cluster_refinement` takes `torch.argmax` of the
    distances, i.e. the *farthest* image of the cluster (a bug in the released code); this takes the
    nearest (argmin), as DESIGN.md and `index.refine` do, so that its answers can be compared with
    ours. Speed is the same either way. The `.to('cuda')` calls are dropped (CPU run), and so is the
    per-batch print. A cell without prototypes answers its centre (PIGEON: [0, 0]), as ours does.
    """

    def __init__(self, ref: Refiner, progress: bool = True):
        import torch
        from datasets import Dataset, DatasetDict, disable_progress_bar
        from tqdm import tqdm

        disable_progress_bar()
        self.torch = torch
        t = time.perf_counter()
        labels = np.stack([ref.g_lon, ref.g_lat], 1)  # PIGEON's labels are [lng, lat]
        self.dataset = DatasetDict(train=Dataset.from_dict({"embedding": ref.vectors, "labels": labels}))
        self.dataset.set_format("torch")
        self.gallery_build_s = time.perf_counter() - t
        t = time.perf_counter()
        sizes = np.diff(ref.gk_offs)
        self.protos: list = [None] * ref.n_cells
        for c in tqdm(range(ref.n_cells), desc="per-cell prototype Datasets", disable=not progress, mininterval=5):
            ks = ref.c_order[ref.c_offs[c]:ref.c_offs[c + 1]]
            if not len(ks):
                continue
            members = [ref.gk_order[ref.gk_offs[k]:ref.gk_offs[k + 1]] for k in ks]
            # a one-image cluster answers its own lat/lng: take the member's exactly (PIGEON's centroid of one point)
            lat = np.array([ref.g_lat[m[0]] if len(m) == 1 else ref.c_lat[k] for k, m in zip(ks, members)])
            lng = np.array([ref.g_lon[m[0]] if len(m) == 1 else ref.c_lon[k] for k, m in zip(ks, members)])
            ds = Dataset.from_dict({"embedding": ref.prototypes[ks], "count": sizes[ks], "indices": members,
                                    "lat": lat, "lng": lng})
            ds.set_format("torch")
            self.protos[c] = ds
        self.protos_build_s = time.perf_counter() - t
        self.centres = torch.from_numpy(ref.centres[:, ::-1].copy())  # (lng, lat) of each cell's centre

    def _within_cluster_refinement(self, emb, entry) -> tuple[float, float]:
        if entry["count"] == 1:
            return entry["lng"].item(), entry["lat"].item()
        points = self.dataset["train"][entry["indices"]]
        embeddings = points["embedding"]
        distances = self.torch.cdist(embeddings, emb[None]).flatten()
        best = self.torch.argmin(distances).item()  # PIGEON: torch.argmax (the farthest image), see the class doc
        point = points["labels"][best]
        return point[0].item(), point[1].item()

    def __call__(self, q: np.ndarray, p: np.ndarray, top_k: int = 5, temperature: float = 1.6,
                 max_refinement: float | None = 1000.0) -> np.ndarray:
        """(lat, lon) per query. PIGEON's caller passes the top-k cells and probabilities (a batched
        `torch.topk` of the head's output) and the initial guesses (here the top cell's centre)."""
        torch = self.torch
        embedding = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))
        candidate_probs, candidate_cells = torch.topk(torch.from_numpy(p), top_k, dim=1)
        initial_preds = self.centres[candidate_cells[:, 0]]
        temp = torch.tensor(temperature)
        preds = []
        for i, (emb, candidates, c_probs) in enumerate(zip(embedding, candidate_cells, candidate_probs)):
            top_preds, top_distances = [], []
            for cell in candidates[:top_k]:
                protos = self.protos[cell.item()]
                if protos is None:
                    top_distances.append(torch.tensor(-100000.0))
                    top_preds.append(self.centres[cell.item()].tolist())
                    continue
                # PIGEON's `protos[cell]['embedding']`. datasets >= 4 answers a column name with a lazy
                # Column (materialising it builds a one-column Dataset first: slower); `_getitem` is the
                # path `ds['embedding']` took in the datasets 2.x PIGEON used: the column as one tensor
                cell_emb = protos._getitem("embedding")
                logits = -torch.cdist(cell_emb, emb[None]).flatten()
                top_distances.append(torch.max(logits).item())
                pred_id = torch.argmax(logits, dim=-1)
                entry = protos[pred_id.item()]
                top_preds.append(list(self._within_cluster_refinement(emb, entry)))
            top_distances = torch.tensor(top_distances, dtype=torch.float64)
            ex = torch.exp(top_distances / temp)
            final_probs = c_probs[:top_k] * (ex / ex.sum())
            refined_guess = torch.argmax(final_probs).item()
            refined = torch.tensor(top_preds[refined_guess], dtype=torch.float64)[None]
            if max_refinement is not None and _haversine_t(initial_preds[i][None], refined)[0] > max_refinement:
                final_probs = c_probs[:top_k]
            preds.append(top_preds[torch.argmax(final_probs).item()])
        out = np.array(preds, dtype=np.float64)
        return out[:, ::-1].copy()  # (lat, lon)


def time_it(fn, reps: int) -> float:
    """Best of `reps` timed calls after a warm-up: on a shared machine the minimum is the least noisy."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def recall_vs_flat(emb: np.ndarray, ids: np.ndarray, kinds: list[str], n_q: int = 200, sample: int = 100_000) -> dict:
    """recall@10 of hnsw/ivf against exact flat search, on (at most) `sample` vectors."""
    rng = np.random.default_rng(5)
    sel = np.sort(rng.choice(len(emb), min(sample, len(emb)), replace=False))
    x, xid = emb[sel], ids[sel]
    q = x[rng.choice(len(x), n_q, replace=False)] + rng.normal(0, 0.02, (n_q, x.shape[1])).astype(np.float32)
    flat = GeoIndex(x.shape[1], "flat")
    flat.add(x, xid)
    _, truth = flat.search(q, 10)
    out = {"recall_sample": len(x)}
    for kind in kinds:
        t = time.perf_counter()
        g = GeoIndex(x.shape[1], kind)
        g.add(x, xid)
        build = time.perf_counter() - t
        t = time.perf_counter()
        _, got = g.search(q, 10)
        lat_ms = (time.perf_counter() - t) / n_q * 1e3
        hits = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, truth)])
        out[kind] = {"recall@10": round(float(hits), 4), "build_s": round(build, 2), "search_ms_per_query_b200": round(lat_ms, 3)}
    t = time.perf_counter()
    flat.search(q, 10)
    out["flat"] = {"search_ms_per_query_b200": round((time.perf_counter() - t) / n_q * 1e3, 3)}
    return out


def run(n: int, cells_per_100k: int, dim: int, kinds: list[str], ref_queries: int, hf: bool = True) -> dict:
    n_cells = max(10, int(round(n / 100_000 * cells_per_100k)))
    r0 = rss_gib()
    t = time.perf_counter()
    cen, lat, lon, cell, emb, parts = make_gallery(n, n_cells, dim)
    gen_s = time.perf_counter() - t
    ids = np.arange(n, dtype=np.int64)
    r1 = rss_gib()
    t = time.perf_counter()
    cl = cluster_points(lat, lon, cell, progress=True)
    clus_s = time.perf_counter() - t
    t = time.perf_counter()
    index = index_in_cluster_order(emb, ids, cl, "flat")  # as build_gallery stores it: cluster by cluster
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    table = ClusterTable.from_members(lat, lon, cell, cl, emb)
    proto_s = time.perf_counter() - t
    import pandas as pd

    frame = pd.DataFrame({"id": ids, "lat": lat, "lon": lon, "cell": cell, "cluster": cl})
    recall = recall_vs_flat(emb, ids, kinds) if kinds else {}
    del emb  # the refiner reads the vectors from the FAISS storage (a view, no copy)
    t = time.perf_counter()
    ref = Refiner.from_index(cen, table, frame, index)
    refiner_s = time.perf_counter() - t
    rss_built = rss_gib()

    q, p, qlat, qlon = make_queries(256, cen, parts, dim)
    res = {}
    for b in (1, 64):
        s = time_it(lambda: ref.refine(q[:b], p[:b]), reps=20)
        res[f"ours_ms_per_query_b{b}"] = round(s / b * 1e3, 4)
    pig = PigeonStyleRefiner(ref)
    nq = min(ref_queries, len(q))
    s = time_it(lambda: pig(q[:nq], p[:nq]), reps=3)
    res["pigeon_loop_ms_per_query"] = round(s / nq * 1e3, 4)
    res["speedup_b64"] = round(res["pigeon_loop_ms_per_query"] / res["ours_ms_per_query_b64"], 1)
    res["speedup_b1"] = round(res["pigeon_loop_ms_per_query"] / res["ours_ms_per_query_b1"], 1)
    # both pick the same images (the loop has no guard; compare without it)
    a = ref.refine(q[:nq], p[:nq], max_refinement_km=None)
    bpig = pig(q[:nq], p[:nq])
    res["agree_with_loop"] = round(float(np.mean(haversine_km(a.lat, a.lon, bpig[:, 0], bpig[:, 1]) < 1e-6)), 4)
    if hf:
        del pig
        r_hf = rss_gib()
        hfr = PigeonHFRefiner(ref)
        res["hf_gallery_dataset_build_s"] = round(hfr.gallery_build_s, 1)
        res["hf_proto_datasets_build_s"] = round(hfr.protos_build_s, 1)
        res["hf_rss_gib_added"] = round(rss_gib() - r_hf, 2)
        s = time_it(lambda: hfr(q[:nq], p[:nq]), reps=3)
        res["pigeon_hf_ms_per_query"] = round(s / nq * 1e3, 4)
        res["speedup_hf_b64"] = round(res["pigeon_hf_ms_per_query"] / res["ours_ms_per_query_b64"], 1)
        res["speedup_hf_b1"] = round(res["pigeon_hf_ms_per_query"] / res["ours_ms_per_query_b1"], 1)
        # same answers as ours: without the guard (as for the loop) and with PIGEON's 1000 km guard on both.
        # The torch format hands labels out as float32 (as in PIGEON): the same image agrees to ~2 m, not 1e-6 km
        bhf = hfr(q, p, max_refinement=None)
        a = ref.refine(q, p, max_refinement_km=None)
        res["agree_hf_no_guard"] = round(float(np.mean(haversine_km(a.lat, a.lon, bhf[:, 0], bhf[:, 1]) < 0.01)), 4)
        bhf = hfr(q, p, max_refinement=1000.0)
        a = ref.refine(q, p, max_refinement_km=1000.0)
        res["agree_hf_guard_1000km"] = round(float(np.mean(haversine_km(a.lat, a.lon, bhf[:, 0], bhf[:, 1]) < 0.01)), 4)
        res["agree_hf_queries"] = len(q)
        del hfr
    err = {}
    for mode in ("none", "cluster", "nn", "cluster+nn"):
        r = ref.refine(q, p, mode=mode)
        err[mode] = round(float(np.median(haversine_km(qlat, qlon, r.lat, r.lon))), 1)
    return {
        "bench": "index", "n_gallery": n, "dim": dim, "n_cells": n_cells, "n_clusters": len(table),
        "gen_s": round(gen_s, 1), "faiss_add_s": round(add_s, 2), "clusters_optics_s": round(clus_s, 1),
        "prototypes_s": round(proto_s, 2), "refiner_setup_s": round(refiner_s, 2),
        "build_total_s": round(add_s + clus_s + proto_s + refiner_s, 1),
        "rss_gib_embeddings": round(r1 - r0, 2), "rss_gib_after_build": round(rss_built, 2), "peak_rss_gib": round(peak_gib(), 2),
        **res, "median_km_by_mode": err, "recall_vs_flat": recall,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--cells-per-100k", type=int, default=1000, help="cells per 100K gallery images (PIGEON: ~100 images a cell)")
    ap.add_argument("--kinds", nargs="*", default=["hnsw", "ivf"], help="approximate kinds whose recall@10 vs flat is measured")
    ap.add_argument("--ref-queries", type=int, default=32, help="queries for the PIGEON-style loops (best of 3 runs)")
    ap.add_argument("--no-hf", action="store_true", help="skip the reference on PIGEON's storage (HuggingFace datasets)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    for n in a.sizes:
        print(json.dumps(run(n, a.cells_per_100k, a.dim, a.kinds, a.ref_queries, hf=not a.no_hf)), flush=True)


if __name__ == "__main__":
    main()
