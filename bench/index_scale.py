"""Benchmark the gallery index at scale (issue 11): flat vs ivfpq; prints one JSON line per config.

Synthetic 512-d gallery clustered by place, written as memory-mapped float16 shards (1M rows each, as
`pigeon build-index` will stream them): photo positions resampled from MP-16 (../shared/data/
mp16_gps_100k.csv, ~1 km of jitter); cells = the nearest of n/100 seeded centres (PIGEON: ~100
photos a cell, as in bench/index.py); places = the nearest of 4 per cell; embedding = cell direction
+ 0.8 x place direction + noise (as bench/index.py). Queries: fresh photos of the same world and a
noisy head (truth +4 logits).

Each step runs in its own subprocess, so its peak RSS (ru_maxrss) is its own:
- build KIND: `build_gallery` from the float16 shards (chunks), `GeoIndex.save`: build time (OPTICS,
  training, the rest), peak RSS (and peak private/anonymous RSS, sampled), index size on disk;
- query KIND [--mmap]: `GeoIndex.load` (in RAM or memory-mapped), `Refiner.from_index`: RSS after
  loading and after refining / searching (private vs file-backed = shareable between workers),
  refinement latency per query at batch 1 and 64 (best of 20), answers for the agreement;
- exact (when flat is not built, e.g. at 5M): flat's answers without a flat index, from a `Refiner`
  over the exactly normalised float32 vectors in a memory-mapped file;
- `--pq-decoded`: ivfpq refinement from vectors decoded from the PQ codes (option (a) of the issue)
  instead of the float16 store, for comparison.
Agreement = share of queries whose answer is within 1 km of flat's (and the very same photo).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/index_scale.py --sizes 1000000 --pq-decoded
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/index_scale.py --sizes 5000000 --kinds ivfpq
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before FAISS starts OpenMP: see docs/index.md (spinning threads)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MP16 = ROOT.parent / "shared" / "data" / "mp16_gps_100k.csv"
SHARD = 1_000_000
GIB = 2**30


# -- the synthetic world -----------------------------------------------------------------------------
def _xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)


def _points(base: np.ndarray, n: int, rng: np.random.Generator, jitter_km: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n positions resampled from the MP-16 points with Gaussian jitter."""
    pick = base[rng.integers(0, len(base), n)]
    s = np.degrees(jitter_km / 6371.0)
    lat = np.clip(pick[:, 0] + rng.normal(0, s, n), -89.9, 89.9)
    lon = (pick[:, 1] + rng.normal(0, s, n) / np.maximum(np.cos(np.radians(lat)), 0.05) + 180) % 360 - 180
    return lat, lon


def _nearest(tree, lat: np.ndarray, lon: np.ndarray, step: int = 1 << 20) -> np.ndarray:
    return np.concatenate([tree.query(_xyz(lat[s:s + step], lon[s:s + step]))[1] for s in range(0, len(lat), step)]).astype(np.int64)


