"""An area of interest (`within=` in the API, `--within` in `pigeon locate`): the answer must lie in it.

An area is given as ISO 3166-1 alpha-2 country codes (`HR`, `HR,SI,BA`) and/or ISO 3166-2 admin-1
codes (`US-CA`), in any case, each checked against the bundled Natural Earth admin-1 polygons
(`geocells.bundled.admin1()`); or as a GeoJSON Polygon or MultiPolygon (bare, a Feature, or a
FeatureCollection of them: their union). `parse_area` reads one (cached by its text).

What an area does to a bundle has one owner each: `restrict` (which cells, groups and gallery photos
lie inside, and each cell's weight), `AreaView` (cell probabilities times the weights, renormalised;
an answer point outside moved to the nearest point inside). `Predictor._predict` applies them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import shapely

from pigeon.core.errors import UserError
from pigeon.core.sphere import haversine_km
from pigeon.geocells import bundled
from pigeon.geocells.geometry import polygonal
from pigeon.geocells.reach import area_km2

from .metrics import region_index

COUNTRY_CODE = re.compile(r"[A-Z]{2}")
ADMIN1_CODE = re.compile(r"[A-Z]{2}-[A-Z0-9]{1,3}")
PARSED_CACHE = 64     # parsed areas kept, by their text
VIEW_CACHE = 16       # areas' views kept per predictor
NUDGE_DEG = 1e-6      # an answer moved onto the area's edge steps this far (~0.1 m) inside it


class AreaError(UserError):
    """A bad area of interest (unknown code, not a polygon), or one that holds no cell: 422 / exit 2."""


@dataclass(frozen=True, eq=False)
class Area:
    """A parsed area: codes (`countries`: ISO 3166-1 alpha-2, `admin1`: ISO 3166-2) or a drawn polygon.

    key: the normalised text ("HR,US-CA"; a GeoJSON area: "geojson:" + the SHA-256 of its text)."""

    key: str
    codes: tuple[str, ...] = ()
    drawn: Any = None               # the GeoJSON's (Multi)Polygon; None for codes

    @property
    def countries(self) -> tuple[str, ...]:
        return tuple(c for c in self.codes if "-" not in c)

    @property
    def admin1(self) -> tuple[str, ...]:
        return tuple(c for c in self.codes if "-" in c)

    @cached_property
    def regions(self) -> np.ndarray:
        """(R,) bool over `bundled.admin1()` rows: the regions the codes name (all False for a drawn area)."""
        adm = bundled.admin1()
        return adm["iso_a2"].isin(self.countries).to_numpy() | adm["iso_3166_2"].isin(self.admin1).to_numpy()

    @cached_property
    def geometry(self) -> Any:
        """The area as one (Multi)Polygon, prepared for point tests: the drawn polygons, or the bundled
        admin-1 polygons of the codes."""
        g = self.drawn if self.drawn is not None else polygonal(shapely.union_all(bundled.admin1().geometry.values[self.regions]))
        shapely.prepare(g)
        return g

    @cached_property
    def area_km2(self) -> float:
        return float(area_km2(np.array([self.geometry], dtype=object))[0])

    def contains(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Whether each point lies in the area (its border included)."""
        return shapely.intersects_xy(self.geometry, np.asarray(lon, np.float64), np.asarray(lat, np.float64))

    def describe(self) -> dict[str, Any]:
        """What an answer reports of the area it was restricted to."""
        what: dict[str, Any] = {"codes": list(self.codes)} if self.drawn is None else {"geojson": True}
        return {**what, "area_km2": round(self.area_km2, 1)}

    def __str__(self) -> str:
        return f"the area {self.key}" if self.drawn is None else f"the GeoJSON area ({self.area_km2:,.0f} km²)"


# -- parsing --------------------------------------------------------------------------------------
_parsed: OrderedDict[str, Area] = OrderedDict()
_parsed_lock = threading.Lock()


def parse_area(spec: str | bytes | dict) -> Area:
    """An `Area` from codes ("HR,si, US-CA") or GeoJSON (text, bytes or a parsed dict); cached by text.
    Anything else raises `AreaError` naming the code or what the GeoJSON holds, and the fix."""
    if isinstance(spec, dict):
        spec = json.dumps(spec, sort_keys=True)
    if isinstance(spec, bytes):
        try:
            spec = spec.decode("utf-8")
        except UnicodeDecodeError:
            raise AreaError("within: the area is not UTF-8 text; give country codes or a GeoJSON polygon") from None
    text = str(spec).strip()
    key = hashlib.sha256(text.encode()).hexdigest()
    with _parsed_lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    area = _geojson_area(text, key) if text.startswith("{") else _code_area(text)
    with _parsed_lock:
        _parsed[key] = area
        while len(_parsed) > PARSED_CACHE:
            _parsed.popitem(last=False)
    return area


