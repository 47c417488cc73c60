"""Every endpoint of the HTTP service through the real app, on a real tiny zero-shot bundle."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pigeon.api import Settings, create_app
from api_support import BlockingPredictor, TOY_CELLS, encode, photo, tiny_bundle, tiny_predictor
from pigeon.core.errors import UserError

torch.set_num_threads(2)
COUNTRIES = {c[0] for c in TOY_CELLS}


@pytest.fixture(scope="module")
def client():
    app = create_app(tiny_bundle(), Settings())  # the real loading path, from the folder
    with TestClient(app) as c:
        yield c


def _post(client, data: bytes, name="p.jpg", ctype="image/jpeg", **form):
    return client.post("/locate", files={"image": (name, data, ctype)}, data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()})


def test_locate_matches_the_predictor(client):
    im = photo(seed=1)
    r = _post(client, encode(im, "PNG"), "x.png", "image/png", top_k=4)
    assert r.status_code == 200, r.text
    a = r.json()
    direct = tiny_predictor().locate([im], top_k=4)[0]
    assert a["lat"] == pytest.approx(direct["lat"]) and a["lon"] == pytest.approx(direct["lon"])
    assert a["confidence"] == pytest.approx(direct["confidence"], rel=1e-5)
    assert [c["cell_id"] for c in a["top_cells"]] == [c["cell_id"] for c in direct["top_cells"]]
    probs = [c["probability"] for c in a["top_cells"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert a["confidence"] == pytest.approx(probs[0], rel=1e-5)
    assert {c["name"] for c in a["countries"]} <= COUNTRIES
    assert 0 <= a["radius_km_50"] <= a["radius_km_90"]
    assert a["refinement"]["mode"] == "cell"
    assert a["exif_gps_present"] is False
    assert a["image"] == {"format": "png", "width": 96, "height": 72}
    assert a["timings_ms"]["total_ms"] >= a["timings_ms"]["decode_ms"] >= 0
    assert "explain" not in a or a["explain"] is None
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("k,status", [(1, 200), (8, 200), (0, 422), (51, 422)])
def test_top_k_bounds(client, k, status):
    r = _post(client, encode(photo()), top_k=k)
    assert r.status_code == status, r.text
    if status == 200:
        assert len(r.json()["top_cells"]) == min(k, len(TOY_CELLS))
    else:
        assert r.json()["error"] == "validation_error"


def test_explain_gives_cues_and_heatmap(client):
    r = _post(client, encode(photo(160, 120, seed=3)), explain=True, top_k=3)
    assert r.status_code == 200, r.text
    a = r.json()
    ex = a["explain"]
    cues = ex["cues"]
    assert set(cues) == {"driving_side", "hemisphere", "country"}
    for rows in cues.values():
        assert sum(x["probability"] for x in rows) == pytest.approx(1.0, abs=1e-3)
    assert {x["label"] for x in cues["driving_side"]} == {"left", "right"}
    assert {x["label"] for x in cues["country"]} == {c["name"] for c in a["countries"]}
    hm = ex["heatmap"]
    assert hm["method"] == "grad-cam" and hm["layer"].endswith("ln_1")  # tiny is a ViT
    assert hm["cell_id"] == a["top_cells"][0]["cell_id"]
    png = Image.open(io.BytesIO(base64.b64decode(hm["png_base64"])))
    assert png.format == "PNG" and png.size == (hm["width"], hm["height"]) == (120, 120)
    assert np.asarray(png).std() > 1  # not a blank image


def _with_exif(im: Image.Image, gps: bool = False, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    if gps:
        exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    return encode(im, "PNG", exif=exif)


def test_exif_gps_is_reported_but_never_used(client):
    im = photo(seed=5)
    plain = _post(client, encode(im, "PNG"), "a.png", "image/png").json()
    tagged = _post(client, _with_exif(im, gps=True), "b.png", "image/png").json()
    assert plain["exif_gps_present"] is False and tagged["exif_gps_present"] is True
    for key in ("lat", "lon", "confidence"):
        assert tagged[key] == pytest.approx(plain[key])


def test_exif_orientation_is_applied(client):
    im = photo(120, 80, seed=7)
    r = _post(client, _with_exif(im, orientation=6), "r.png", "image/png", top_k=8)
    assert r.status_code == 200
    a = r.json()
    assert (a["image"]["width"], a["image"]["height"]) == (80, 120)
    upright = tiny_predictor().locate([im.transpose(Image.Transpose.ROTATE_270)], top_k=8)[0]
    probs = {c["cell_id"]: c["probability"] for c in a["top_cells"]}
    assert probs == pytest.approx({c["cell_id"]: c["probability"] for c in upright["top_cells"]}, rel=1e-4)


def test_batch_matches_single_answers(client):
    ims = [photo(seed=s) for s in (11, 12, 13)]
    files = [("images", (f"{i}.jpg", encode(im, "PNG"), "image/png")) for i, im in enumerate(ims)]
    r = client.post("/locate/batch", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["0.jpg", "1.jpg", "2.jpg"]
    for x, im in zip(res, ims):
        single = tiny_predictor().locate([im], top_k=2)[0]
        assert [c["cell_id"] for c in x["result"]["top_cells"]] == [c["cell_id"] for c in single["top_cells"]]
        assert x["result"]["confidence"] == pytest.approx(single["confidence"], rel=1e-4)


def test_batch_names_the_bad_image(client):
    """One bad file no longer fails the batch: it gets its own error entry (with the status it would have
    had alone), the others are answered, HTTP 200. With no usable file, the answer is that error."""
    good = encode(photo(), "PNG")
    files = [("images", ("good.png", good, "image/png")), ("images", ("bad.gif", encode(photo(), "GIF"), "image/gif"))]
    r = client.post("/locate/batch", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["filename"] == "good.png" and "error" not in first
    assert [c["cell_id"] for c in first["result"]["top_cells"]] == [c["cell_id"] for c in tiny_predictor().locate([photo()], top_k=2)[0]["top_cells"]]
    assert second["filename"] == "bad.gif" and "result" not in second
    assert second["error"]["status"] == 415 and second["error"]["error"] == "unsupported_media_type"
    assert "images[1] (bad.gif)" in second["error"]["detail"]
    r = client.post("/locate/batch", files=[("images", ("a.gif", encode(photo(), "GIF"), "image/gif")), ("images", ("b.bmp", encode(photo(), "BMP"), "image/bmp"))])
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    assert "images[0] (a.gif)" in r.json()["detail"] and "images[1] (b.bmp)" in r.json()["detail"]
    r = client.post("/locate/batch", files=[("images", ("e.jpg", b"", "image/jpeg")), ("images", ("t.txt", b"hello", "text/plain"))])
    assert r.status_code == 400 and r.json()["error"] == "bad_image"  # no common status: 400


def test_every_route_takes_the_one_path(client):
    """/locate, /locate with same_place, /locate/batch and /locate/batch with `place` labels are one path
    (Service.locate): the same photo gets the same answer from each, and two views sent as one place
    get the same answer from /locate and from a batch."""
    data = encode(photo(seed=21), "PNG")
    part = ("a.png", data, "image/png")
    one = _post(client, data, "a.png", "image/png", top_k=3).json()
    same = _post(client, data, "a.png", "image/png", top_k=3, same_place=True).json()
    batch = client.post("/locate/batch", files=[("images", part)], data={"top_k": "3"}).json()
    placed = client.post("/locate/batch", files=[("images", part)], data={"top_k": "3", "place": "here"}).json()
    assert placed["results"][0]["place"] == "here" and placed["results"][0]["filenames"] == ["a.png"]
    for a in (same, batch["results"][0]["result"], placed["results"][0]["result"]):
        assert (a["lat"], a["lon"]) == pytest.approx((one["lat"], one["lon"]))
        assert a["confidence"] == pytest.approx(one["confidence"], rel=1e-5)
        assert [c["cell_id"] for c in a["top_cells"]] == [c["cell_id"] for c in one["top_cells"]]
        assert a["image"] == one["image"] == {"format": "png", "width": 96, "height": 72}
    for t in (one["timings_ms"], same["timings_ms"]):
        assert {"decode_ms", "locate_ms", "total_ms"} <= set(t)
    assert set(batch["timings_ms"]) == set(placed["timings_ms"]) == {"decode_ms", "locate_ms", "total_ms"}
    two = [part, ("b.jpg", encode(photo(120, 80, seed=22)), "image/jpeg")]
    r = client.post("/locate", files=[("image", p) for p in two], data={"same_place": "true", "top_k": "3", "combine": "both"})
    b = client.post("/locate/batch", files=[("images", p) for p in two], data={"place": ["p", "p"], "top_k": "3", "combine": "both"})
    assert r.status_code == b.status_code == 200, (r.text, b.text)
    entry = b.json()["results"][0]
    assert entry["filenames"] == ["a.png", "b.jpg"] and entry["result"]["views"] == 2
    _same({k: v for k, v in entry["result"].items() if k != "timings_ms"}, _answer(r))


class _CountingForwards:
    """The real predictor, recording how many images each backbone forward of a request (`embed`) gets."""

    def __init__(self, inner):
        self.inner, self.forwards = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images):
        self.forwards.append(len(images))
        return self.inner.embed(images)


def test_one_forward_per_request_over_the_usable_images():
    pred = _CountingForwards(tiny_predictor())
    good = [("images", (f"{i}.png", encode(photo(seed=30 + i), "PNG"), "image/png")) for i in range(3)]
    gif = ("images", ("bad.gif", encode(photo(), "GIF"), "image/gif"))
    with TestClient(create_app(pred, Settings(warmup=False))) as c:
        r = c.post("/locate/batch", files=[good[0], gif, good[1], good[2]])
        assert r.status_code == 200 and [("result" in e) for e in r.json()["results"]] == [True, False, True, True]
        r = c.post("/locate/batch", files=[good[0], gif, good[1], good[2]], data={"place": ["a", "a", "b", "b"]})
        assert r.status_code == 200 and [("result" in e) for e in r.json()["results"]] == [False, True]  # place a's good view is not embedded
        r = c.post("/locate", files=[("image", f[1]) for f in good], data={"same_place": "true"})
        assert r.status_code == 200 and r.json()["views"] == 3
    assert pred.forwards == [3, 2, 3]


def test_request_pixel_budget_is_the_uploads_module_s():
    """`uploads.check_request_pixels` owns the per-request budget: 413 naming the images' total and the
    limit; the service refuses with exactly its error."""
    from pigeon.api.uploads import UploadError, check_request_pixels, probe_image

    datas = [encode(photo(100, 50, seed=i), "PNG") for i in range(3)]
    probed = [probe_image(d, label=f"images[{i}]") for i, d in enumerate(datas)]
    assert check_request_pixels(probed, 15_000) == 15_000 and check_request_pixels([], 1) == 0
    with pytest.raises(UploadError) as e:
        check_request_pixels(probed, 14_999)
    assert e.value.status == 413 and e.value.code == "too_many_pixels"
    assert "the 3 images of this request are 15000 pixels together" in e.value.detail
    assert "the limit is 14999 pixels per request" in e.value.detail
    with TestClient(create_app(tiny_predictor(), Settings(max_request_pixels=14_999, warmup=False))) as c:
        r = c.post("/locate/batch", files=[("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)])
        assert r.status_code == 413 and r.json() == {"error": "too_many_pixels", "detail": e.value.detail}
        r = c.post("/locate", files=[("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)], data={"same_place": "true"})
        assert r.status_code == 413 and r.json() == {"error": "too_many_pixels", "detail": e.value.detail}


def test_batch_item_errors_in_the_schema(client):
    item = client.get("/openapi.json").json()["components"]["schemas"]["BatchResponse"]["properties"]["results"]["items"]
    refs = {x["$ref"].rsplit("/", 1)[1] for x in item["anyOf"]}
    assert refs == {"BatchItem", "BatchItemError"}


def test_health_version_cells(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["cells"] == len(TOY_CELLS) and h["in_flight"] == 0
    v = client.get("/version").json()
    assert v["backbone"] == "tiny"
    assert {"cells", "head"} <= set(v["manifest"]["parts"])
    r = client.get("/cells")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/geo+json")
    gj = r.json()
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(TOY_CELLS)
    f0 = gj["features"][0]
    assert f0["properties"]["cell_id"] == 0 and f0["properties"]["country"] == TOY_CELLS[0][0]
    lons = [p[0] for p in f0["geometry"]["coordinates"][0]]
    assert min(lons) == pytest.approx(TOY_CELLS[0][5]) and max(lons) == pytest.approx(TOY_CELLS[0][7])
    assert client.get("/cells").content == r.content  # cached


def test_page_docs_and_json_errors(client):
    assert "<div id=\"map\"" in client.get("/").text
    assert client.get("/static/world.json").json()["type"] == "FeatureCollection"
    admin1 = client.get("/static/admin1.json").json()
    assert admin1["type"] == "FeatureCollection" and len(admin1["features"]) > 3000
    assert {"admin1", "country"} <= set(admin1["features"][0]["properties"])
    assert client.get("/static/vendor/leaflet/leaflet.js").text.startswith("/* @preserve")  # vendored, served offline
    assert client.get("/static/vendor/leaflet/images/marker-icon.png").headers["content-type"] == "image/png"
    assert client.get("/openapi.json").json()["paths"]["/locate"]["post"]
    for method, path, status in [("GET", "/nope", 404), ("DELETE", "/locate", 405), ("GET", "/locate", 405), ("GET", "/static/nope.js", 404)]:
        r = client.request(method, path)
        assert r.status_code == status
        body = r.json()
        assert set(body) == {"error", "detail"} and body["error"] in ("not_found", "method_not_allowed")


def test_api_key(monkeypatch):
    monkeypatch.setenv("PIGEON_API_KEY", "s3cret")
    settings = Settings.from_env(warmup=False)
    assert settings.api_key == "s3cret"
    with TestClient(create_app(tiny_predictor(), settings)) as c:
        data = encode(photo())
        r = _post(c, data)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert c.post("/locate", files={"image": ("p.jpg", data, "image/jpeg")}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/locate", files={"image": ("p.jpg", data, "image/jpeg")}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/version").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        assert c.get("/cells").status_code == 401 and c.get("/cells", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/static/app.js").status_code == 200 and c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("kw,words", [
    ({"max_concurrency": 0}, ["max_concurrency", "PIGEON_MAX_CONCURRENCY", "= 0", "integer >= 1"]),
    ({"max_upload_bytes": 0}, ["max_upload_bytes", "PIGEON_MAX_UPLOAD_BYTES", "integer > 0"]),
    ({"max_queue": "abc"}, ["max_queue", "PIGEON_MAX_QUEUE", "'abc'", "integer >= 0"]),
    ({"max_top_k": -3, "min_side": 0}, ["max_top_k", "min_side", ">= 1"]),
    ({"cells_simplify": -1}, ["cells_simplify", "number >= 0"]),
    ({"api_key": ""}, ["api_key", "PIGEON_API_KEY", "non-empty"]),
    ({"api_key": "   "}, ["api_key", "non-empty"]),
    ({"api_key": "s3cret\n"}, ["api_key", "printable ASCII"]),
    ({"refine": "nearest"}, ["--refine nearest", "PIGEON_REFINE", "cluster+nn"]),
    ({"max_refinement_km": -5}, ["PIGEON_MAX_REFINEMENT_KM", "> 0"]),
    ({"max_concurency": 2}, ["unknown setting max_concurency", "max_concurrency"]),
])
def test_bad_settings_are_one_line_user_errors(kw, words):
    with pytest.raises(UserError) as e:
        Settings(**kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert "s3cret" not in msg  # a key is never echoed


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("PIGEON_MAX_QUEUE", "3")
    monkeypatch.setenv("PIGEON_CORS_ORIGINS", "http://a.org, http://b.org,")
    monkeypatch.setenv("PIGEON_MAX_REFINEMENT_KM", "off")
    monkeypatch.setenv("PIGEON_WARMUP", "no")
    monkeypatch.setenv("PIGEON_MAX_UPLOAD_BYTES", "")  # set but empty = unset (docker compose's ${VAR:-})
    s = Settings.from_env(max_batch=4, max_queue=None)  # None overrides are ignored
    assert (s.max_queue, s.max_batch, s.warmup, s.api_key, s.max_upload_bytes) == (3, 4, False, None, 20 * 1024 * 1024)
    assert s.cors_origins == ["http://a.org", "http://b.org"] and s.max_refinement_km == float("inf")
    assert s.refine_config().guard_km is None
    assert Settings(max_queue=5).max_queue == 5  # keywords win over the environment
    assert "k3y" not in repr(Settings(api_key="k3y"))
    monkeypatch.setenv("PIGEON_MAX_QUEUE", "abc")
    with pytest.raises(UserError, match=r"^setting max_queue \(env PIGEON_MAX_QUEUE\) = 'abc': give an integer >= 0$"):
        Settings.from_env()
    monkeypatch.setenv("PIGEON_MAX_QUEUE", "2")
    monkeypatch.setenv("PIGEON_API_KEY", "  ")
    with pytest.raises(UserError, match="PIGEON_API_KEY"):
        Settings.from_env()


def test_empty_api_key_variable_is_refused(monkeypatch):
    """PIGEON_API_KEY="" used to count as unset, silently turning auth off: now one line naming it."""
    monkeypatch.setenv("PIGEON_API_KEY", "")
    for make in (Settings.from_env, Settings):
        with pytest.raises(UserError) as e:
            make()
        assert str(e.value) == "PIGEON_API_KEY is set but empty: unset it for no auth, or give a key"
    assert Settings(api_key="k3y").api_key == "k3y"  # a key given in code wins over the environment
    monkeypatch.delenv("PIGEON_API_KEY")
    assert Settings.from_env().api_key is None


def test_head_health(client):
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""


def test_query_string_options_are_refused_by_name(client):
    """top_k/explain in the query string used to be silently ignored (top_k 5, no explanation): now 422 naming them."""
    r = client.post("/locate?top_k=1&explain=true", files={"image": ("p.jpg", encode(photo()), "image/jpeg")})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error" and [d["loc"] for d in body["detail"]] == [["query", "top_k"], ["query", "explain"]]
    assert "form field" in body["detail"][0]["msg"]
    r = client.post("/locate/batch?top_k=1", files=[("images", ("p.jpg", encode(photo()), "image/jpeg"))])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "top_k"]


def test_cli_serve_refuses_a_bad_setting_with_exit_2():
    env = {**__import__("os").environ, "PIGEON_MAX_CONCURRENCY": "0"}
    r = subprocess.run([sys.executable, "-c", "from pigeon.cli import main; main()", "serve", "--bundle", str(tiny_bundle())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "PIGEON_MAX_CONCURRENCY" in r.stderr and ">= 1" in r.stderr and "Traceback" not in r.stderr


def test_cors_origins():
    with TestClient(create_app(tiny_predictor(), Settings(cors_origins=["http://example.org"], warmup=False))) as c:
        r = c.options("/locate", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.org"
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers




def test_over_capacity_answers_503_with_retry_after():
    pred = BlockingPredictor(tiny_predictor())
    app = create_app(pred, Settings(max_concurrency=1, max_queue=0, retry_after_s=2, warmup=False))
    data = encode(photo())

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.post("/locate", files={"image": ("a.jpg", data, "image/jpeg")}))
            await asyncio.get_running_loop().run_in_executor(None, pred.entered.wait, 30)
            second = await c.post("/locate", files={"image": ("b.jpg", data, "image/jpeg")})
            health = await c.get("/health")
            pred.release.set()
            return await first, second, health

    first, second, health = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "2"
    assert second.json()["error"] == "overloaded"
    assert health.json()["in_flight"] == 1


def test_server_fault_is_a_json_500_and_logged(caplog):
    app = create_app(BlockingPredictor(tiny_predictor(), fail=True), Settings(warmup=False))
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.INFO, logger="pigeon.api"):
        r = _post(c, encode(photo()))
        assert r.status_code == 500 and r.json() == {"error": "internal_error", "detail": "unexpected server error; it has been logged"}
    access = [json.loads(m.getMessage()) for m in caplog.records if m.name == "pigeon.api.access"]
    assert access and access[-1]["path"] == "/locate" and access[-1]["status"] == 500
    assert any("boom" in m.getMessage() for m in caplog.records if m.name == "pigeon.api")


def test_access_log_is_json(client, caplog):
    with caplog.at_level(logging.INFO, logger="pigeon.api.access"):
        client.get("/health", headers={"X-Request-Id": "abc123"})
    line = json.loads([m for m in caplog.records if m.name == "pigeon.api.access"][-1].getMessage())
    assert line["request_id"] == "abc123" and line["status"] == 200 and line["method"] == "GET" and line["duration_ms"] >= 0


def test_refuses_incomplete_or_mismatched_bundles(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_app(tmp_path / "nope")
    src = tiny_bundle()
    no_head = tmp_path / "no_head"
    shutil.copytree(src, no_head)
    from pigeon.bundle import Bundle as _B

    _B(no_head).part_path("head").unlink()
    with pytest.raises(UserError, match="head.safetensors"):
        create_app(no_head)
    other = tmp_path / "other_cells"
    shutil.copytree(src, other)
    from api_support import toy_cells
    from pigeon.bundle import Bundle

    b = Bundle(other)
    cells = toy_cells()
    cells.gdf.loc[0, "count"] = 99  # different content -> different hash
    b.write_part("cells", lambda tmp: cells.save(tmp), n_cells=len(cells))
    with pytest.raises(UserError, match="other cells"):
        create_app(other)


def test_cli_serve_refuses_a_missing_bundle_with_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from pigeon.cli import main; main()", "serve", "--bundle", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120, cwd=str(__import__("api_support").Path(__file__).resolve().parents[1]))
    assert r.returncode == 2, r.stderr
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def _cell_logits(embed_dim: int, n: int = 5, seed: int = 0):
    protos = torch.nn.functional.normalize(torch.randn(n, embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return lambda e: 30 * torch.nn.functional.normalize(e, dim=-1) @ protos.T


def test_heatmap_on_a_cnn_backbone():
    """`lite` (EfficientNet-Lite0 image tower): Grad-CAM on its last feature map."""
    from pigeon.backbones import create_backbone
    from pigeon.explain import Explainer

    bb = create_backbone("lite")
    am, emb = Explainer(bb, _cell_logits(bb.embed_dim)).activation_map(photo(160, 120, seed=4), cell_id=2)
    assert am.method == "grad-cam" and am.layer == "trunk.bn2"
    assert am.heat.shape == (bb.image_size // 32, bb.image_size // 32)
    assert am.heat.min() == 0 and am.heat.max() == 1
    assert emb.shape == (bb.embed_dim,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-4


def test_heatmap_falls_back_to_gradient_times_input():
    """An image tower with no spatial map and no tokens: saliency on the pixels instead."""
    from pigeon.explain import Explainer

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))

        def encode_image(self, x, normalize=True):
            f = self.visual(x)
            return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    class BB:
        model, device, embed_dim = Flat(), "cpu", 8

        def preprocess(self, im):
            return torch.from_numpy(np.asarray(im.resize((32, 32)), dtype=np.float32).transpose(2, 0, 1) / 255)

        def encode_image(self, x, normalize=True):
            return self.model.encode_image(x, normalize)

    am, _ = Explainer(BB(), _cell_logits(8)).activation_map(photo(seed=9), cell_id=1)
    assert am.method == "grad-x-input" and am.layer is None
    assert am.heat.shape == (32, 32) and am.heat.max() == 1 and am.heat.std() > 0


class _Overlap:
    """The real predictor and explainer, counting how often a request's forward (`embed`) runs while an explanation is under way."""

    def __init__(self, inner):
        self.inner, self.explaining, self.overlaps = inner, 0, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images):
        with self.lock:
            self.overlaps += self.explaining > 0
        return self.inner.embed(images)

    def wrap(self, activation_map):
        def counted(*a, **kw):
            with self.lock:
                self.explaining += 1
            try:
                return activation_map(*a, **kw)
            finally:
                with self.lock:
                    self.explaining -= 1

        return counted


