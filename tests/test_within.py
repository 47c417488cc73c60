"""An area of interest (`within=`, `--within`): codes and GeoJSON parsed, cells outside get probability 0,
refinement scans only gallery photos inside, the answer point lies inside; the demo-like world's test photos
answered within their true country are 100% right on the country and no farther off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from pigeon.area import AreaError, parse_area, restrict
from pigeon.core.sphere import haversine_km
from pigeon.geocells import bundled
from pigeon.predictor import AnswerOptions


def _box(lon0, lat0, lon1, lat1) -> dict:
    return {"type": "Polygon", "coordinates": [[[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]]}


def _country(iso: str):
    adm = bundled.admin1()
    return shapely.union_all(adm.geometry.values[(adm["iso_a2"] == iso).to_numpy()])


# -- parsing ------------------------------------------------------------------------------------------
def test_bundled_admin1_carries_iso_3166_2():
    adm = bundled.admin1()
    assert list(adm.columns) == ["adm0_a3", "iso_a2", "country", "admin1", "iso_3166_2", "geometry"] and len(adm) == 4596
    assert adm.loc[adm["iso_3166_2"] == "US-CA", "admin1"].tolist() == ["California"]
    assert adm.loc[adm["iso_3166_2"] == "HR-17", "admin1"].tolist() == ["Split-Dalmatia"]
    assert not adm["iso_3166_2"].str.endswith("~").any()    # Natural Earth's placeholders are no ISO code


def test_codes_parse_case_insensitive_and_mixed():
    a = parse_area(" hr, si;BA ,hr")
    assert a.codes == ("HR", "SI", "BA") and a.countries == ("HR", "SI", "BA") and a.admin1 == () and a.key == "HR,SI,BA"
    assert a.contains(np.array([45.81, 46.05, 43.86, 48.2]), np.array([15.98, 14.51, 18.41, 16.37])).tolist() == [True, True, True, False]
    m = parse_area("us-ca,HR")
    assert m.countries == ("HR",) and m.admin1 == ("US-CA",)
    assert m.contains(np.array([34.05, 40.71, 45.81]), np.array([-118.24, -74.0, 15.98])).tolist() == [True, False, True]
    assert m.describe()["codes"] == ["US-CA", "HR"] and 4.6e5 < m.describe()["area_km2"] < 5.0e5   # California + Croatia
    assert parse_area("hr") is parse_area("HR ") or parse_area("hr").key == "HR"


@pytest.mark.parametrize("spec, needle", [
    ("XX", "XX is not an ISO 3166-1"), ("HR,ZZ", "ZZ is not"), ("us-zz", "us-zz is not an ISO 3166-2"), ("H1", "'H1' is neither"),
    ("Croatia", "'Croatia' is neither"), ("", "no area given"), (" , ", "no area given"),
    ('{"type": "Point", "coordinates": [15, 45]}', "holds a Point, not an area"), ("{nope", "does not parse"),
    ('{"type": "FeatureCollection", "features": []}', "has no features"), ('{"type": "FeatureCollection", "features": 5}', "has no features"),
    (json.dumps(_box(170, 0, 190, 10)), "beyond lon -180..180"), ('{"type": "Polygon", "coordinates": [[[1, 2]]]}', "malformed"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0], [0, 0]]]}), "empty"),
])
def test_bad_areas_are_one_clear_error(spec, needle):
    with pytest.raises(AreaError, match="^within: ") as e:
        parse_area(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_geojson_shapes_parse():
    box = _box(14, 44, 16, 46)
    for spec in (box, {"type": "Feature", "properties": {}, "geometry": box},
                 {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": _box(14, 44, 15, 46)},
                                                            {"type": "Feature", "geometry": _box(15, 44, 16, 46)}]},
                 {"type": "MultiPolygon", "coordinates": [box["coordinates"]]}):
        a = parse_area(json.dumps(spec))
        assert a.drawn is not None and a.key.startswith("geojson:") and a.describe()["geojson"] is True
        assert a.describe()["area_km2"] == pytest.approx(2 * 2 * 111.195 ** 2 * np.cos(np.radians(45)), rel=0.01)
        assert a.contains(np.array([45.0, 45.0]), np.array([15.0, 17.0])).tolist() == [True, False]


# -- the refiner over a row mask ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A demo-like world: the synthetic world's 24 countries, a zero-shot `tiny` bundle, a gallery of its
    train photos (val photos choose the refinement mode), and the test photos' embeddings."""
    import pandas as pd

    from worlds import world_bundle

    from pigeon.indexing import build_index
    from pigeon.predictor import Predictor

    root = tmp_path_factory.mktemp("within")
    manifest, df, bpath, _ = world_bundle(root, n_images=240, image_size=48, seed=7, min_size=8, max_size=16)
    build_index(manifest, bpath, progress=False, batch_size=60)
    pred = Predictor.from_bundle(bpath)
    test = df[df["split"] == "test"].reset_index(drop=True)
    emb = pred.embed([str(root / "world" / p) for p in test["image"]])
    assert test["country"].nunique() >= 5 and isinstance(test, pd.DataFrame)
    return root, manifest, df, bpath, pred, test, emb