def read_area(value: str) -> Area:
    """`--within VALUE`: a GeoJSON file when VALUE names a file (or ends in .json/.geojson), else codes."""
    path = Path(value)
    if path.suffix.lower() in (".json", ".geojson") or path.is_file():
        if not path.is_file():
            raise AreaError(f"within: GeoJSON file {path} does not exist; give an existing file, or country codes such as HR,SI")
        return parse_area(path.read_bytes())
    return parse_area(value)


def _code_area(text: str) -> Area:
    given = [c for c in re.split(r"[\s,;]+", text) if c]
    if not given:
        raise AreaError("within: no area given; give ISO country codes (HR or HR,SI,BA), ISO 3166-2 codes (US-CA) or a GeoJSON polygon")
    adm = bundled.admin1()
    known_c, known_a = set(adm["iso_a2"]), set(adm["iso_3166_2"]) - {""}
    for c in given:
        if COUNTRY_CODE.fullmatch(c.upper()):
            if c.upper() not in known_c:
                raise AreaError(f"within: {c} is not an ISO 3166-1 alpha-2 country code of the bundled map; give codes such as HR, SI, US")
        elif ADMIN1_CODE.fullmatch(c.upper()):
            if c.upper() not in known_a:
                raise AreaError(f"within: {c} is not an ISO 3166-2 admin-1 code of the bundled map; give codes such as US-CA, HR-17")
        else:
            raise AreaError(f"within: {c!r} is neither a country code (HR) nor an admin-1 code (US-CA); separate codes with commas, "
                            f"or give a GeoJSON polygon")
    codes = tuple(dict.fromkeys(c.upper() for c in given))
    return Area(",".join(codes), codes)


def _geojson_area(text: str, digest: str) -> Area:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise AreaError(f"within: the GeoJSON does not parse ({' '.join(str(e).split())}); give a Polygon, MultiPolygon, Feature or FeatureCollection") from None
    geoms = [_polygons(g) for g in _geometries(obj)]
    g = polygonal(shapely.make_valid(shapely.union_all(geoms)))
    if g.is_empty:
        raise AreaError("within: the GeoJSON polygon is empty (no area); draw a polygon with at least three distinct corners")
    x0, y0, x1, y1 = g.bounds
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise AreaError(f"within: the GeoJSON polygon reaches beyond lon -180..180 / lat -90..90 (bounds {g.bounds}); "
                        f"give [lon, lat] coordinates (RFC 7946)")
    return Area(f"geojson:{digest}", drawn=g)


def _geometries(obj: Any) -> list[dict]:
    """The geometry objects of a GeoJSON geometry, Feature or FeatureCollection."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        feats = obj.get("features")
        if not isinstance(feats, list) or not feats:
            raise AreaError("within: the GeoJSON FeatureCollection has no features; give at least one Polygon feature")
        return [g for f in feats for g in _geometries(f)]
    if kind == "Feature":
        return _geometries(obj.get("geometry"))
    if kind in ("Polygon", "MultiPolygon"):
        return [obj]
    raise AreaError(f"within: the GeoJSON holds a {kind or type(obj).__name__}, not an area; give a Polygon or MultiPolygon "
                    f"(bare, as a Feature, or in a FeatureCollection)")


def _polygons(geom: dict) -> Any:
    try:
        return shapely.from_geojson(json.dumps(geom))
    except Exception as e:  # GEOS reports bad coordinates with its own types
        why = " ".join(str(e).split())
        raise AreaError(f"within: the GeoJSON {geom.get('type')} is malformed ({why}); give rings of [lon, lat] positions, closed") from None


# -- what an area leaves of a bundle --------------------------------------------------------------
@dataclass(frozen=True)
class Restriction:
    """An area's part of a bundle."""

    weight: np.ndarray            # (C,) share of each cell's training points inside the area
    groups: np.ndarray            # bool per row of `cells.composition("admin1")`: (cell, region) groups inside
    photos: np.ndarray | None     # bool per gallery row: the photos inside (None without a gallery)


