"""Credible regions and the map formats: the sets (fewest cells reaching 50% / 90%), their polygons and
areas, GeoJSON that follows RFC 7946, KML that fastkml reads back, through the Predictor, the API and
`pigeon locate --format`."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from fastapi.testclient import TestClient
from shapely.geometry import box, shape

from api_support import encode, photo, tiny_bundle, tiny_predictor
from pigeon.api import Settings, create_app
from pigeon.geoformats import feature_collection, kml_document
from pigeon.predictor import AnswerOptions
from pigeon.regions import SIMPLIFY_DEG, CellRegions, credible_sets

torch.set_num_threads(2)
KML_TYPE = "application/vnd.google-earth.kml+xml"


def _signed_area(ring: list[list[float]]) -> float:
    """Shoelace area of a ring as written: > 0 counter-clockwise, < 0 clockwise."""
    xy = np.asarray(ring, np.float64)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def check_rfc7946(fc: dict) -> int:
    """Assert what RFC 7946 asks of a FeatureCollection's geometries; returns how many rings were checked."""
    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list) and fc["features"]
    rings = 0
    for f in fc["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict)
        g = f["geometry"]
        polys = {"Point": [], "Polygon": [g["coordinates"]], "MultiPolygon": g["coordinates"]}[g["type"]]
        if g["type"] == "Point":
            lon, lat = g["coordinates"]
            assert -180 <= lon <= 180 and -90 <= lat <= 90
        for poly in polys:
            for k, ring in enumerate(poly):
                xy = np.asarray(ring, np.float64)
                assert xy.shape[1] == 2 and len(xy) >= 4 and (xy[0] == xy[-1]).all(), "a ring is not closed"
                assert (np.abs(xy[:, 0]) <= 180).all() and (np.abs(xy[:, 1]) <= 90).all(), "coordinates out of bounds"
                a = _signed_area(ring)
                assert (a > 0) if k == 0 else (a < 0), f"ring {k} of {f['id']} has the wrong orientation ({a})"
                rings += 1
    return rings


def _grid_cells() -> np.ndarray:
    """A 3 x 3 grid of 1° boxes at the equator (cell 4 in the middle), plus a cell split at the antimeridian."""
    boxes = [box(x, y, x + 1, y + 1) for y in (0, 1, 2) for x in (10, 11, 12)]
    split = shapely.MultiPolygon([box(179, 0, 180, 1), box(-180, 0, -179, 1)])
    return np.array([*boxes, split, box(178, 0, 179, 1)], dtype=object)


def test_credible_sets_are_the_fewest_cells_reaching_each_level():
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.05, 0.9, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]], np.float32)
    order, counts, mass = credible_sets(probs, (0.5, 0.9))
    assert order[:, 0].tolist() == [0, 1, 0]
    assert counts.tolist() == [[2, 3], [1, 1], [2, 4]]
    assert mass[:, 0] == pytest.approx([0.7, 0.9, 0.5]) and mass[:, 1] == pytest.approx([0.9, 0.9, 1.0])
    # a row holding less than the level (e.g. a restricted answer not renormalised) takes every cell, and says what it holds
    _, c, m = credible_sets(np.array([[0.2, 0.1, 0.0]]), (0.5,))
    assert c.tolist() == [[3]] and m[0, 0] == pytest.approx(0.3)


def test_area_of_a_one_degree_box_at_the_equator():
    regions = CellRegions(_grid_cells())
    _, area, geometry = regions.union(np.array([0]))
    assert area == pytest.approx(12_309, rel=0.01)   # the WGS84 geodesic figure is 12,309 km²
    assert geometry["type"] == "Polygon" and shape(geometry).equals(box(10, 0, 11, 1)) and _signed_area(geometry["coordinates"][0]) == 1.0
    assert regions.union(np.array([0, 1, 3, 4]))[1] == pytest.approx(4 * area, rel=1e-3)


