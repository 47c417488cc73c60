"""How far cells reach: land farther than `max_reach_km` from every training point belongs to no cell.

Empty admin polygons join a neighbour so that the cells tile the land (`build_cells` step 2); without a
limit, a cell at the edge of the data takes in whatever land lies beyond it (a one-country data set
gives border cells of tens of millions of km² that claim other continents). `clip_to_reach` cuts each
cell's polygon to the land within `max_reach_km` of a training point (on the sphere):

- **Net.** The training locations are thinned to a net (one per grid box of `max_reach_km / 20`), and
  the reach is the union of geodesic circles of radius `max_reach_km` (32-gons) around the net's
  points. Land within 0.94 x `max_reach_km` of a training point is therefore always kept, land beyond
  `max_reach_km` never, and every training point stays inside its own cell.
- **Only cells that can reach that far.** A cell whose (densified) convex hull lies within
  `max_reach_km` of one net point is inside the reach as it is: most cells, checked with one KD-tree query.
- **Only circles near the frontier.** For the other cells, a grid of boxes (`GRID_DEG`) over their
  bounding boxes finds where land may be out of reach (a box centre farther than `max_reach_km` minus
  the box's half-diagonal from the net); only circles that can reach those boxes are unioned, and
  the land cut from each cell is those boxes minus the circles. Exact for the circles, and about a
  second on 100K points (docs/geocells.md).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.spatial import cKDTree

from pigeon.core.errors import UserError
from pigeon.core.sphere import EARTH_RADIUS_KM, chord_to_km, from_xyz, km_to_chord, to_xyz, wrap_lon

from .geometry import polygonal

DEFAULT_MAX_REACH_KM = 500.0
NET_FRACTION = 20      # net spacing = max_reach_km / NET_FRACTION
CIRCLE_VERTICES = 32
GRID_DEG = 1.0         # frontier boxes
_KM_PER_DEG = np.pi * EARTH_RADIUS_KM / 180.0


def area_km2(geoms: np.ndarray) -> np.ndarray:
    """Area of lon/lat polygons in km² (Lambert's cylindrical equal-area projection: exact for the
    polygons as drawn on it, within a fraction of a percent of the spherical area for cells)."""
    g = shapely.transform(np.asarray(geoms, dtype=object),
                          lambda xy: np.column_stack([np.radians(xy[:, 0]), np.sin(np.radians(xy[:, 1]))]) * EARTH_RADIUS_KM)
    return shapely.area(g)


def point_net(xyz: np.ndarray, spacing_km: float) -> np.ndarray:
    """One unit vector per occupied grid box of side spacing_km/sqrt(3) in 3-D: every input point lies
    within spacing_km of a net point (the box diagonal)."""
    q = np.floor(np.asarray(xyz) / (km_to_chord(spacing_km) / np.sqrt(3.0))).astype(np.int64)
    _, first = np.unique(q, axis=0, return_index=True)
    return np.asarray(xyz)[np.sort(first)]


def circles(xyz: np.ndarray, radius_km: float, k: int = CIRCLE_VERTICES) -> np.ndarray:
    """Geodesic circles (k-gons in lon/lat) around unit vectors; circles across the antimeridian come
    with a copy shifted by 360°, circles around a pole as the cap they enclose."""
    lat, lon = from_xyz(np.asarray(xyz, np.float64).reshape(-1, 3))
    la, lo = np.radians(lat)[:, None], np.radians(lon)[:, None]
    bearing = np.linspace(0.0, 2 * np.pi, k, endpoint=False)[None]
    d = radius_km / EARTH_RADIUS_KM
    la2 = np.arcsin(np.clip(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(bearing), -1, 1))
    lo2 = lo + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(la2))
    x, y = np.degrees(lo2), np.degrees(la2)
    pole = (90.0 - np.abs(lat)) * _KM_PER_DEG < radius_km
    ring = np.stack([x[~pole], y[~pole]], -1)
    polys = shapely.polygons(np.concatenate([ring, ring[:, :1]], 1))
    west, east = x[~pole].min(1) < -180.0, x[~pole].max(1) > 180.0
    out = [polys, shapely.transform(polys[east], lambda a: a - [360.0, 0.0]), shapely.transform(polys[west], lambda a: a + [360.0, 0.0])]
    out += [_cap(xi, yi, np.sign(la_)) for xi, yi, la_ in zip(x[pole], y[pole], lat[pole])]
    return np.concatenate([np.atleast_1d(np.asarray(o, dtype=object)) for o in out]) if out else np.zeros(0, object)


def _cap(x: np.ndarray, y: np.ndarray, side: float):
    """The polygon between a circle around a pole and that pole: its boundary by longitude, closed
    along ±180° and the pole's latitude."""
    x = wrap_lon(x)
    o = np.argsort(x)
    x, y = x[o], y[o]
    # latitude where the boundary crosses ±180°: between the last and the first point, across the seam
    w = (180.0 - x[-1]) / (x[0] + 360.0 - x[-1])
    y180 = y[-1] + w * (y[0] - y[-1])
    pts = np.r_[[[-180.0, y180]], np.column_stack([x, y]), [[180.0, y180], [180.0, 90.0 * side], [-180.0, 90.0 * side]]]
    return shapely.make_valid(shapely.Polygon(pts))