def generate(work: Path, n: int, dim: int, cells_per_100k: int, n_queries: int, seed: int = 0) -> dict:
    """Write the gallery (float16 shards + positions/cells) and the queries under `work`."""
    import pandas as pd
    from scipy.spatial import cKDTree

    from pigeon.index import normalise

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    base = pd.read_csv(MP16)[["LAT", "LON"]].to_numpy(np.float64)
    lat, lon = _points(base, n, rng)
    n_cells = max(10, n * cells_per_100k // 100_000)
    cen = base[rng.choice(len(base), min(n_cells, len(base)), replace=False)]  # distinct MP-16 points
    n_cells = len(cen)
    places = np.stack(_points(base, 4 * n_cells, rng), 1)
    cell_tree, place_tree = cKDTree(_xyz(cen[:, 0], cen[:, 1])), cKDTree(_xyz(places[:, 0], places[:, 1]))
    cell, place = _nearest(cell_tree, lat, lon), _nearest(place_tree, lat, lon)
    cell_dir = rng.normal(size=(n_cells, dim)).astype(np.float32) / np.sqrt(dim)
    place_dir = rng.normal(size=(len(places), dim)).astype(np.float32) / np.sqrt(dim)

    def embed(c, p, r):
        return cell_dir[c] + 0.8 * place_dir[p] + r.standard_normal((len(c), dim), dtype=np.float32) * (0.9 / np.sqrt(dim))

    work.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(range(0, n, SHARD)):
        out = np.lib.format.open_memmap(work / f"emb-{k:03d}.npy", "w+", np.float16, (min(SHARD, n - s), dim))
        for a in range(0, len(out), 1 << 16):
            b = min(a + (1 << 16), len(out))
            out[a:b] = embed(cell[s + a:s + b], place[s + a:s + b], rng)
        out.flush()
        del out
    np.savez(work / "gallery.npz", lat=lat, lon=lon, cell=cell, cen=cen, ids=np.arange(n, dtype=np.int64))
    qrng = np.random.default_rng(seed + 1)
    qlat, qlon = _points(base, n_queries, qrng)
    qcell, qplace = _nearest(cell_tree, qlat, qlon), _nearest(place_tree, qlat, qlon)
    q = normalise(embed(qcell, qplace, qrng).astype(np.float16))  # queries pass through float16 like the gallery
    logits = qrng.normal(0, 1.0, (n_queries, n_cells)).astype(np.float32)
    logits[np.arange(n_queries), qcell] += 4.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.savez(work / "queries.npz", q=q, probs=probs / probs.sum(1, keepdims=True), lat=qlat, lon=qlon)
    return {"step": "generate", "n": n, "n_cells": int(n_cells), "gen_s": round(time.perf_counter() - t, 1),
            "shards_gib": round(sum(f.stat().st_size for f in work.glob("emb-*.npy")) / GIB, 2)}


def _shards(work: Path):
    from pigeon.index import StackedRows

    return StackedRows([np.load(f, mmap_mode="r") for f in sorted(work.glob("emb-*.npy"))])


# -- memory ----------------------------------------------------------------------------------------
def _status() -> dict[str, float]:
    """VmRSS / RssAnon (private) / RssFile (file-backed, shareable) of this process, GiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 2**20
    return out


class PeakSampler:
    """Samples this process's RSS every 0.2 s: peak total and peak private (anonymous) memory."""

    def __init__(self):
        self.peak = {"VmRSS": 0.0, "RssAnon": 0.0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return {k: round(v, 2) for k, v in self.peak.items()}


def _memory(tag: str) -> dict[str, float]:
    import psutil

    s = _status()
    full = psutil.Process().memory_full_info()
    return {f"{tag}_rss_gib": round(s["VmRSS"], 3), f"{tag}_private_gib": round(s["RssAnon"], 3),
            f"{tag}_file_backed_gib": round(s["RssFile"], 3), f"{tag}_pss_gib": round(full.pss / GIB, 3)}


# -- the steps (each in a subprocess) ------------------------------------------------------------------
def build(work: Path, kind: str, opts: dict) -> dict:
    """build_gallery from the float16 shards, then save the three parts; stage times from wrappers."""
    import pigeon.index.build as build_mod
    from pigeon.index import GeoIndex, build_gallery

    stages: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - t, 1)
            return out
        return run

    build_mod.cluster_points = timed("optics_s", build_mod.cluster_points)
    GeoIndex.train = timed("train_s", GeoIndex.train)
    g = np.load(work / "gallery.npz")
    emb = _shards(work)
    sampler = PeakSampler()
    t = time.perf_counter()
    gal = build_gallery(emb, g["ids"], g["lat"], g["lon"], g["cell"], kind=kind, index_options=opts.get(kind) or None)
    build_s = time.perf_counter() - t
    out = work / kind
    t = time.perf_counter()
    gal.index.save(out / "index.faiss")
    gal.frame.to_parquet(out / "gallery.parquet")
    gal.clusters.write(out / "clusters.parquet")
    save_s = time.perf_counter() - t
    peak = sampler.stop()
    return {"step": "build", "kind": kind, "n": len(emb), "build_s": round(build_s, 1), **stages,
            "fill_and_prototypes_s": round(build_s - sum(stages.values()), 1), "save_s": round(save_s, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_private_gib_sampled": peak["RssAnon"], "index_gib_on_disk": round((out / "index.faiss").stat().st_size / GIB, 3),
            "clusters": len(gal.clusters), **gal.index.describe()}


def _latency(ref, q: np.ndarray, p: np.ndarray) -> dict[str, float]:
    out = {}
    for b in (1, 64):
        ref.refine(q[:b], p[:b])
        best = min(_timed(lambda: ref.refine(q[:b], p[:b])) for _ in range(20))
        out[f"refine_ms_per_query_b{b}"] = round(best / b * 1e3, 4)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def query(work: Path, kind: str, mmap: bool, pq_decoded: bool) -> dict:
    """Load one built index (in RAM or memory-mapped), refine the queries, time it, save the answers."""
    import pandas as pd

    from pigeon.index import ClusterTable, GeoIndex, Refiner

    qz, g = np.load(work / "queries.npz"), np.load(work / "gallery.npz")
    q, p = qz["q"], qz["probs"]
    res = {"step": "query", "kind": kind, "mmap": mmap, **_memory("start")}
    t = time.perf_counter()
    index = GeoIndex.load(work / kind / "index.faiss", mmap=mmap)
    frame = pd.read_parquet(work / kind / "gallery.parquet")
    clusters = ClusterTable.read(work / kind / "clusters.parquet")
    ref = Refiner.from_index(g["cen"], clusters, frame, index)
    res.update(load_s=round(time.perf_counter() - t, 2), **_memory("loaded"))
    res.update(_latency(ref, q, p))
    r = ref.refine(q, p)
    res.update(_memory("after_refine"))
    t = time.perf_counter()
    _, top = index.search(q[:256], 10)
    res.update(search_ms_per_query_b256=round((time.perf_counter() - t) / 256 * 1e3, 3), **_memory("after_search"))
    tag = f"{kind}{'-mmap' if mmap else ''}"
    np.savez(work / f"answers-{tag}.npz", lat=r.lat, lon=r.lon, nb=r.neighbour_ids[:, 0], top=top)
    if pq_decoded and kind == "ivfpq" and not mmap:
        res["pq_decoded"] = _pq_decoded(work, index, clusters, frame, g["cen"], q, p)
    return res


def _pq_decoded(work: Path, index, clusters, frame, cen, q, p) -> dict:
    """Option (a): refinement from vectors decoded once from the PQ codes (float32 in RAM)."""
    import faiss

    from pigeon.index import Refiner

    before = _status()["RssAnon"]
    t = time.perf_counter()
    base = faiss.downcast_index(faiss.downcast_index(index._index.index).base_index)
    dec = base.reconstruct_n(0, index.ntotal)  # IVF lists scanned and decoded (IndexPreTransform undoes OPQ)
    decode_s = time.perf_counter() - t
    ref = Refiner(cen, clusters, frame, index.ids(), dec)
    r = ref.refine(q, p)
    np.savez(work / "answers-ivfpq-decoded.npz", lat=r.lat, lon=r.lon, nb=r.neighbour_ids[:, 0])
    return {"decode_s": round(decode_s, 1), "private_gib_added": round(_status()["RssAnon"] - before, 2), **_latency(ref, q, p)}


def exact(work: Path, kind_for_frame: str) -> dict:
    """Flat's answers without a flat index: a Refiner over the exactly normalised float32 vectors
    (written chunk by chunk to a memory-mapped file, input order), with the built frame and clusters."""
    import pandas as pd

    from pigeon.index import ClusterTable, Refiner, normalise

    emb, g, qz = _shards(work), np.load(work / "gallery.npz"), np.load(work / "queries.npz")
    path = work / "exact.f32.npy"
    t = time.perf_counter()
    out = np.lib.format.open_memmap(path, "w+", np.float32, emb.shape)
    for s in range(0, len(emb), 1 << 16):
        out[s:s + (1 << 16)] = normalise(emb[s:s + (1 << 16)])
    out.flush()
    del out
    write_s = time.perf_counter() - t
    vec = np.load(path, mmap_mode="r")
    frame = pd.read_parquet(work / kind_for_frame / "gallery.parquet")
    clusters = ClusterTable.read(work / kind_for_frame / "clusters.parquet")
    r = Refiner(g["cen"], clusters, frame, g["ids"], vec).refine(qz["q"], qz["probs"])
    top = _exact_top(vec, qz["q"][:256], g["ids"])
    np.savez(work / "answers-exact.npz", lat=r.lat, lon=r.lon, nb=r.neighbour_ids[:, 0], top=top)
    path.unlink()
    return {"step": "exact", "write_s": round(write_s, 1), **_memory("end")}


def _exact_top(vec: np.ndarray, q: np.ndarray, ids: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids by brute force over a memory-mapped matrix, chunk by chunk."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(vec), 1 << 18):
        sims = q @ np.asarray(vec[s:s + (1 << 18)]).T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]                  # the chunk's top k, then merge
        all_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        all_i = np.concatenate([best_i, ids[s + part]], 1)
        o = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, o, 1), np.take_along_axis(all_i, o, 1)
    return best_i


# -- the driver ------------------------------------------------------------------------------------
def _sub(*args: str) -> dict:
    """Run one step of this script in a fresh process; its last stdout line is its JSON result."""
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"step {args} failed ({r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _agreement(work: Path, ref_tag: str, tags: list[str]) -> dict:
    from pigeon.core.sphere import haversine_km

    a = np.load(work / f"answers-{ref_tag}.npz")
    out = {}
    for tag in tags:
        f = work / f"answers-{tag}.npz"
        if tag == ref_tag or not f.exists():
            continue
        b = np.load(f)
        km = haversine_km(a["lat"], a["lon"], b["lat"], b["lon"])
        row = {"within_1km_of_flat": round(float(np.mean(km <= 1.0)), 4), "same_photo": round(float(np.mean(a["nb"] == b["nb"])), 4),
               "queries": int(len(km))}
        if "top" in b.files:
            row["search_recall@10"] = round(float(np.mean([len(np.intersect1d(x, y)) / 10 for x, y in zip(a["top"], b["top"])])), 4)
        out[tag] = row
    return out


def run_size(n: int, a: argparse.Namespace) -> None:
    work = Path(a.work) / f"n{n}"
    opts = json.dumps({"ivfpq": {"opq": a.opq, **({"pq_m": a.pq_m} if a.pq_m else {})}})
    if not (work / "gallery.npz").exists() or a.regenerate:
        print(json.dumps(_sub("_gen", str(work), str(n), str(a.dim), str(a.cells_per_100k), str(a.queries))), flush=True)
    tags = []
    for kind in a.kinds:
        print(json.dumps(_sub("_build", str(work), kind, opts)), flush=True)
        for mm in (False, True):
            print(json.dumps(_sub("_query", str(work), kind, str(int(mm)), str(int(a.pq_decoded)))), flush=True)
            tags.append(f"{kind}{'-mmap' if mm else ''}")
    ref_tag = "flat" if "flat" in a.kinds else "exact"
    if ref_tag == "exact":
        print(json.dumps(_sub("_exact", str(work), a.kinds[0])), flush=True)
    if a.pq_decoded:
        tags.append("ivfpq-decoded")
    print(json.dumps({"step": "agreement", "n": n, "reference": ref_tag, **_agreement(work, ref_tag, tags)}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a step, in its own process
        step, args = sys.argv[1], sys.argv[2:]
        w = Path(args[0])
        res = {"_gen": lambda: generate(w, int(args[1]), int(args[2]), int(args[3]), int(args[4])),
               "_build": lambda: build(w, args[1], json.loads(args[2])),
               "_query": lambda: query(w, args[1], args[2] == "1", args[3] == "1"),
               "_exact": lambda: exact(w, args[1])}[step]()
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivfpq"], choices=["flat", "ivfpq", "hnsw", "ivf"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--cells-per-100k", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--opq", action="store_true", help="ivfpq with an OPQ rotation")
    ap.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers (default dim/8)")
    ap.add_argument("--pq-decoded", action="store_true", help="also refine from vectors decoded from the PQ codes")
    ap.add_argument("--work", default="/tmp/pigeon-index-scale", help="where the shards and indexes go (~1.1 GiB per 1M at 512-d, more for flat)")
    ap.add_argument("--regenerate", action="store_true")
    a = ap.parse_args()
    for n in a.sizes:
        run_size(n, a)


if __name__ == "__main__":
    main()
