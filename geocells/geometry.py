"""Vectorised geometry helpers: nearest polygon on the sphere, adjacency, local planar frames."""

from __future__ import annotations

import numpy as np
import shapely
from shapely import STRtree

from scipy.spatial import cKDTree

from pigeon.core.sphere import chord_to_km, to_xyz, wrap_lon


def assign_points(lat: np.ndarray, lon: np.ndarray, geoms: np.ndarray, tree: STRtree | None = None, nearest: "NearestIndex | None" = None, snap: bool = False):
    """Index of the polygon holding each point; points in none (at sea) get the nearest polygon.

    Returns (index, snap_lat, snap_lon, at_sea): snapped coordinates are the nearest point on the
    chosen polygon for points at sea, the point itself otherwise.
    """
    tree = tree or STRtree(geoms)
    n = len(lat)
    pts = shapely.points(lon, lat)
    idx = np.full(n, -1, dtype=np.int64)
    if n:
        src, dst = tree.query(pts, predicate="intersects")
        # first hit per point, lowest polygon index (points on a shared border)
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        first = np.r_[True, src[1:] != src[:-1]] if len(src) else np.zeros(0, bool)
        idx[src[first]] = dst[first]
    sea = np.flatnonzero(idx < 0)
    snap_lat, snap_lon = np.asarray(lat, np.float64).copy(), np.asarray(lon, np.float64).copy()
    if len(sea):
        j, slat, slon = nearest_polygon(lat[sea], lon[sea], geoms, nearest, exact=snap)
        idx[sea], snap_lat[sea], snap_lon[sea] = j, slat, slon
    return idx, snap_lat, snap_lon, idx_at_sea(n, sea)


def idx_at_sea(n: int, sea: np.ndarray) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[sea] = True
    return m


class NearestIndex:
    """Nearest polygon on the sphere: a KD-tree over the polygons' boundary vertices as unit vectors.

    Boundaries are densified to at most `step` degrees between vertices first, so the nearest vertex
    is within step/2 (about 3 km at 0.05°) of the nearest boundary point. Works across the
    antimeridian and near the poles with no special case, and costs one KD-tree query per point.
    """

    def __init__(self, geoms: np.ndarray, step: float = 0.05):
        b = shapely.segmentize(shapely.boundary(np.asarray(geoms, dtype=object)), step)
        xy, owner = shapely.get_coordinates(b, return_index=True)
        self.lonlat = xy
        self.owner = owner.astype(np.int64)
        self.kd = cKDTree(to_xyz(xy[:, 1], xy[:, 0]))

    def query(self, lat: np.ndarray, lon: np.ndarray):
        """(polygon index, nearest boundary lat, lon, distance km) for each point."""
        d, i = self.kd.query(to_xyz(lat, lon), k=1)
        return self.owner[i], self.lonlat[i, 1].copy(), self.lonlat[i, 0].copy(), chord_to_km(d)


def nearest_polygon(lat: np.ndarray, lon: np.ndarray, geoms: np.ndarray, index: "NearestIndex | None" = None, exact: bool = False):
    """Nearest polygon to each point on the sphere, and the nearest boundary point (see `NearestIndex`)."""
    index = index or NearestIndex(geoms)
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    j, slat, slon, _ = index.query(lat, lon)
    if exact and len(j):
        # the exact nearest point on that polygon's boundary (planar in a frame shifted to the
        # point's side of the antimeridian), so distinct points at sea keep distinct snap points
        vlon = slon
        shift = np.where(vlon - lon > 180, -360.0, np.where(vlon - lon < -180, 360.0, 0.0))
        pts = shapely.points(lon - shift, lat)
        end = shapely.get_coordinates(shapely.get_point(shapely.shortest_line(pts, geoms[j]), 1))
        slon = wrap_lon(end[:, 0] + shift)
        slat = end[:, 1]
    return j, slat, slon


def adjacency(geoms: np.ndarray, tree: STRtree | None = None, tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of polygons that touch or lie within `tolerance` degrees (shared borders)."""
    tree = tree or STRtree(geoms)
    src, dst = tree.query(geoms, predicate="dwithin", distance=tolerance)
    keep = src < dst
    return src[keep], dst[keep]


def to_local(geom, lon0: float, lat0: float, wrap: bool):
    """Geometry in a local planar frame: x = (lon - lon0)·cos(lat0), y = lat; parts wrapped near lon0."""
    c = max(np.cos(np.radians(lat0)), 0.05)

    def f(xy: np.ndarray) -> np.ndarray:
        x = xy[:, 0] - lon0
        return np.column_stack([x * c, xy[:, 1]])

    if wrap:
        parts = shapely.get_parts(geom)
        cx = shapely.get_coordinates(shapely.centroid(parts))[:, 0]
        shift = np.where(cx - lon0 > 180, -360.0, np.where(cx - lon0 < -180, 360.0, 0.0))
        parts = np.array([shapely.transform(p, lambda xy, s=s: xy + np.array([s, 0.0])) for p, s in zip(parts, shift)], dtype=object)
        geom = shapely.multipolygons(parts) if len(parts) > 1 else parts[0]
    return shapely.transform(geom, f)


def local_points(lat: np.ndarray, lon: np.ndarray, lon0: float, lat0: float, wrap: bool) -> np.ndarray:
    """Point coordinates (n, 2) in the frame of `to_local`."""
    c = max(np.cos(np.radians(lat0)), 0.05)
    x = np.asarray(lon, np.float64) - lon0
    if wrap:
        x = wrap_lon(x)
    return np.column_stack([x * c, np.asarray(lat, np.float64)])


def from_local(geom, lon0: float, lat0: float):
    """Inverse of `to_local`, folding anything beyond ±180° back onto the map."""
    c = max(np.cos(np.radians(lat0)), 0.05)
    g = shapely.transform(geom, lambda xy: np.column_stack([xy[:, 0] / c + lon0, xy[:, 1]]))
    xmin, _, xmax, _ = shapely.bounds(g)
    if xmin >= -180.0 and xmax <= 180.0:
        return g
    pieces = []
    for s in (-360.0, 0.0, 360.0):
        part = shapely.intersection(g, shapely.box(-180.0 - s, -90.0, 180.0 - s, 90.0))
        if not part.is_empty:
            pieces.append(shapely.transform(part, lambda xy, s=s: xy + np.array([s, 0.0])))
    return polygonal(shapely.union_all(pieces))


def polygonal(g):
    """Only the polygonal parts of a geometry (intersections can leave lines and points)."""
    if g is None or g.is_empty:
        return shapely.MultiPolygon()
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [p for p in shapely.get_parts(g) if p.geom_type == "Polygon" and not p.is_empty]
    if not parts:
        return shapely.MultiPolygon()
    return parts[0] if len(parts) == 1 else shapely.multipolygons(parts)