def test_refiner_among_scans_only_the_rows_kept(world):
    *_, pred, test, emb = world
    gal = pred.gallery
    probs = pred.cell_probs(emb)
    frame = gal.gallery.frame
    same = gal.among(np.ones(len(frame), bool)).answer(emb, probs, pred.refine)
    base = gal.answer(emb, probs, pred.refine)
    assert np.array_equal(same.lat, base.lat) and np.array_equal(same.neighbour_ids, base.neighbour_ids)
    keep = np.arange(len(frame)) % 2 == 0
    for mode in ("cluster+nn", "nn"):
        import dataclasses

        r = gal.among(keep).answer(emb, probs, dataclasses.replace(pred.refine, mode=mode))
        rows = r.neighbour_rows[r.neighbour_rows >= 0]
        assert len(rows) and keep[rows].all()        # every neighbour is a kept photo
    assert gal.refiner.gk_order.size == len(frame)  # the original is untouched


# -- the headline test --------------------------------------------------------------------------
def test_within_true_country_is_always_right_and_no_farther(world):
    *_, pred, test, emb = world
    truth_lat, truth_lon = test["lat"].to_numpy(), test["lon"].to_numpy()
    plain = pred.format(pred.predict_embeddings(emb, top_k=5), top_k=5)
    lat, lon = np.zeros(len(test)), np.zeros(len(test))
    for iso in test["country"].unique():
        idx = np.flatnonzero(test["country"].to_numpy() == iso)
        p = pred.predict_embeddings(emb[idx], top_k=5, options=AnswerOptions(within=parse_area(iso)))
        assert np.allclose(p["probs"].sum(axis=1), 1, atol=1e-5) and np.allclose(p["country_probs"].sum(axis=1), 1, atol=1e-5)
        assert np.allclose(p["admin1_probs"].sum(axis=1), 1, atol=1e-5)
        comp = pred.cells.composition("country")
        share = comp[comp["iso_a2"] == iso].groupby("cell_id")["share"].sum().reindex(range(pred.n_cells), fill_value=0).to_numpy()
        assert (p["probs"][:, share == 0] == 0).all() and (p["probs"][:, share > 0] > 0).all()   # cells outside: 0
        # the rest renormalised, a cell cut by the border keeping its share of training points inside
        raw = pred.cell_probs(emb[idx]) * share
        assert np.allclose(p["probs"], raw / raw.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-7)
        country = _country(iso)
        for i, a in zip(idx, pred.format(p, top_k=5)):
            assert a["countries"][0]["iso_a2"] == iso and {c["iso_a2"] for c in a["countries"]} == {iso}
            assert a["countries"][0]["probability"] == pytest.approx(1.0, abs=1e-5)
            assert country.intersects(shapely.Point(a["lon"], a["lat"])), (iso, a["lat"], a["lon"])   # never outside
            assert a["region_at_answer"]["iso_a2"] == iso and a["within"]["codes"] == [iso]
            assert [c["cell_id"] for c in a["top_cells"]] == [c for c in np.argsort(-p["probs"][i == idx][0], kind="stable")[:5] if share[c] > 0]
            assert a["confidence"] == pytest.approx(a["top_cells"][0]["probability"], rel=1e-5)
            assert 0 < a["radius_km_50"] <= a["radius_km_90"]
            for nb in a["refinement"]["neighbours"]:   # refinement used only photos inside: their region's code
                assert bundled.admin1()["iso_a2"][_region(nb["lat"], nb["lon"])] == iso
            lat[i], lon[i] = a["lat"], a["lon"]
    km = haversine_km(lat, lon, truth_lat, truth_lon)
    km_plain = haversine_km(np.array([a["lat"] for a in plain]), np.array([a["lon"] for a in plain]), truth_lat, truth_lon)
    plain_acc = np.mean([a["countries"][0]["iso_a2"] for a in plain] == test["country"].to_numpy())
    assert plain_acc < 1.0            # the world is hard enough for the area to matter
    assert np.median(km) <= np.median(km_plain)