def test_a_region_around_a_hole_and_across_the_antimeridian_follows_the_rfc():
    regions = CellRegions(_grid_cells())
    p = np.full((2, 11), 0.0)
    p[0, [0, 1, 2, 3, 5, 6, 7, 8]] = 1 / 8          # every grid cell but the middle one
    p[1, [9, 10]] = [0.6, 0.4]                        # the split cell and its western neighbour
    regs = regions.answer_regions(p, np.array([1.5, 0.5]), np.array([10.5, 180.5]))  # 180.5: the same place as -179.5
    r90 = regs[0]["90"]
    assert r90["n_cells"] == 8 and r90["probability"] == pytest.approx(1.0) and 4 not in r90["cell_ids"]
    assert r90["geometry"]["type"] == "Polygon"
    outer, hole = r90["geometry"]["coordinates"]
    assert _signed_area(outer) == pytest.approx(9.0) and _signed_area(hole) == pytest.approx(-1.0)
    assert r90["area_km2"] == pytest.approx(8 * 12_360, rel=0.01)
    wrap = regs[1]
    assert wrap["50"]["cell_ids"] == [9] and wrap["90"]["cell_ids"] == [9, 10]
    assert wrap["90"]["geometry"]["type"] == "MultiPolygon" and wrap["90"]["area_km2"] == pytest.approx(3 * 12_360, rel=0.01)
    assert wrap["50"]["contains_answer"] and wrap["90"]["contains_answer"]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"{i}-{k}", "geometry": r[k]["geometry"], "properties": {}} for i, r in enumerate(regs) for k in ("50", "90")]}
    assert check_rfc7946(fc) >= 6


def test_an_answer_outside_the_cells_land_is_reported_not_hidden():
    """An answer at sea (or moved by refinement out of the set's cells) lies in no region: `contains_answer` says so."""
    regions = CellRegions(_grid_cells())
    p = np.zeros((1, 11))
    p[0, :9] = 1 / 9
    at_sea = regions.answer_regions(p, np.array([-5.0]), np.array([11.5]))[0]
    on_land = regions.answer_regions(p, np.array([1.5]), np.array([11.5]))[0]
    assert not at_sea["50"]["contains_answer"] and not at_sea["90"]["contains_answer"]
    assert on_land["90"]["contains_answer"]


@pytest.fixture(scope="module")
def answers():
    pred = tiny_predictor()
    ims = [photo(seed=s) for s in (1, 2, 3)]
    return pred, ims, pred.locate(ims, top_k=3, options=AnswerOptions(regions=True))


def test_regions_nest_and_hold_the_answer_point(answers):
    pred, ims, got = answers
    plain = pred.locate(ims, top_k=3)
    for a, b in zip(got, plain):
        assert set(a) - set(b) == {"regions"} and "regions" not in b   # without the flag, no regions
        r50, r90 = a["regions"]["50"], a["regions"]["90"]
        assert r50["level"] == 0.5 and r90["level"] == 0.9
        assert 0.5 <= r50["probability"] <= r90["probability"] and r90["probability"] >= 0.9 - 1e-6
        assert r50["cell_ids"] == r90["cell_ids"][: r50["n_cells"]] and r50["cell_ids"][0] == a["top_cells"][0]["cell_id"]
        assert 0 < r50["area_km2"] <= r90["area_km2"]
        g50, g90 = shape(r50["geometry"]), shape(r90["geometry"])
        assert g50.is_valid and g90.is_valid
        assert g90.buffer(2 * SIMPLIFY_DEG).covers(g50)
        point = shapely.Point(a["lon"], a["lat"])   # no gallery: the top cell's centre, always in the 50% set
        assert r50["contains_answer"] and r90["contains_answer"] and g90.buffer(2 * SIMPLIFY_DEG).covers(point)


def test_regions_follow_the_answers_probabilities(answers):
    """Regions come from p["probs"]: a cell taken out of the probabilities (as an area of interest does) leaves the regions."""
    pred, ims, _ = answers
    p = pred.predict_embeddings(pred.embed(ims[:1]), top_k=3)
    top = int(p["top_cells"][0, 0])
    before = pred.format(p, top_k=3, options=AnswerOptions(regions=True))[0]["regions"]
    p["probs"] = p["probs"].copy()
    p["probs"][0, top] = 0.0
    p["probs"] /= p["probs"].sum(axis=1, keepdims=True)
    after = pred.format(p, top_k=3, options=AnswerOptions(regions=True))[0]["regions"]
    assert top in before["50"]["cell_ids"] and top not in after["50"]["cell_ids"] + after["90"]["cell_ids"]


