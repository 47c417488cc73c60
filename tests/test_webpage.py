"""The web page in headless Chromium: pick a photo or drop several views of one place; see one marker,
the 50%/90% circles, the top cells and the region at the answer on the Leaflet map; zoom in.

Needs the Debian packages `chromium` and `chromium-driver` (`apt-get install -y chromium
chromium-driver`); skipped with that message when they are missing.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from pigeon.api import Settings, create_app
from api_support import TOY_CELLS, encode, photo, tiny_predictor

torch.set_num_threads(2)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium not found: install it with `apt-get install -y chromium chromium-driver`",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_page(predictor):
    """The app over `predictor` in a uvicorn thread on a free port: yields its URL (the page tests' server)."""
    import uvicorn

    port = _free_port()
    app = create_app(predictor, Settings(warmup=False))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def server():
    yield from serve_page(tiny_predictor())


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pigeon-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1280,900"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _answered(browser, wait):
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("answered", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered", browser.find_element(By.ID, "status").text


def _decoded(im):
    """The photo as the server sees it: JPEG-encoded, then decoded."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(encode(im))).convert("RGB")


def _page(browser, expr: str):
    return browser.execute_script(f"const p = window.pigeonPage; return {expr};")


def _open(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-map") == "ready")
    return wait


def test_upload_shows_marker_circles_cells_and_countries(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    img = tmp_path / "street.jpg"
    img.write_bytes(encode(photo(160, 120, seed=21)))
    wait = _open(browser, server)
    assert _page(browser, "p.countries.getLayers().length") > 150  # the offline country outlines (vendored Leaflet, no tiles)
    assert browser.find_elements(By.CSS_SELECTOR, "link[href='/static/vendor/leaflet/leaflet.css']")

    browser.find_element(By.ID, "file").send_keys(str(img))
    _answered(browser, wait)

    want = tiny_predictor().locate([_decoded(photo(160, 120, seed=21))], top_k=5)[0]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-icon")) == 1
    assert _page(browser, "p.marker.getLatLng().lat") == pytest.approx(want["lat"], abs=1e-6)
    assert _page(browser, "p.marker.getLatLng().lng") == pytest.approx(want["lon"], abs=1e-6)
    assert _page(browser, "p.circle50.getRadius()") == pytest.approx(1000 * want["radius_km_50"], rel=1e-6)
    assert _page(browser, "p.circle90.getRadius()") == pytest.approx(1000 * want["radius_km_90"], rel=1e-6)

    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#country-list li")]
    assert len(items) == len(want["countries"])
    assert items[0].startswith(want["countries"][0]["name"])
    assert all(any(li.startswith(c[0]) for c in TOY_CELLS) for li in items)

    assert _page(browser, "p.cellLayers.map((l) => l.cellId)") == [c["cell_id"] for c in want["top_cells"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-cell")) == len(want["top_cells"])
    opac = _page(browser, "p.cellLayers.map((l) => l.getLayers()[0].options.fillOpacity)")
    assert opac == sorted(opac, reverse=True) and opac[0] == pytest.approx(0.65)

    heat = browser.find_element(By.ID, "heatmap")
    assert heat.get_attribute("src").startswith("data:image/png;base64,")
    wait.until(lambda d: d.execute_script("return document.getElementById('heatmap').naturalWidth") > 0)
    assert "Done in" in browser.find_element(By.ID, "status").text


def _drop(browser, files: dict[str, bytes]) -> None:
    """Drop files on the page's drop zone, as a user dragging them from a file manager does."""
    import base64

    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    browser.execute_script("""
        const dt = new DataTransfer();
        for (const [name, b64] of Object.entries(arguments[0])) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
        }
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    """, payload)


def test_drop_two_views_one_place_then_zoom(server, browser):
    from selenium.webdriver.common.by import By

    ims = [photo(160, 120, seed=31), photo(200, 150, seed=32)]  # two views of different sizes
    wait = _open(browser, server)
    _drop(browser, {"north.jpg": encode(ims[0]), "south.jpg": encode(ims[1])})
    _answered(browser, wait)

    want = tiny_predictor().locate_place([_decoded(im) for im in ims], top_k=5)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-icon")) == 1  # one place, one marker
    assert len(browser.find_elements(By.CSS_SELECTOR, "#previews img")) == 2
    assert _page(browser, "[p.marker.getLatLng().lat, p.marker.getLatLng().lng]") == pytest.approx([want["lat"], want["lon"]], abs=1e-6)
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-r50")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-r90")) == 1
    assert _page(browser, "p.circle90.getRadius()") == pytest.approx(1000 * want["radius_km_90"], rel=1e-6)
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-cell")) == len(want["top_cells"]) > 0
    assert "2 views of one place, combined by mean" in browser.find_element(By.ID, "answer").text
    reg = want["region_at_answer"]
    region = browser.find_element(By.ID, "region").text
    assert reg["admin1"] in region and reg["country"] in region

    # the admin-1 outlines (bundled) load around the answer, and the answer's region is outlined
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-admin1") == "ready")
    assert _page(browser, "p.admin1.getLayers().length") > 3000
    wait.until(lambda d: d.execute_script("return window.pigeonPage.regionLayer !== null"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-region")) == 1

    # zoom in with the map's own control: the map follows, the marker stays on the answer
    z0 = _page(browser, "p.map.getZoom()")
    browser.find_element(By.CSS_SELECTOR, ".leaflet-control-zoom-in").click()
    wait.until(lambda d: d.execute_script("return window.pigeonPage.map.getZoom()") == z0 + 1)
    assert _page(browser, "p.map.getBounds().contains(p.marker.getLatLng())")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-icon")) == 1


def test_too_many_views_refused_in_the_page(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    data = encode(photo(64, 48, seed=1))
    _drop(browser, {f"v{i}.jpg": data for i in range(17)})
    status = browser.find_element(By.ID, "status")
    assert "17 photos dropped" in status.text and "at most 16" in status.text and status.get_attribute("class") == "error"


def test_bad_upload_shows_the_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo at all")
    browser.get(server + "/")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "Error" in status.text)
    assert "415" in status.text and "unsupported_media_type" in status.text
    assert status.get_attribute("class") == "error"


def test_exif_cross_check_is_shown_as_text_with_its_own_marker(server, browser, tmp_path):
    """A photo with EXIF GPS and a capture time: a distinct marker at the EXIF position, its distance, the
    time and the sun; a tag holding HTML is shown as text; a photo without EXIF shows none of it."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from pigeon.core.sphere import haversine_km

    def send(name: str, exif) -> None:
        f = tmp_path / name
        f.write_bytes(encode(photo(160, 120, seed=22), "JPEG", exif=exif) if exif is not None else encode(photo(160, 120, seed=22)))
        browser.execute_script("document.body.dataset.state = 'sending'; document.getElementById('file').value = '';")
        browser.find_element(By.ID, "file").send_keys(str(f))
        _answered(browser, wait)

    exif = Image.Exif()
    exif[0x8825] = {1: "S", 2: (33.0, 51.0, 24.0), 3: "E", 4: (151.0, 12.0, 36.0)}
    exif[0x8769] = {0x9003: "2024:06:01 11:53:00", 0x9011: "+10:00"}
    wait = _open(browser, server)
    send("sydney.jpg", exif)
    lat, lon = _page(browser, "[p.exifMarker.getLatLng().lat, p.exifMarker.getLatLng().lng]")
    assert (lat, lon) == pytest.approx((-(33 + 51 / 60 + 24 / 3600), 151 + 12 / 60 + 36 / 3600), abs=1e-6)
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-exif")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-icon")) == 1  # the answer's pin is still the only pin
    assert _page(browser, "p.map.getBounds().contains(p.exifMarker.getLatLng())")
    text = browser.find_element(By.ID, "metadata").text
    ans = _page(browser, "[p.answer.lat, p.answer.lon]")
    km = round(float(haversine_km(lat, lon, ans[0], ans[1])))
    assert f"{km:,} km from the guess" in text and "not used for the guess" in text
    assert "taken 2024-06-01T11:53:00 (UTC+10:00)" in text and "2024-06-01T01:53:00Z UTC" in text and "the horizon at the guessed place" in text

    bad = Image.Exif()
    bad[0x8769] = {0x9003: "<img src=x onerror=window.pwned=1>"}
    send("html.jpg", bad)
    box = browser.find_element(By.ID, "metadata")
    assert "<img src=x onerror=window.pwned=1>" in box.text and not box.find_elements(By.TAG_NAME, "img")
    assert _page(browser, "window.pwned === undefined && p.exifMarker === null")
    assert not browser.find_elements(By.CSS_SELECTOR, "path.pigeon-exif")

    send("plain.jpg", None)
    assert not browser.find_element(By.ID, "metadata").is_displayed()
def test_area_of_interest_restricts_the_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from pigeon.area import parse_area
    from pigeon.predictor import AnswerOptions

    img = tmp_path / "street.jpg"
    img.write_bytes(encode(photo(160, 120, seed=21)))
    wait = _open(browser, server)
    browser.find_element(By.ID, "within").send_keys("ke")
    browser.find_element(By.ID, "file").send_keys(str(img))
    _answered(browser, wait)
    want = tiny_predictor().locate([_decoded(photo(160, 120, seed=21))], top_k=5, options=AnswerOptions(within=parse_area("KE")))[0]
    plain = tiny_predictor().locate([_decoded(photo(160, 120, seed=21))], top_k=5)[0]
    assert plain["countries"][0]["iso_a2"] != "KE"       # the area changes this photo's answer
    lat, lng = _page(browser, "[p.marker.getLatLng().lat, p.marker.getLatLng().lng]")
    assert [lat, lng] == pytest.approx([want["lat"], want["lon"]], abs=1e-6)
    kenya = next(c for c in TOY_CELLS if c[1] == "KE")
    assert kenya[5] <= lng <= kenya[7] and kenya[6] <= lat <= kenya[8]
    assert [li.text.split(" — ")[0] for li in browser.find_elements(By.CSS_SELECTOR, "#country-list li")] == ["Kenya (KE)"]
    assert "within KE" in browser.find_element(By.ID, "answer").text
    assert _page(browser, "p.answer.within.codes") == ["KE"]

    # an unknown code: the server's one-line 422 on the page
    browser.find_element(By.ID, "within").clear()
    browser.find_element(By.ID, "within").send_keys("XX")
    browser.find_element(By.ID, "file").send_keys(str(img))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    status = browser.find_element(By.ID, "status")
    assert "422" in status.text and "bad_area" in status.text and "XX is not an ISO 3166-1" in status.text
def test_credible_regions_drawn_and_downloads_offered(server, browser, tmp_path):
    """The page asks regions=true and draws the 50% and 90% regions; "Download GeoJSON" / "Download KML"
    re-send the photo for a map file and save it through a Blob link (checked in the browser and on disk)."""
    import json

    from selenium.webdriver.common.by import By

    from pigeon.predictor import AnswerOptions

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    img = tmp_path / "harbour view.jpg"
    img.write_bytes(encode(photo(160, 120, seed=44)))
    wait = _open(browser, server)
    assert browser.find_element(By.ID, "download-geojson").get_attribute("disabled")  # nothing to download yet
    browser.find_element(By.ID, "file").send_keys(str(img))
    _answered(browser, wait)

    want = tiny_predictor().locate([_decoded(photo(160, 120, seed=44))], top_k=5, options=AnswerOptions(regions=True))[0]
    assert _page(browser, "Object.keys(p.credible).sort()") == ["50", "90"]
    for level in ("50", "90"):
        geometry = want["regions"][level]["geometry"]
        n_parts = len(geometry["coordinates"]) if geometry["type"] == "MultiPolygon" else 1
        assert len(browser.find_elements(By.CSS_SELECTOR, f"path.pigeon-cr{level}")) == 1   # one SVG path, a subpath per part
        assert _page(browser, f"p.credible['{level}'].getLayers()[0].getLatLngs().length") == n_parts
    assert f"{want['regions']['50']['n_cells']} cell" in _page(browser, "p.credible['50'].getTooltip().getContent()")

    browser.find_element(By.ID, "download-geojson").click()
    wait.until(lambda d: d.execute_script("return window.pigeonPage.download !== null"))
    dl = _page(browser, "p.download")
    assert dl["filename"] == "pigeon-harbour_view.geojson" and dl["type"] == "application/geo+json"
    link = browser.find_element(By.ID, "download-link")
    assert link.get_attribute("download") == dl["filename"] and link.get_attribute("href") == dl["url"] and dl["url"].startswith("blob:")
    text = browser.execute_async_script("const done = arguments[0]; fetch(window.pigeonPage.download.url).then((r) => r.text()).then(done);")
    fc = json.loads(text)
    point = fc["features"][0]
    assert fc["type"] == "FeatureCollection" and point["properties"]["kind"] == "answer"
    assert point["geometry"]["coordinates"] == pytest.approx([want["lon"], want["lat"]], abs=1e-5)
    assert [f["properties"]["level"] for f in fc["features"] if f["properties"]["kind"] == "region"] == [0.5, 0.9]
    deadline = time.time() + 20
    while not (downloads / dl["filename"]).exists() and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads((downloads / dl["filename"]).read_text())["features"][0]["geometry"] == point["geometry"]

    browser.find_element(By.ID, "download-kml").click()
    wait.until(lambda d: d.execute_script("return window.pigeonPage.download.filename.endsWith('.kml')"))
    assert _page(browser, "p.download.type") == "application/vnd.google-earth.kml+xml"
    assert "Saved pigeon-harbour_view.kml" in browser.find_element(By.ID, "status").text