def _region(lat, lon) -> int:
    """The bundled admin-1 row at a point, by the rule photos are placed with (`region_index`)."""
    from pigeon.metrics import region_index

    return int(region_index(np.atleast_1d(lat), np.atleast_1d(lon))[0][0])


def test_admin1_code_and_a_drawn_polygon(world):
    root, manifest, df, bpath, pred, test, emb = world
    adm = bundled.admin1()
    frame = pred.gallery.gallery.frame
    # the admin-1 region holding the most gallery photos, by its ISO 3166-2 code
    from pigeon.metrics import region_index

    rows = region_index(frame["lat"].to_numpy(), frame["lon"].to_numpy())[0]
    top = np.bincount(rows[adm["iso_3166_2"].to_numpy()[rows] != ""]).argmax()
    code, name = adm["iso_3166_2"][top], adm["admin1"][top]
    p = pred.predict_embeddings(emb, top_k=5, options=AnswerOptions(within=parse_area(code.lower())))
    region = adm.geometry.values[top]
    for a in pred.format(p, top_k=5):
        assert region.intersects(shapely.Point(a["lon"], a["lat"]))
        assert [x["name"] for x in a["admin1"]] == [name] and a["admin1"][0]["probability"] == pytest.approx(1.0, abs=1e-5)
        assert [c["iso_a2"] for c in a["countries"]] == [adm["iso_a2"][top]]
        assert all(_region(nb["lat"], nb["lon"]) == top for nb in a["refinement"]["neighbours"])

    # a box over the western half of the best-covered country's gallery photos: it cuts cells
    iso = frame.assign(c=adm["iso_a2"].to_numpy()[rows])["c"].value_counts().index[0]
    mine = frame[adm["iso_a2"].to_numpy()[rows] == iso]
    x0, x1 = mine["lon"].min() - 0.01, mine["lon"].median()
    box = _box(x0, mine["lat"].min() - 0.01, x1, mine["lat"].max() + 0.01)
    area = parse_area(json.dumps({"type": "Feature", "geometry": box}))
    p = pred.predict_embeddings(emb, top_k=5, options=AnswerOptions(within=area))
    poly = shapely.geometry.shape(box)
    for a in pred.format(p, top_k=5):
        assert poly.intersects(shapely.Point(a["lon"], a["lat"])) and a["within"]["geojson"] is True
        assert all(poly.intersects(shapely.Point(nb["lon"], nb["lat"])) for nb in a["refinement"]["neighbours"])
        assert a["refinement"]["moved_into_area_km"] >= 0
    assert np.allclose(p["probs"].sum(axis=1), 1, atol=1e-5) and np.allclose(p["country_probs"].sum(axis=1), 1, atol=1e-5)
    # the weight rule, by hand for every cell: (photos inside + land share inside) / (photos + 1)
    r = restrict(area, pred.cells, pred.cells.composition("admin1"), frame)
    inside = shapely.intersects_xy(poly, frame["lon"].to_numpy(), frame["lat"].to_numpy())
    n = np.bincount(frame["cell"], minlength=pred.n_cells)
    n_in = np.bincount(frame["cell"][inside], minlength=pred.n_cells)
    land = np.array([shapely.intersection(g, poly).area / g.area if g.area else 0.0 for g in pred.cells.geoms])
    cut = (n_in > 0) & (n_in < n)
    assert cut.any()                                   # the box does cut cells
    assert np.allclose(r.weight[n > 0], ((n_in + land) / (n + 1))[n > 0], atol=0.02)   # land share: planar vs equal-area
    assert np.array_equal(r.photos, inside)
    assert (p["probs"][:, r.weight == 0] == 0).all()