def clip_to_reach(geoms: np.ndarray, xyz: np.ndarray, max_reach_km: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(cells' polygons cut to the land within `max_reach_km` of a point of `xyz` (L, 3), km² of land cut
    from each). None or inf: unchanged, nothing cut."""
    geoms = np.asarray(geoms, dtype=object).copy()
    cut = np.zeros(len(geoms))
    if max_reach_km is None or not np.isfinite(max_reach_km) or len(geoms) == 0:
        return geoms, cut
    r = float(max_reach_km)
    if not r > 0:
        raise UserError(f"--max-reach-km {max_reach_km}: give a distance > 0 km (inf: no limit)")
    net = point_net(xyz, r / NET_FRACTION)
    tree = cKDTree(net)
    wide = _may_reach_farther(geoms, net, tree, r)
    if not len(wide):
        return geoms, cut
    far = _far_land(shapely.bounds(geoms[wide]), net, tree, r)
    if far is None:
        return geoms, cut
    parts = shapely.get_parts(far)
    ci, pi = shapely.STRtree(parts).query(geoms[wide], predicate="intersects")
    for c in np.unique(ci):  # the few cells that lose land (60 of 2,428 on 100K MP-16 points)
        k = wide[c]
        before = geoms[k]
        geoms[k] = polygonal(shapely.make_valid(shapely.difference(before, shapely.union_all(parts[pi[ci == c]]))))
        cut[k] = max(0.0, float(area_km2([before])[0] - area_km2([geoms[k]])[0]))
    return geoms, cut


def _may_reach_farther(geoms: np.ndarray, net: np.ndarray, tree: cKDTree, r: float) -> np.ndarray:
    """Indices of cells not provably within reach: their convex hull (densified to 0.5°) is not within r
    of the net point nearest to the hull's centre (a hull inside that circle holds the whole cell)."""
    hull = shapely.segmentize(shapely.convex_hull(geoms), 0.5)
    xy, owner = shapely.get_coordinates(hull, return_index=True)
    v = to_xyz(xy[:, 1], xy[:, 0])
    centre = np.zeros((len(geoms), 3))
    np.add.at(centre, owner, v)
    _, near = tree.query(centre / np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-12))
    far = np.zeros(len(geoms))
    np.maximum.at(far, owner, chord_to_km(np.linalg.norm(v - net[near[owner]], axis=1)))
    return np.flatnonzero(far > 0.99 * r)


def _far_land(bounds: np.ndarray, net: np.ndarray, tree: cKDTree, r: float):
    """Where, inside the given bounding boxes, the union of the net's circles does not reach: grid boxes
    whose centre is farther than r - (half-diagonal) from the net (they hold every such place), minus
    the circles that can reach them. None when every box is within reach."""
    g = GRID_DEG
    half_diag = _KM_PER_DEG * g * np.sqrt(2.0) / 2.0
    nx, ny = int(round(360 / g)), int(round(180 / g))
    mask = np.zeros((nx, ny), bool)
    i0, i1 = np.floor((bounds[:, [0, 2]] + 180.0) / g).astype(int).clip(0, nx - 1).T
    j0, j1 = np.floor((bounds[:, [1, 3]] + 90.0) / g).astype(int).clip(0, ny - 1).T
    for a, b, c, d in zip(i0, i1, j0, j1):  # one slice per wide cell
        mask[a:b + 1, c:d + 1] = True
    i, j = np.nonzero(mask)
    lon, lat = -180.0 + (i + 0.5) * g, -90.0 + (j + 0.5) * g
    dist, _ = tree.query(to_xyz(lat, lon))
    out = chord_to_km(dist) > r - half_diag
    if not out.any():
        return None
    boxes = shapely.coverage_union_all(shapely.box(lon[out] - g / 2, lat[out] - g / 2, lon[out] + g / 2, lat[out] + g / 2))
    gap, _ = cKDTree(to_xyz(lat[out], lon[out])).query(net)
    reaching = net[chord_to_km(gap) <= r + half_diag]
    return shapely.difference(boxes, shapely.union_all(circles(reaching, r))) if len(reaching) else boxes


__all__ = ["DEFAULT_MAX_REACH_KM", "clip_to_reach", "area_km2", "circles", "point_net"]