def _answer(r) -> dict:
    assert r.status_code == 200, r.text
    a = r.json()
    a.pop("timings_ms")
    heat = (a.get("explain") or {}).get("heatmap")
    if heat:  # the PNG as pixels: compared with a tolerance of one grey level
        heat["png_base64"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(heat["png_base64"]))), dtype=np.int16)
    return a


def _same(got, want, path="answer"):
    """JSON-like values equal: structure and strings exactly, numbers to 1e-5 relative, PNG pixels to 1."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (path, got, want)
        for k in want:
            _same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for j, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{path}[{j}]")
    elif isinstance(want, np.ndarray):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, path
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_explain_beside_plain_requests_is_safe_and_changes_nothing():
    """max_concurrency=4: explain=true and plain /locate requests in flight together, many times over.
    Every answer is 200, and each one equals the answer its request gets when it runs alone (the
    explainer used to hang a hook on the shared model: plain requests beside it failed with 500)."""
    pred = _Overlap(tiny_predictor())
    app = create_app(pred, Settings(max_concurrency=4, max_queue=64, warmup=False))
    svc = app.state.service
    svc.explainer.activation_map = pred.wrap(svc.explainer.activation_map)
    images = [encode(photo(112, 84, seed=40 + i)) for i in range(4)]

    async def scenario():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a fault shows as a 500, not an exception here
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            def post(i, explain):
                return c.post("/locate", files={"image": (f"{i}.jpg", images[i], "image/jpeg")}, data={"top_k": "3", "explain": str(explain).lower()})

            alone = {(i, ex): _answer(await post(i, ex)) for i in range(len(images)) for ex in (False, True)}
            jobs = [(i, ex) for _ in range(6) for i in range(len(images)) for ex in (False, True)]
            together = await asyncio.gather(*(post(i, ex) for i, ex in jobs))
            return alone, jobs, together

    alone, jobs, together = asyncio.run(scenario())
    assert [r.status_code for r in together] == [200] * len(jobs), [r.text[:300] for r in together if r.status_code != 200][:3]
    for (i, ex), r in zip(jobs, together):
        _same(_answer(r), alone[(i, ex)])
    assert all(alone[(i, True)]["explain"]["heatmap"]["method"] == "grad-cam" for i in range(len(images)))
    assert pred.overlaps > 0, "no plain locate ran while an explanation was under way: the test proved nothing"
    assert all(p.grad is None for p in tiny_predictor().backbone.model.parameters())  # explanations write no weight gradient
