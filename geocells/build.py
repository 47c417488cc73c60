"""Build geocells (PIGEON): admin polygons with points -> merge small -> split large (OPTICS + Voronoi).

Guarantees, each checked by the tests: every point lands in exactly one cell; the cells tile the
boundaries' land within `max_reach_km` of a point (empty polygons join a neighbour, Voronoi pieces are
clipped to their parent, so no gap and no overlap appears; land beyond the reach is in no cell); every cell holds between min_size and max_size points, except where no
split can exist (one location holding more than max_size photos, or fewer than min_size points in
all). Distances are on the sphere (unit vectors); the antimeridian needs no special case. Each cell
is labelled by the (country, admin-1) place holding most of its points, and records every place's
share of them (its composition).
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree
from shapely import STRtree

from . import bundled
from .boundaries import load_boundaries
from .cells import COMPOSITION, PLACE_KEYS, GeoCells, encode_composition
from pigeon.core.errors import UserError
from pigeon.core.progress import progress as progress_bar
from .geometry import adjacency, assign_points, from_local, local_points, nearest_polygon, polygonal, to_local
from .optics import optics_xi_labels
from .reach import DEFAULT_MAX_REACH_KM, clip_to_reach
from pigeon.core.sphere import from_xyz, to_xyz, wrap_lon

log = logging.getLogger(__name__)

# PIGEON (30/60 images per cell) and PIGEOTTO (1000/2000) OPTICS rounds of (min_samples, xi).
PIGEON_ROUNDS = [(8, 0.05), (10, 0.025), (15, 0.015)]
PIGEOTTO_ROUNDS = [(300, 0.05), (400, 0.005), (1000, 0.0001)]


def default_optics_rounds(min_size: int) -> list[tuple[int, float]]:
    """The paper's rounds, scaled with min_size: exactly PIGEON's at 30 and PIGEOTTO's at 1000."""
    base, ref = (PIGEON_ROUNDS, 30) if min_size < 300 else (PIGEOTTO_ROUNDS, 1000)
    return [(max(2, int(round(ms * min_size / ref))), xi) for ms, xi in base]


@dataclass
class BuildStats:
    points: int = 0
    at_sea: int = 0
    unique_locations: int = 0
    admin_polygons: int = 0
    polygons_with_points: int = 0
    merges: int = 0
    split_units: int = 0
    optics_splits: int = 0
    fallback_splits: int = 0
    reach_cut_cells: int = 0       # cells that lost land beyond max_reach_km
    reach_cut_km2: float = 0.0     # the land they lost
    unsplittable: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def build_cells(
    lat: Sequence[float] | np.ndarray,
    lon: Sequence[float] | np.ndarray,
    boundaries=None,
    min_size: int = 30,
    max_size: int = 60,
    optics_rounds: Sequence[tuple[int, float]] | None = None,
    seed: int = 0,
    progress: bool = True,
    max_reach_km: float | None = DEFAULT_MAX_REACH_KM,
) -> GeoCells:
    """Geocells for training points. `boundaries`: a normalised GeoDataFrame (see `load_boundaries`) or None for the bundled admin-1.
    `max_reach_km`: land farther than this from every point belongs to no cell (`pigeon.geocells.reach`); None: no limit.

    Returns a `GeoCells` whose `labels_` gives each input point's cell and `stats_` what happened.
    """
    t_all = time.perf_counter()
    lat, lon = _checked_points(lat, lon, min_size, max_size)
    rounds = list(optics_rounds) if optics_rounds is not None else default_optics_rounds(min_size)
    b = load_boundaries("bundled") if boundaries is None else boundaries
    if len(b) == 0:
        raise UserError("boundaries hold no polygons")
    st = BuildStats(points=len(lat), admin_polygons=len(b))
    geoms = np.asarray(b.geometry.values, dtype=object)
    tree = STRtree(geoms)

    with _timed(st, "assign"):  # 1. points -> admin polygon (sea points: nearest polygon, snapped onto it)
        pidx, slat, slon, sea = assign_points(lat, lon, geoms, tree, snap=True)
        st.at_sea = int(sea.sum())
    with _timed(st, "adjacency"):  # 2. adjacency; empty polygons join a neighbour (same country first) so cells tile the land
        loc = _Locations.of(slat, slon, pidx)
        st.unique_locations = len(loc.key)
        pw = np.bincount(pidx, minlength=len(b))
        st.polygons_with_points = int((pw > 0).sum())
        ai, aj = adjacency(geoms, tree)
        owner = _fill_empty(b, geoms, pw, ai, aj)
    with _timed(st, "merge"):  # 3. merge small units into neighbours: same admin-1, then same country, then any
        unit_of_poly, st.merges = _merge_small(b, pw, owner, ai, aj, loc.poly, loc.xyz, loc.w, min_size)
    with _timed(st, "dissolve"):  # 4. unit geometry
        units = np.unique(unit_of_poly)
        unit_geom = _dissolve(geoms, unit_of_poly, units)
    with _timed(st, "split"):  # 5. split oversized units (OPTICS + Voronoi)
        ucell, cell_geoms = _split_units(loc, unit_of_poly[loc.poly], units, unit_geom, min_size, max_size, rounds, seed, st, progress)
    with _timed(st, "reach"):  # 6. land beyond max_reach_km of every point leaves its cell
        cell_geoms, cut = clip_to_reach(np.asarray(cell_geoms, dtype=object), loc.xyz, max_reach_km)
        st.reach_cut_cells, st.reach_cut_km2 = int((cut > 0).sum()), float(cut.sum())
    with _timed(st, "assemble"):  # 7. cells with their labels and composition, ids in a stable order
        reach = {"reach_km": np.full(len(cut), np.inf if max_reach_km is None else float(max_reach_km)), "reach_cut_km2": cut}
        cells = _assemble(b, cell_geoms, ucell[loc.inv], pidx, lat, lon, reach)
    st.seconds["total"] = time.perf_counter() - t_all
    cells.stats_ = st
    return cells


