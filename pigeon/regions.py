"""Credible regions: the fewest cells, by probability, that hold 50% / 90% of an answer's mass, as land
polygons with their area. A circle around the answer point says how far; a region says where: two
likely countries far apart give two patches, not one huge disk over the sea between them.

- **Sets** (`credible_sets`): each answer's cells sorted by probability, cumulated, cut where the
  mass first reaches the level. Vectorised over the batch (one sort + cumsum); the mass the set
  actually holds is reported (it overshoots the level by at most its last cell).
- **Polygons** (`CellRegions`): the union of the set's cells (`GeoCells.geoms`: the land of each cell,
  the sea is in no cell); its area is the sum of its cells' exact areas (`pigeon.geocells.reach.area_km2`,
  equal-area; cells do not overlap), the polygon given out is the union of the cells' outlines simplified
  once as a coverage to `SIMPLIFY_DEG` and snapped to a `GRID_DEG` grid (valid, coordinates rounded),
  with counter-clockwise outer rings and clockwise holes (RFC 7946).
  Unions are cached per set of cells: the same set (the page's download re-asks the same photo) is
  built once.
- **The answer point** need not lie in a region: refinement may move it into another cell, onto a
  gallery photo taken at sea or beyond the cells' reach, and a cell's centre (the spherical mean of
  its photos) can fall outside a concave cell. Each region says so in `contains_answer` rather than
  being stretched to hold the point.
- **Antimeridian**: cells that cross it are stored as parts on either side of ±180° (`pigeon.geocells`
  folds them back onto the map), so unions, areas and the GeoJSON written from them stay within
  [-180, 180] and need no special case (RFC 7946 §3.1.9 asks for exactly that split).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import shapely

from pigeon.core.sphere import wrap_lon
from pigeon.geocells.geometry import polygonal
from pigeon.geocells.reach import area_km2

REGION_LEVELS: tuple[float, ...] = (0.5, 0.9)
SIMPLIFY_DEG = 0.05    # polygons given out: each cell's outline simplified once, as a coverage (Visvalingam-Whyatt,
                       # this tolerance), a few km off the exact land at most: an outline for a map, not a survey
GRID_DEG = 1e-4        # and snapped to this grid (~11 m), so their coordinates print rounded
POINT_DECIMALS = 6     # the answer point: ~0.1 m
CACHE_SETS = 64        # unions kept (each a few MB at most for a continent-wide set)
_EPS = 1e-6            # float32 probabilities: a mass within this of the level reaches it


def level_key(level: float) -> str:
    """The key a level goes by in an answer's `regions`: 0.5 -> "50"."""
    return f"{100 * level:g}"