def test_an_area_with_no_cell_is_refused(world):
    *_, pred, test, emb = world
    for spec in ("IS", json.dumps(_box(-150, -10, -140, 0))):   # Iceland: no photo of the world; the Pacific
        with pytest.raises(AreaError, match="holds no cell of this bundle"):
            pred.predict_embeddings(emb[:2], options=AnswerOptions(within=parse_area(spec)))


def test_places_and_answers_without_within_unchanged(world):
    *_, pred, test, emb = world
    iso = test["country"][0]
    pp = pred.predict_places(emb[:3], np.zeros(3), options=AnswerOptions(within=parse_area(iso)))
    [a] = pred.format_places(pp)
    assert a["countries"][0]["iso_a2"] == iso and _country(iso).intersects(shapely.Point(a["lon"], a["lat"]))
    plain = pred.format(pred.predict_embeddings(emb[:3]))
    assert all("within" not in x and "moved_into_area_km" not in x["refinement"] for x in plain)
    # the options take the area's text too (parsed, cached): the same answers
    by_text = pred.predict_embeddings(emb[:3], options=AnswerOptions(within=iso.lower()))
    by_area = pred.predict_embeddings(emb[:3], options=AnswerOptions(within=parse_area(iso)))
    assert np.array_equal(by_text["lat"], by_area["lat"]) and np.array_equal(by_text["probs"], by_area["probs"])