def test_geojson_follows_rfc7946(answers):
    pred, _, got = answers
    fc = feature_collection(got, pred.regions, names=["a.jpg", "b.jpg", None])
    assert check_rfc7946(fc) >= 3 * (2 + 3)
    kinds = [(f["properties"]["answer"], f["properties"]["kind"]) for f in fc["features"]]
    assert kinds == [(i, k) for i in range(3) for k in ("answer", "region", "region", "cell", "cell", "cell")]
    for i, a in enumerate(got):
        point, r50, r90, *cells = [f for f in fc["features"] if f["properties"]["answer"] == i]
        assert point["geometry"]["coordinates"] == [round(a["lon"], 6), round(a["lat"], 6)]   # lon first
        assert point["properties"]["name"] == ["a.jpg", "b.jpg", "answer 3"][i]
        assert point["properties"]["confidence"] == a["confidence"] and "regions" not in point["properties"]
        assert (r50["properties"]["level"], r90["properties"]["level"]) == (0.5, 0.9)
        assert r90["properties"]["area_km2"] == a["regions"]["90"]["area_km2"] and r90["properties"]["n_cells"] == a["regions"]["90"]["n_cells"]
        for c, want in zip(cells, a["top_cells"]):
            assert c["properties"]["cell_id"] == want["cell_id"] and c["properties"]["probability"] == want["probability"]
            assert c["properties"]["name"] == f"{want['admin1']}, {want['country']}"
            assert shape(c["geometry"]).buffer(SIMPLIFY_DEG).covers(shapely.Point(want["lon"], want["lat"]))


def _kml_placemarks(text: str) -> list:
    from fastkml import kml

    doc = kml.KML.from_string(text.encode()).features[0]
    return [(folder.name, pm) for folder in doc.features for pm in folder.features]


def test_kml_parses_back_with_fastkml(answers):
    pred, _, got = answers
    fc = feature_collection(got[:2], pred.regions, names=["a.jpg", "b.jpg"])
    pms = _kml_placemarks(kml_document(fc))
    assert [f for f, _ in pms] == ["a.jpg"] * 6 + ["b.jpg"] * 6
    for i, a in enumerate(got[:2]):
        point, r50, r90 = [pm for f, pm in pms if f == ["a.jpg", "b.jpg"][i]][:3]
        assert point.geometry.geom_type == "Point"
        assert (point.geometry.x, point.geometry.y) == pytest.approx((a["lon"], a["lat"]), abs=1e-6)
        for pm, key in ((r50, "50"), (r90, "90")):
            assert pm.name.endswith(f"{key}% region") and pm.geometry.geom_type in ("Polygon", "MultiPolygon")
            assert shape(pm.geometry).equals_exact(shape(a["regions"][key]["geometry"]), 1e-6)
            data = {d.name: d.value for d in pm.extended_data.elements}
            assert float(data["probability"]) == pytest.approx(a["regions"][key]["probability"])
            assert int(data["n_cells"]) == a["regions"][key]["n_cells"]


@pytest.fixture(scope="module")
def client():
    app = create_app(tiny_predictor(), Settings(warmup=False))
    with TestClient(app) as c:
        yield c


def _post(client, path="/locate", headers=None, **form):
    field = "image" if path == "/locate" else "images"
    return client.post(path, files={field: ("street.jpg", encode(photo(seed=5)), "image/jpeg")}, data=form, headers=headers or {})


def test_api_formats(client):
    plain = _post(client).json()
    assert "regions" not in plain                                         # without the flag: the answer as before
    with_regions = _post(client, regions="true").json()
    assert set(with_regions) - set(plain) == {"regions"} and set(with_regions["regions"]) == {"50", "90"}
    for r in (_post(client, format="geojson"), _post(client, headers={"Accept": "application/geo+json"})):
        assert r.status_code == 200 and r.headers["content-type"] == "application/geo+json"
        fc = r.json()
        check_rfc7946(fc)
        assert fc["features"][0]["geometry"]["coordinates"] == [round(plain["lon"], 6), round(plain["lat"], 6)]
        assert fc["features"][0]["properties"]["name"] == "street.jpg"
    # the Accept header's preference by q; the form field wins over it
    assert _post(client, headers={"Accept": "application/json;q=0.9, application/geo+json;q=0.5"}).headers["content-type"] == "application/json"
    r = _post(client, format="kml", headers={"Accept": "application/geo+json"})
    assert r.status_code == 200 and r.headers["content-type"] == KML_TYPE
    assert [f for f, _ in _kml_placemarks(r.text)][0] == "street.jpg"
    bad = _post(client, format="shapefile")
    assert bad.status_code == 422 and all(c in bad.text for c in ("'json'", "'geojson'", "'kml'"))
    assert _post(client, format="kml", explain="true").status_code == 422