def credible_sets(probs: np.ndarray, levels: Sequence[float] = REGION_LEVELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (n, C) cell probabilities: the cells of each row by decreasing probability (n, C), how many of
    them each level's set takes (n, L) and the mass those hold (n, L). The set is the fewest cells whose
    summed probability reaches the level (all cells when the row holds less; ties: lower cell id first)."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, 1), axis=1)
    lv = np.asarray(levels, dtype=np.float64)
    counts = np.minimum((cum[:, :, None] < lv[None, None, :] - _EPS).sum(axis=1) + 1, p.shape[1])
    mass = np.take_along_axis(cum, counts - 1, 1)
    return order, counts, mass


def geojson_geometry(geom: Any, snapped: bool = False) -> dict[str, Any] | None:
    """A polygonal geometry as RFC 7946 GeoJSON: snapped to `GRID_DEG` (valid, rounded coordinates; `snapped`:
    it already is), outer rings counter-clockwise, holes clockwise; None when nothing is left."""
    g = polygonal(geom if snapped else shapely.set_precision(geom, GRID_DEG))
    if g.is_empty:
        return None
    g = shapely.orient_polygons(g)
    decimals = int(round(-np.log10(GRID_DEG)))
    g = shapely.set_coordinates(g, np.round(shapely.get_coordinates(g), decimals))
    return json.loads(shapely.to_geojson(g))


class CellRegions:
    """The cells' land as regions: a set of cells' union (cached), its area, its output polygon; each
    cell's own outline. One per Predictor; safe to share between threads.

    Cost: on first use, every cell's area (equal-area, exact) and its outline simplified once as a
    coverage (`shapely.coverage_simplify`: neighbours keep their shared edges), so a region is the
    cheap coverage union of a few light polygons and its area the sum of its cells' (the cells tile
    the land without overlap): ~5 ms for 10 country-sized cells, against ~75 ms for the exact union
    (and as much again to simplify it). `contains_answer` is tested on the exact cells."""

    def __init__(self, geoms: np.ndarray, levels: Sequence[float] = REGION_LEVELS):
        self.geoms = np.asarray(geoms, dtype=object)
        self.levels = tuple(levels)
        self._sets: OrderedDict[bytes, tuple[Any, float, dict[str, Any] | None]] = OrderedDict()
        self._cells: dict[int, dict[str, Any] | None] = {}
        self._lock = threading.Lock()
        self._prepared: tuple[np.ndarray, np.ndarray, bool] | None = None

    def _prepare(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(outlines simplified to SIMPLIFY_DEG, each cell's exact area in km², whether the outlines form a
        valid coverage), computed once."""
        with self._lock:
            if self._prepared is None:
                g = self.geoms
                try:
                    coverage = bool(len(g)) and bool(shapely.coverage_is_valid(g))
                except Exception:   # GEOS without coverage validation, or a geometry it cannot check
                    coverage = False
                simple = shapely.coverage_simplify(g, SIMPLIFY_DEG) if coverage else shapely.simplify(g, SIMPLIFY_DEG, preserve_topology=True)
                simple = shapely.set_precision(simple, GRID_DEG)   # snapped once: shared edges snap alike, the coverage stays valid
                coverage = coverage and bool(shapely.coverage_is_valid(simple))
                self._prepared = (np.asarray(simple, dtype=object), np.asarray(area_km2(g), dtype=np.float64), coverage)
            return self._prepared

    def union(self, cell_ids: np.ndarray, clip: Any = None, clip_key: str = "") -> tuple[Any, float, dict[str, Any] | None]:
        """(union of the cells' simplified outlines, its area in km², its output GeoJSON geometry) of a set of
        cells; with `clip` (an area of interest's polygon, cached under `clip_key`), only their land inside it.
        The area is the sum of the cells' exact areas (cells do not overlap); clipped, it is measured on the
        clipped outline."""
        ids = np.sort(np.asarray(cell_ids, dtype=np.int64))
        key = ids.tobytes() + clip_key.encode()
        with self._lock:
            hit = self._sets.get(key)
            if hit is not None:
                self._sets.move_to_end(key)
                return hit
        simple, areas, coverage = self._prepare()
        merged = polygonal(shapely.coverage_union_all(simple[ids]) if coverage else shapely.union_all(simple[ids]))
        km2 = float(areas[ids].sum())
        if clip is not None:
            merged = polygonal(shapely.intersection(merged, clip))
            km2 = float(area_km2(np.array([merged], dtype=object))[0]) if not merged.is_empty else 0.0
        out = (merged, km2, geojson_geometry(merged, snapped=clip is None))
        with self._lock:
            self._sets[key] = out
            while len(self._sets) > CACHE_SETS:
                self._sets.popitem(last=False)
        return out

    def holds(self, cell_ids: np.ndarray, lon: float, lat: float, clip: Any = None) -> bool:
        """Whether the point lies on the exact land of these cells (and in `clip` when given)."""
        pt = shapely.Point(lon, lat)
        on = bool(shapely.dwithin(self.geoms[np.asarray(cell_ids, dtype=np.int64)], pt, _EPS).any())
        return on and (clip is None or bool(shapely.dwithin(clip, pt, _EPS)))

    def cell_geometry(self, cell_id: int) -> dict[str, Any] | None:
        """One cell's output GeoJSON geometry (simplified and snapped as the regions are)."""
        c = int(cell_id)
        if c not in self._cells:
            self._cells[c] = geojson_geometry(self._prepare()[0][c], snapped=True)
        return self._cells[c]

    def answer_regions(self, probs: np.ndarray, lat: np.ndarray, lon: np.ndarray, area: Any = None) -> list[dict[str, dict[str, Any]]]:
        """Each answer's regions, {"50": {...}, "90": {...}}: level, probability (the mass the set holds),
        n_cells, cell_ids (by decreasing probability), area_km2, contains_answer (the answer point lies
        in the set's land) and geometry (GeoJSON). From the answer's own probabilities, so whatever
        shaped them (an area of interest) shapes the regions too; with `area` (a `pigeon.area.Area`) the
        land is also cut to the area, so a cell that straddles its border gives only its part inside."""
        clip, clip_key = (area.geometry, "|" + area.key) if area is not None else (None, "")
        order, counts, mass = credible_sets(probs, self.levels)
        lon = wrap_lon(np.asarray(lon, np.float64))
        out = []
        for i in range(len(order)):  # formatting only: two unions per answer, cached by set
            regs = {}
            for j, level in enumerate(self.levels):
                ids = order[i, : counts[i, j]]
                _, km2, geometry = self.union(ids, clip, clip_key)
                regs[level_key(level)] = {
                    "level": level, "probability": float(mass[i, j]), "n_cells": int(counts[i, j]),
                    "cell_ids": ids.tolist(), "area_km2": km2,
                    "contains_answer": self.holds(ids, float(lon[i]), float(lat[i]), clip), "geometry": geometry,
                }
            out.append(regs)
        return out


__all__ = ["REGION_LEVELS", "SIMPLIFY_DEG", "GRID_DEG", "POINT_DECIMALS", "CellRegions", "credible_sets", "geojson_geometry", "level_key"]