# -- the CLI --------------------------------------------------------------------------------------------
def test_cli_within(world, tmp_path, capsys):
    from worlds import cli

    root, manifest, df, bpath, pred, test, emb = world
    img, iso = str(root / "world" / test["image"][0]), test["country"][0]
    out = tmp_path / "r.geojson"
    assert cli(["locate", img, "--bundle", str(bpath), "--within", iso.lower(), "--out", str(out)]) == 0
    [f] = [f for f in json.loads(out.read_text())["features"] if f["properties"]["kind"] == "answer"]
    assert f["properties"]["within"]["codes"] == [iso] and _country(iso).intersects(shapely.geometry.shape(f["geometry"]))
    area = tmp_path / "area.geojson"
    box = _box(test["lon"][0] - 3, test["lat"][0] - 3, test["lon"][0] + 3, test["lat"][0] + 3)
    area.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": box}]}))
    capsys.readouterr()
    assert cli(["locate", img, "--bundle", str(bpath), "--within", str(area)]) == 0
    lat, lon = map(float, capsys.readouterr().out.strip().splitlines()[-1].split("\t")[1:3])
    assert shapely.geometry.shape(box).intersects(shapely.Point(lon, lat))
    for bad, needle in (("XX", "XX is not an ISO 3166-1"), ("IS", "holds no cell of this bundle"), (str(tmp_path / "gone.geojson"), "does not exist")):
        assert cli(["locate", img, "--bundle", str(bpath), "--within", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


# -- the API (the toy bundle: eight box cells in eight countries, no gallery) ------------------------------
@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from api_support import tiny_predictor
    from pigeon.api import Settings, create_app

    with TestClient(create_app(tiny_predictor(), Settings(warmup=False))) as c:
        yield c


def _locate(client, route="/locate", files=None, **form):
    from api_support import encode, photo

    files = files or [("image" if route == "/locate" else "images", ("p.jpg", encode(photo(seed=5)), "image/jpeg"))]
    return client.post(route, files=files, data=form)


def test_api_within_codes_geojson_and_errors(client):
    from api_support import TOY_CELLS, encode, photo, tiny_predictor

    boxes = {c[1]: shapely.box(*c[5:]) for c in TOY_CELLS}
    plain = _locate(client).json()
    assert "within" not in plain and "moved_into_area_km" not in plain["refinement"]
    for code in ("ke", "JP,AU", "US-CO"):
        r = _locate(client, within=code)
        assert r.status_code == 200, r.text
        a = r.json()
        inside = [iso for iso, b in boxes.items() if b.intersects(shapely.Point(a["lon"], a["lat"]))]
        assert inside and parse_area(code).contains(a["lat"], a["lon"]) and a["within"]["codes"] == list(parse_area(code).codes)
        assert {c["iso_a2"] for c in a["countries"]} <= set(parse_area(code).countries or ["US"])
        assert sum(c["probability"] for c in a["countries"]) == pytest.approx(1, abs=1e-5)
        assert sum(c["probability"] for c in a["top_cells"]) == pytest.approx(1, abs=1e-5)   # all the area's cells listed
    # a drawn polygon cutting Norway's box west of its centre (10.25 E): the centre moves inside, by 13 km
    box = _box(9.0, 60.5, 10.0, 62.0)
    want = tiny_predictor().locate([photo(seed=5)], options=AnswerOptions(within=parse_area(json.dumps(box))))[0]
    r = _locate(client, files=[("image", ("p.jpg", encode(photo(seed=5)), "image/jpeg")),
                               ("within_geojson", ("area.geojson", json.dumps(box).encode(), "application/geo+json"))])
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["lon"] <= 10.0 and a["lat"] == pytest.approx(61.25) and a["within"]["geojson"] is True
    assert a["refinement"]["moved_into_area_km"] == pytest.approx(haversine_km(61.25, 10.25, a["lat"], a["lon"]), rel=1e-3)
    assert a["refinement"]["moved_into_area_km"] == pytest.approx(13.4, abs=0.2) and a["countries"][0]["iso_a2"] == "NO"
    assert _locate(client, within=json.dumps(box)).json()["lon"] == pytest.approx(a["lon"])   # the same area as text
    assert a["lon"] == pytest.approx(want["lon"])                                     # the Predictor's own answer
    # the batch route takes it too
    b = _locate(client, "/locate/batch", files=[("images", (f"{i}.jpg", encode(photo(seed=i)), "image/jpeg")) for i in range(3)], within="IN")
    assert b.status_code == 200 and all(x["result"]["countries"][0]["iso_a2"] == "IN" and x["result"]["within"]["codes"] == ["IN"]
                                        for x in b.json()["results"])
    # one line, 422, naming the code
    for route in ("/locate", "/locate/batch"):
        for spec, needle in (("XX", "XX is not an ISO 3166-1"), ("HR", "the area HR holds no cell of this bundle"),
                             ('{"type": "Point", "coordinates": [1, 2]}', "not an area")):
            r = _locate(client, route, within=spec)
            assert r.status_code == 422 and r.json()["error"] == "bad_area" and needle in r.json()["detail"], r.text
    r = _locate(client, files=[("image", ("p.jpg", encode(photo(seed=5)), "image/jpeg")), ("within_geojson", ("a.json", b"{}", "application/json"))],
                within="KE")
    assert r.status_code == 422 and "not both" in r.json()["detail"]


def test_openapi_documents_within(client):
    schema = client.get("/openapi.json").json()
    for route in ("/locate", "/locate/batch"):
        ref = schema["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
        props = schema["components"]["schemas"][ref]["properties"]
        assert "ISO 3166-2" in props["within"]["description"] and "GeoJSON" in props["within_geojson"]["description"]
    assert "bad_area" in schema["paths"]["/locate"]["post"]["responses"]["422"]["description"]
    assert "`within`" in schema["components"]["schemas"]["Location"]["description"]


def test_regions_respect_the_area(world):
    """With `within` and `regions`, the credible regions lie in the area (a cell cut by its border gives only
    its part inside), their cells are cells the area kept, and the 90% region holds the 50% one."""
    root, manifest, df, bpath, pred, test, emb = world
    frame = pred.gallery.gallery.frame
    mine = frame[frame["lon"] <= frame["lon"].median()]
    box = _box(mine["lon"].min() - 0.01, mine["lat"].min() - 0.01, mine["lon"].max() + 0.01, mine["lat"].max() + 0.01)
    poly = shapely.geometry.shape(box)
    area = parse_area(json.dumps(box))
    options = AnswerOptions(within=area, regions=True)
    p = pred.predict_embeddings(emb, top_k=5, options=options)
    for i, a in enumerate(pred.format(p, top_k=5, options=options)):
        r50, r90 = (shapely.geometry.shape(a["regions"][k]["geometry"]) for k in ("50", "90"))
        assert poly.buffer(1e-3).covers(r90) and r90.buffer(0.05).covers(r50)
        assert (p["probs"][i][a["regions"]["90"]["cell_ids"]] > 0).all()   # only cells the area kept
        assert 0 < a["regions"]["50"]["area_km2"] <= a["regions"]["90"]["area_km2"] <= area.area_km2 * 1.01