def test_api_batch_is_one_feature_collection(client):
    files = [("images", ("a.jpg", encode(photo(seed=1)), "image/jpeg")), ("images", ("b.jpg", encode(photo(seed=2)), "image/jpeg")),
             ("images", ("c.jpg", b"not a photo", "image/jpeg"))]
    r = client.post("/locate/batch", files=files, data={"format": "geojson"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/geo+json"
    fc = r.json()
    check_rfc7946(fc)
    assert [f["properties"]["name"] for f in fc["features"] if f["properties"]["kind"] == "answer"] == ["a.jpg", "b.jpg"]
    assert [e["filename"] for e in fc["refused"]] == ["c.jpg"]
    k = client.post("/locate/batch", files=files[:2], headers={"Accept": KML_TYPE})
    assert k.headers["content-type"] == KML_TYPE and list(dict.fromkeys(f for f, _ in _kml_placemarks(k.text))) == ["a.jpg", "b.jpg"]
    j = client.post("/locate/batch", files=files[:2], data={"regions": "true"}).json()
    assert all(set(e["result"]["regions"]) == {"50", "90"} for e in j["results"])


def test_openapi_documents_the_formats(client):
    spec = client.get("/openapi.json").json()
    for path in ("/locate", "/locate/batch"):
        op = spec["paths"][path]["post"]
        assert set(op["responses"]["200"]["content"]) == {"application/json", "application/geo+json", KML_TYPE}
        body = spec["components"]["schemas"][op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
        assert body["properties"]["format"]["anyOf"][0]["enum"] == ["json", "geojson", "kml"]
        assert body["properties"]["format"]["description"] and body["properties"]["regions"]["description"]
    assert "contains_answer" in spec["components"]["schemas"]["CredibleRegion"]["properties"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for s in (1, 2):
        photo(seed=s).save(d / f"p{s}.png")
    return d


def _cli(args, capsys):
    from worlds import cli

    capsys.readouterr()
    code = cli(["locate", *args, "--bundle", str(tiny_bundle()), "--top-k", "3"])
    return code, capsys.readouterr()


def test_cli_format_to_stdout(images, capsys):
    lines = _cli([str(images)], capsys)[1].out.strip().splitlines()     # the default output is unchanged: one line per image
    assert len(lines) == 2 and lines[0].split("\t")[0].endswith("p1.png") and "50%:" in lines[0]
    code, cap = _cli([str(images), "--format", "json", "--regions"], capsys)
    js = json.loads(cap.out)
    assert code == 0 and [a["image"].rsplit("/", 1)[1] for a in js] == ["p1.png", "p2.png"] and set(js[0]["regions"]) == {"50", "90"}
    assert "regions" not in json.loads(_cli([str(images), "--format", "json"], capsys)[1].out)[0]
    fc = json.loads(_cli([str(images), "--format", "geojson"], capsys)[1].out)
    check_rfc7946(fc)
    assert fc["features"][0]["geometry"]["coordinates"] == [round(js[0]["lon"], 6), round(js[0]["lat"], 6)]
    pms = _kml_placemarks(_cli([str(images), "--format", "kml"], capsys)[1].out)
    assert len({f for f, _ in pms}) == 2 and pms[0][1].geometry.geom_type == "Point"
    table = pd.read_csv(io.StringIO(_cli([str(images), "--format", "csv"], capsys)[1].out))
    assert list(table.columns[:3]) == ["image", "lat", "lon"] and table["lat"].tolist() == pytest.approx([a["lat"] for a in js])


def test_cli_out_suffix_and_format(images, tmp_path, capsys):
    for name in ("r.csv", "r.json", "r.geojson", "r.kml"):
        code, cap = _cli([str(images), "--out", str(tmp_path / name)], capsys)
        assert code == 0 and "2 images located" in cap.out and cap.out.count("\n") == 1
    assert pd.read_csv(tmp_path / "r.csv").shape[0] == 2
    assert len(json.loads((tmp_path / "r.json").read_text())) == 2
    check_rfc7946(json.loads((tmp_path / "r.geojson").read_text()))
    assert len(_kml_placemarks((tmp_path / "r.kml").read_text())) == 2 * 6
    assert _cli([str(images), "--out", str(tmp_path / "x.kml"), "--format", "kml"], capsys)[0] == 0
    for args, needle in ((["--out", str(tmp_path / "x.csv"), "--format", "geojson"], "--format is geojson"),
                         (["--format", "shp"], "--format shp"),
                         (["--regions"], "--regions"),
                         (["--format", "csv", "--regions"], "--regions")):
        code, cap = _cli([str(images), *args], capsys)
        err = cap.err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], cap.err
    assert not (tmp_path / "x.csv").exists()