@contextmanager
def _timed(st: BuildStats, name: str) -> Iterator[None]:
    """Record the seconds a build step takes in `st.seconds[name]` (the CLI's and the benchmark's stage times)."""
    t = time.perf_counter()
    yield
    st.seconds[name] = time.perf_counter() - t


def _checked_points(lat, lon, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 arrays, longitudes wrapped to [-180, 180); UserError for inputs no cells can come from."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = wrap_lon(lon)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise UserError("lat and lon must be 1-D arrays of the same length")
    if len(lat) == 0:
        raise UserError("no points to build cells from; give at least one point")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all() and (np.abs(lat) <= 90).all()):
        raise UserError("points must have finite latitudes in [-90, 90]; load them with pigeon.geocells.load_points to skip bad rows")
    if min_size < 1 or max_size < 2 * min_size:
        raise UserError(f"cell sizes min={min_size}, max={max_size}: need min >= 1 and max >= 2*min so that any oversized cell can be split into two legal ones")
    return lat, lon


@dataclass
class _Locations:
    """Distinct (snapped) locations with integer weights: duplicates cost nothing in the steps below."""

    key: np.ndarray   # (L, 2) lat, lon
    inv: np.ndarray   # (n,) location of each point
    w: np.ndarray     # (L,) points per location
    poly: np.ndarray  # (L,) admin polygon of each location
    xyz: np.ndarray   # (L, 3) unit vectors

    @classmethod
    def of(cls, slat: np.ndarray, slon: np.ndarray, pidx: np.ndarray) -> "_Locations":
        key, inv, w = np.unique(np.column_stack([slat, slon]), axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        poly = np.empty(len(key), dtype=np.int64)
        poly[inv] = pidx
        return cls(key, inv, w, poly, to_xyz(key[:, 0], key[:, 1]))


def _split_units(loc: _Locations, uunit: np.ndarray, units: np.ndarray, unit_geom: list, min_size: int, max_size: int,
                 rounds: list, seed: int, st: BuildStats, progress: bool) -> tuple[np.ndarray, list]:
    """Cell of each location, and the cells' polygons: units within max_size are cells as they are,
    bigger ones are split (in threads: numba's OPTICS and shapely release the GIL; results keep their order)."""
    cell_geoms: list = []
    ucell = np.full(len(loc.key), -1, dtype=np.int64)
    order = np.argsort(uunit, kind="stable")
    bounds = np.r_[np.searchsorted(uunit[order], units, side="left"), len(order)]
    heavy = np.add.reduceat(loc.w[order], bounds[:-1]) > max_size if len(order) else np.zeros(0, bool)
    for k in np.flatnonzero(~heavy):
        ucell[order[bounds[k]:bounds[k + 1]]] = len(cell_geoms)
        cell_geoms.append(unit_geom[k])
    big = np.flatnonzero(heavy).tolist()
    st.split_units = len(big)
    seeds = np.random.default_rng(seed).integers(1 << 31, size=len(big))

    def split_one(job: tuple[int, int]):
        k, s = job
        members = order[bounds[k]:bounds[k + 1]]
        labels, info = _split_unit(loc.xyz[members], loc.w[members], min_size, max_size, rounds, np.random.default_rng(s))
        return members, labels, info, _voronoi_pieces(loc.key[members], labels, unit_geom[k])

    workers = max(1, min(len(big), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(split_one, zip(big, seeds.tolist()))
        for members, labels, info, pieces in progress_bar(results, total=len(big), desc="splitting cells", unit="cell", disable=not progress or not big):
            st.optics_splits += info["optics"]
            st.fallback_splits += info["fallback"]
            st.unsplittable.extend(info["unsplittable"])
            for g in range(labels.max() + 1):
                ucell[members[labels == g]] = len(cell_geoms)
                cell_geoms.append(pieces[g])
    return ucell, cell_geoms


# ---------------------------------------------------------------------------------------------
def _fill_empty(b, geoms, pw, ai, aj) -> np.ndarray:
    """owner[p] = a polygon with points that empty polygon p joins (itself if it has points)."""
    n = len(b)
    owner = np.where(pw > 0, np.arange(n), -1)
    if (owner >= 0).all():
        return owner
    a3 = b["adm0_a3"].to_numpy()
    src = np.r_[ai, aj]
    dst = np.r_[aj, ai]
    while True:
        todo = (owner[src] < 0) & (owner[dst] >= 0)
        if not todo.any():
            break
        s, d = src[todo], dst[todo]
        other = (a3[s] != a3[d]).astype(np.int8)  # same country first
        o = np.lexsort((d, other, s))
        s, d = s[o], d[o]
        first = np.r_[True, s[1:] != s[:-1]]
        owner[s[first]] = owner[d[first]]
    left = np.flatnonzero(owner < 0)
    if len(left):
        have = np.flatnonzero(owner >= 0)
        rp = shapely.point_on_surface(geoms[left])
        xy = shapely.get_coordinates(rp)
        j, _, _ = nearest_polygon(xy[:, 1], xy[:, 0], geoms[have])
        owner[left] = owner[have[j]]
    return owner


@dataclass
class _UnitGraph:
    """Merge state: union-find over polygons, and per live unit (a root) its point weight, summed unit
    vectors (its centre), touching units, and the country and admin-1 of its heaviest part."""

    parent: np.ndarray
    weight: dict[int, int]
    vsum: dict[int, np.ndarray]
    nbr: dict[int, set[int]]
    country: dict[int, str]
    admin1: dict[int, tuple[str, str]]

    @classmethod
    def of(cls, b, pw, owner, ai, aj, upoly, uxyz, w) -> "_UnitGraph":
        """One unit per polygon with points; empty polygons' contacts count as their owner's contacts."""
        n = len(b)
        a3 = b["adm0_a3"].to_numpy()
        a1 = b["admin1"].to_numpy()
        roots = np.flatnonzero(owner == np.arange(n))
        vec = np.zeros((n, 3))
        np.add.at(vec, upoly, uxyz * w[:, None])
        oi, oj = owner[ai], owner[aj]
        keep = oi != oj
        nbr: dict[int, set[int]] = {int(r): set() for r in roots}
        for x, y in zip(oi[keep].tolist(), oj[keep].tolist()):
            nbr[x].add(y)
            nbr[y].add(x)
        return cls(np.arange(n), {int(r): int(pw[r]) for r in roots}, {int(r): vec[r].copy() for r in roots}, nbr,
                   {int(r): a3[r] for r in roots}, {int(r): (a3[r], a1[r]) for r in roots})

    def find(self, x: int) -> int:
        """Root of x, with path compression."""
        parent = self.parent
        r = x
        while parent[r] != r:
            r = parent[r]
        while parent[x] != r:
            parent[x], x = r, parent[x]
        return r

    def centre(self, u: int) -> np.ndarray:
        return _unit(self.vsum[u][None])[0]

    def absorb(self, u: int, v: int) -> None:
        """Merge unit u into unit v (v keeps the labels of the heavier of the two)."""
        self.parent[u] = v
        if self.weight[u] > self.weight[v]:
            self.country[v], self.admin1[v] = self.country[u], self.admin1[u]
        self.weight[v] += self.weight.pop(u)
        self.vsum[v] = self.vsum[v] + self.vsum.pop(u)
        nbr = self.nbr
        for x in nbr.pop(u):
            if x != v and x in nbr:
                nbr[x].discard(u)
                nbr[x].add(v)
                nbr[v].add(x)
        nbr[v].discard(u)


def _merge_small(b, pw, owner, ai, aj, upoly, uxyz, w, min_size) -> tuple[np.ndarray, int]:
    """Union small units into a neighbour until all hold >= min_size points (or one unit is left).

    Returns the unit (root polygon) of every polygon and the number of merges."""
    g = _UnitGraph.of(b, pw, owner, ai, aj, upoly, uxyz, w)
    heap = [(g.weight[r], r) for r in g.weight if g.weight[r] < min_size]
    heapq.heapify(heap)
    merges = 0
    kd_roots = np.array(sorted(g.weight), dtype=np.int64)
    kd = cKDTree(_unit(np.array([g.vsum[r] for r in kd_roots]))) if len(kd_roots) else None
    while heap and len(g.weight) > 1:
        wu, u = heapq.heappop(heap)
        if u not in g.weight or g.weight[u] != wu or wu >= min_size:
            continue
        cand = [v for v in g.nbr[u] if v in g.weight] or _nearest_units(g, u, kd, kd_roots)
        if not cand:
            break
        v = _merge_target(g, u, cand)
        g.absorb(u, v)
        merges += 1
        if g.weight[v] < min_size:
            heapq.heappush(heap, (g.weight[v], v))
    unit_of_poly = np.array([g.find(int(owner[p])) for p in range(len(b))], dtype=np.int64)
    return unit_of_poly, merges


def _nearest_units(g: _UnitGraph, u: int, kd: cKDTree, kd_roots: np.ndarray) -> list[int]:
    """For an island (no touching unit): the live units nearest to its centre, found through the
    KD-tree of the initial units and resolved to their current roots (widening the search until one is found)."""
    cu = g.centre(u)
    k = min(len(kd_roots), 16)
    while True:
        _, ii = kd.query(cu, k=k)
        cand = sorted({g.find(int(kd_roots[i])) for i in np.atleast_1d(ii)} - {u})
        if cand or k >= len(kd_roots):
            return cand
        k = min(len(kd_roots), k * 4)


def _merge_target(g: _UnitGraph, u: int, cand: list[int]) -> int:
    """The unit u merges into: same admin-1, else same country, else any; the nearest centre within the best group.
    Islands take the same country only when it is not much farther (1.5x) than the nearest unit of any country."""
    cu = g.centre(u)
    cv = _unit(np.array([g.vsum[v] for v in cand]))
    dist = np.linalg.norm(cv - cu, axis=1)
    pref = np.array([0 if g.admin1[v] == g.admin1[u] else 1 if g.country[v] == g.country[u] else 2 for v in cand])
    if not g.nbr[u]:
        pref = np.where((pref < 2) & (dist <= 1.5 * dist.min() + 1e-12), pref, 2)
    return cand[int(np.lexsort((dist, pref))[0])]


def _unit(v: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(nrm > 0, nrm, 1.0)


def _dissolve(geoms, unit_of_poly, units) -> list:
    """Union of the member polygons of each unit."""
    order = np.argsort(unit_of_poly, kind="stable")
    starts = np.searchsorted(unit_of_poly[order], units)
    ends = np.r_[starts[1:], len(order)]
    out = []
    for s, e in zip(starts, ends):
        members = geoms[order[s:e]]
        g = members[0] if len(members) == 1 else shapely.union_all(members)
        out.append(polygonal(g))
    return out


def _split_unit(xyz, w, min_size, max_size, rounds, rng):
    """Labels 0..k-1 for the unique locations of one oversized unit: OPTICS rounds, then bisection."""
    n = len(xyz)
    labels = np.full(n, -1, dtype=np.int64)
    info = {"optics": 0, "fallback": 0, "unsplittable": []}
    stack = [(np.arange(n), 0)]
    nxt = 0
    while stack:
        idx, r0 = stack.pop()
        W = int(w[idx].sum())
        if W <= max_size:
            labels[idx] = nxt
            nxt += 1
            continue
        parts, r_used = None, len(rounds)
        for r in range(r0, len(rounds)):
            ms, xi = rounds[r]
            if len(idx) <= 2:
                break
            lab = optics_xi_labels(xyz[idx], w[idx], ms, xi, seed=int(rng.integers(1 << 31)))
            parts = _groups_from_labels(xyz[idx], w[idx], lab, min_size)
            if parts is not None:
                r_used = r + 1
                info["optics"] += 1
                break
        if parts is None:
            parts = _bisect(xyz[idx], w[idx], min_size)
            if parts is None:
                labels[idx] = nxt
                nxt += 1
                c = from_xyz(xyz[idx].mean(axis=0)[None])
                info["unsplittable"].append({"points": W, "lat": float(c[0][0]), "lon": float(c[1][0])})
                continue
            info["fallback"] += 1
        for p in parts:
            stack.append((idx[p], r_used))
    return labels, info


def _groups_from_labels(xyz, w, lab, min_size):
    """Big OPTICS clusters become groups; the rest joins the nearest big cluster (or, with one big cluster, forms the second group)."""
    ids = np.unique(lab[lab >= 0])
    if len(ids) == 0:
        return None
    cw = np.array([w[lab == c].sum() for c in ids])
    big = ids[cw >= min_size]
    if len(big) == 0:
        return None
    in_big = np.isin(lab, big)
    rest = np.flatnonzero(~in_big)
    if len(big) == 1:
        if w[rest].sum() >= min_size:
            return [np.flatnonzero(in_big), rest]
        return None
    group = np.where(in_big, lab, -1)
    if len(rest):
        bi = np.flatnonzero(in_big)
        _, nn = cKDTree(xyz[bi]).query(xyz[rest], k=1)
        group[rest] = lab[bi[nn]]
    return [np.flatnonzero(group == c) for c in big]


def _bisect(xyz, w, min_size):
    """Two groups, both >= min_size: a weighted-median cut along the principal axis of the points, else
    along the other axes, else by distance from the heaviest location (a ball around it vs the rest).
    None only when no legal split exists (one location holds more than W - min_size points)."""
    W = w.sum()
    mean = (xyz * w[:, None]).sum(0) / W
    c = xyz - mean
    cov = (c * w[:, None]).T @ c
    axes = np.linalg.eigh(cov)[1][:, ::-1].T
    keys = [c @ a for a in axes] + [np.linalg.norm(xyz - xyz[np.argmax(w)], axis=1)]
    for proj in keys:
        o = np.argsort(proj, kind="stable")
        cum = np.cumsum(w[o])
        # cut between distinct projections only, both sides legal, closest to the middle
        legal = (cum >= min_size) & (W - cum >= min_size)
        legal[:-1] &= proj[o][1:] > proj[o][:-1]
        legal[-1] = False
        if legal.any():
            cand = np.flatnonzero(legal)
            cut = cand[np.argmin(np.abs(cum[cand] - W / 2))]
            return [o[: cut + 1], o[cut + 1:]]
    return None


def _voronoi_pieces(latlon: np.ndarray, labels: np.ndarray, unit_geom) -> list:
    """The unit's polygon cut by the Voronoi tessellation of its locations, one piece per label."""
    k = int(labels.max()) + 1
    lat, lon = latlon[:, 0], latlon[:, 1]
    lat0, lon0 = from_xyz(to_xyz(lat, lon).mean(axis=0)[None])
    lat0, lon0 = float(lat0[0]), float(lon0[0])
    parts = shapely.get_parts(unit_geom)
    pb = shapely.bounds(parts)
    wrap = bool(((pb[:, 2] - pb[:, 0]) <= 180.0).all())
    g_local = to_local(unit_geom, lon0, lat0, wrap)
    xy = local_points(lat, lon, lon0, lat0, wrap)
    env = shapely.envelope(shapely.union_all([g_local, shapely.multipoints(xy)])).buffer(1.0)
    regions = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(xy), extend_to=env, ordered=True))
    groups = np.empty(k, dtype=object)
    for g in range(k):
        r = regions[labels == g]
        groups[g] = r[0] if len(r) == 1 else shapely.coverage_union_all(r)
    pieces_local = shapely.intersection(groups, g_local)
    out = [polygonal(from_local(p, lon0, lat0)) for p in pieces_local]
    return out


def _assemble(b, cell_geoms, labels, pidx, lat, lon, reach: dict[str, np.ndarray]) -> GeoCells:
    """The cells' table: centre (spherical mean of the points), count, labels and composition, then ids in a stable order."""
    ncell = len(cell_geoms)
    vs = np.zeros((ncell, 3))
    np.add.at(vs, labels, to_xyz(lat, lon))
    clat, clon = from_xyz(vs)
    count = np.bincount(labels, minlength=ncell)
    place = _label_cells(b, labels, pidx, count)
    drive = bundled.driving_side().set_index("adm0_a3")["driving_side"]
    gdf = gpd.GeoDataFrame(
        {
            "lat": clat,
            "lon": clon,
            "count": count.astype(np.int64),
            **{c: place[c].to_numpy() for c in ["iso_a2", "adm0_a3", "country", "admin1", "admin1_all"]},
            "driving_side": drive.reindex(place["adm0_a3"]).fillna("unknown").to_numpy(),
            "hemisphere": np.where(clat >= 0, "north", "south"),
            COMPOSITION: place[COMPOSITION].to_numpy(),
            **reach,
            "old": np.arange(ncell),
        },
        geometry=np.asarray(cell_geoms, dtype=object),
        crs="EPSG:4326",
    )
    gdf, remap = _order_and_name(gdf)
    cells = GeoCells.from_frame(gdf)
    cells.labels_ = remap[labels]
    return cells


def _label_cells(b, labels: np.ndarray, pidx: np.ndarray, count: np.ndarray) -> pd.DataFrame:
    """Each cell's label and composition, from the admin polygon each of its points fell in.

    A place is a whole (adm0_a3, iso_a2, country, admin1) row of the boundaries, so a cell's country
    codes, country name and admin-1 always come from one place and agree with each other. The label is
    the country holding most of the cell's points, then that country's admin-1 holding most of them
    (ties: the first in sorted order), so a cell whose points lie mostly in Andorra is Andorra even when
    one Spanish province holds more of them than any one Andorran parish; the composition lists every
    place's share of the points, largest first. Vectorised: np.unique over (cell, place) codes.
    """
    ncell = len(count)
    keys = b[PLACE_KEYS].fillna("").astype(str)
    place_of_poly = keys.groupby(PLACE_KEYS, sort=True).ngroup().to_numpy()
    places = keys.groupby(PLACE_KEYS, sort=True).size().index.to_frame(index=False)
    code, n = np.unique(labels.astype(np.int64) * len(places) + place_of_poly[pidx], return_counts=True)
    cell, place = code // len(places), code % len(places)
    country = places.groupby([k for k in PLACE_KEYS if k != "admin1"], sort=True).ngroup().to_numpy()[place]
    cc, cc_inv = np.unique(cell * (country.max() + 1) + country, return_inverse=True)
    in_country = np.bincount(cc_inv, weights=n)[cc_inv]  # the cell's points in this place's country
    o = np.lexsort((place, -n, -in_country, cell))  # per cell: biggest country, then its biggest admin-1
    lc, lp = cell[o], place[o]
    first = np.r_[True, lc[1:] != lc[:-1]]
    out = pd.DataFrame({k: np.full(ncell, "", dtype=object) for k in PLACE_KEYS})
    out.loc[lc[first], PLACE_KEYS] = places.iloc[lp[first]].to_numpy()
    o = np.lexsort((place, -n, cell))  # the composition: largest share first
    cell, place, n = cell[o], place[o], n[o]
    out[COMPOSITION] = encode_composition(cell, place, places, n / count[cell], ncell)
    names = pd.DataFrame({"cell": cell, "admin1": places["admin1"].to_numpy()[place]}).drop_duplicates()
    out["admin1_all"] = names.groupby("cell")["admin1"].agg("; ".join).reindex(np.arange(ncell)).fillna("").to_numpy()
    return out


def _order_and_name(gdf) -> tuple[Any, np.ndarray]:
    """Sort cells by country, admin-1 and position (north to south, west to east), number them 0..n-1 and
    name them ISO-admin1-k after their label; returns the frame and the old -> new id map."""
    ncell = len(gdf)
    gdf = gdf.sort_values(["adm0_a3", "admin1", "lat", "lon"], ascending=[True, True, False, True], kind="stable").reset_index(drop=True)
    remap = np.empty(ncell, dtype=np.int64)
    remap[gdf["old"].to_numpy()] = np.arange(ncell)
    gdf = gdf.drop(columns="old")
    gdf.insert(0, "cell_id", np.arange(ncell, dtype=np.int64))
    seq = gdf.groupby(["iso_a2", "admin1"]).cumcount().to_numpy()
    gdf.insert(1, "name", [f"{i or a}-{r}-{k}" for i, a, r, k in zip(gdf["iso_a2"], gdf["adm0_a3"], gdf["admin1"], seq)])
    return gdf, remap