def restrict(area: Area, cells: Any, comp: pd.DataFrame, gallery: pd.DataFrame | None = None,
             photo_regions: Callable[[], np.ndarray] | None = None) -> Restriction:
    """Which part of the bundle lies in `area`: the one rule.

    Codes: a cell's weight is the share of its training points whose admin-1 region has one of the codes
    (its composition `comp`, `GeoCells.composition("admin1")`, matched on iso_a2 for country codes and on
    the region's (country, admin-1 name) for ISO 3166-2 codes); its groups inside are those regions. A
    gallery photo is inside when the bundled region at its point (`pigeon.metrics.region_index`, computed
    once by `photo_regions`: a photo at sea takes the nearest region, as training points do) has a code.

    A drawn polygon: cells keep no training points, but the gallery holds the train photos of each cell,
    so a cell's weight is the share of its gallery photos inside, with the share of its land inside
    counted as one more photo: (photos inside + land share) / (photos + 1). A cell without photos (or a
    bundle without a gallery) keeps its land share; a polygon that cuts land but holds no photo still
    holds cells. Its groups inside are the bundled admin-1 regions the polygon touches (a cell none of
    whose groups does, e.g. cells built on other boundaries, keeps them all); photos inside lie in it."""
    n = len(cells)
    cell = comp["cell_id"].to_numpy()
    if area.drawn is None:
        adm = bundled.admin1()
        groups = comp["iso_a2"].isin(area.countries).to_numpy() | _same_region(comp, adm[adm["iso_3166_2"].isin(area.admin1)])
        weight = np.bincount(cell, comp["share"].to_numpy(np.float64) * groups, minlength=n)
        photos = None if gallery is None else area.regions[photo_regions()]
    else:
        geoms = cells.geoms
        land = np.zeros(n)
        hit = cells.tree.query(area.geometry, predicate="intersects")
        if len(hit):
            land[hit] = np.clip(area_km2(shapely.intersection(geoms[hit], area.geometry)) / np.maximum(area_km2(geoms[hit]), 1e-12), 0, 1)
        photos, inside, total = None, np.zeros(n), np.zeros(n)
        if gallery is not None:
            photos = area.contains(gallery["lat"].to_numpy(np.float64), gallery["lon"].to_numpy(np.float64))
            g_cell = gallery["cell"].to_numpy(np.int64)
            total, inside = np.bincount(g_cell, minlength=n)[:n], np.bincount(g_cell[photos], minlength=n)[:n]
        weight = (inside + land) / (total + 1)
        adm = bundled.admin1()
        groups = _same_region(comp, adm[shapely.intersects(adm.geometry.values, area.geometry)])
        groups |= ~(np.bincount(cell, groups.astype(np.float64), minlength=n) > 0)[cell]   # cells with no group touched keep theirs
    if not (weight > 0).any():
        raise AreaError(f"within: {area} holds no cell of this bundle (none of its cells' training photos or land lies inside); "
                        f"give a larger area, or one where the bundle has photos")
    return Restriction(weight, groups, photos)


def _same_region(comp: pd.DataFrame, regions: pd.DataFrame) -> np.ndarray:
    """Bool per composition row: its (country, admin-1 name) is one of `regions`' (bundled admin-1 rows)."""
    def key(f: pd.DataFrame) -> pd.Series:
        return f["country"].astype(str) + "\x1f" + f["admin1"].astype(str)
    return key(comp).isin(set(key(regions))).to_numpy()


@dataclass
class AreaView:
    """A bundle's answers under one area: weights, country/admin-1 matrices, the gallery photos inside."""

    area: Area
    weight: np.ndarray                 # (C,)
    country_m: Any                     # (C, K) sparse, rows of the cells inside summing to 1
    admin_m: Any                       # (C, A) sparse
    gallery: Any                       # a GalleryRefiner over the photos inside, or None
    cell_geoms: np.ndarray
    _targets: dict[int, Any] = field(default_factory=dict)

    def restrict(self, probs: np.ndarray) -> np.ndarray:
        """probs x weight, renormalised per row (dtype kept); a row with no mass inside raises `AreaError`."""
        q = np.asarray(probs, np.float64) * self.weight
        s = q.sum(axis=1, keepdims=True)
        if not (s > 0).all():
            i = int(np.flatnonzero(~(s[:, 0] > 0))[0])
            raise AreaError(f"within: {self.area} holds no cell of this bundle that photo {i} has any probability in; give a larger area")
        return (q / s).astype(probs.dtype)

    def inside(self, lat: np.ndarray, lon: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, moved km): answers outside the area moved to the nearest point of their cell's land
        inside it (the whole area when the cell's land is not in it); the others unchanged, moved 0."""
        lat0, lon0 = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        lat, lon = lat0.copy(), lon0.copy()
        out = np.flatnonzero(~self.area.contains(lat, lon))
        if len(out):
            targets = np.array([self._target(int(c)) for c in cell[out]], dtype=object)
            start = shapely.points(lon[out], lat[out])
            end = shapely.get_coordinates(shapely.get_point(shapely.shortest_line(start, targets), 1))
            step = end - shapely.get_coordinates(start)
            step *= NUDGE_DEG / np.maximum(np.linalg.norm(step, axis=1, keepdims=True), 1e-12)
            x, y = (end + step).T                     # just past the edge, along the way in
            bad = ~shapely.intersects_xy(targets, x, y)
            if bad.any():   # a sliver thinner than the step: a point on its surface
                x[bad], y[bad] = shapely.get_coordinates(shapely.point_on_surface(targets[bad])).T
            lon[out], lat[out] = x, y
        return lat, lon, haversine_km(lat, lon, lat0, lon0)

    def _target(self, c: int) -> Any:
        """Cell c's land inside the area (cached), else the area itself."""
        if c not in self._targets:
            t = polygonal(shapely.intersection(self.cell_geoms[c], self.area.geometry))
            self._targets[c] = t if not t.is_empty else self.area.geometry
        return self._targets[c]


class AreaViews:
    """A predictor's `AreaView`s, built on first use per area, the last VIEW_CACHE kept (thread-safe)."""

    def __init__(self, cells: Any, gallery: Any, matrices: Callable[[np.ndarray], tuple[Any, Any]]):
        """`gallery`: the predictor's GalleryRefiner (None: no gallery); `matrices(groups)`: the country and
        admin-1 matrices over only the composition rows `groups`."""
        self.cells, self.gallery, self.matrices = cells, gallery, matrices
        self._views: OrderedDict[str, AreaView] = OrderedDict()
        self._lock = threading.Lock()
        self._photo_regions: np.ndarray | None = None

    def view(self, area: Area | str) -> AreaView:
        """`area`'s view (an `Area`, or its text: parsed, cached)."""
        area = area if isinstance(area, Area) else parse_area(area)
        with self._lock:
            if area.key in self._views:
                self._views.move_to_end(area.key)
                return self._views[area.key]
        v = self._build(area)
        with self._lock:
            self._views[area.key] = v
            while len(self._views) > VIEW_CACHE:
                self._views.popitem(last=False)
        return v

    def photo_regions(self) -> np.ndarray:
        """The bundled admin-1 row of each gallery photo (once per predictor)."""
        if self._photo_regions is None:
            f = self.gallery.gallery.frame
            self._photo_regions = region_index(f["lat"].to_numpy(np.float64), f["lon"].to_numpy(np.float64))[0]
        return self._photo_regions

    def _build(self, area: Area) -> AreaView:
        comp = self.cells.composition("admin1")
        frame = self.gallery.gallery.frame if self.gallery is not None else None
        r = restrict(area, self.cells, comp, frame, self.photo_regions)
        country_m, admin_m = self.matrices(r.groups)
        gallery = self.gallery.among(r.photos) if self.gallery is not None else None
        return AreaView(area, r.weight, country_m, admin_m, gallery, self.cells.geoms)


def mark_within(answers: list[dict[str, Any]], area: Area, moved_km: np.ndarray) -> None:
    """An answer under an area: it names the area (`within`), its refinement says how far the point was
    moved into it (`moved_into_area_km`), and its ranked lists drop what the area gave probability 0."""
    for a, km in zip(answers, moved_km):
        a["within"] = area.describe()
        a["refinement"]["moved_into_area_km"] = float(km)
        for key in ("top_cells", "countries", "admin1"):
            a[key] = [x for x in a[key] if x["probability"] > 0]


__all__ = ["Area", "AreaError", "AreaView", "AreaViews", "Restriction", "mark_within", "parse_area", "read_area", "restrict"]
