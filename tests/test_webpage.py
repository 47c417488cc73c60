"""The web page in headless Chromium: pick a photo, see the marker on the map and the country list.

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


@pytest.fixture(scope="module")
def server():
    import uvicorn

    port = _free_port()
    app = create_app(tiny_predictor(), Settings(warmup=False))
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


def test_upload_shows_marker_and_countries(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img = tmp_path / "street.jpg"
    img.write_bytes(encode(photo(160, 120, seed=21)))
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-map") == "ready")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#countries path")) > 150  # the offline world outline

    browser.find_element(By.ID, "file").send_keys(str(img))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered")

    want = tiny_predictor().locate([photo(160, 120, seed=21)], top_k=5)[0]
    marker = browser.find_element(By.ID, "marker")
    assert float(marker.get_attribute("cx")) == pytest.approx(want["lon"], abs=1e-3)
    assert float(marker.get_attribute("cy")) == pytest.approx(-want["lat"], abs=1e-3)

    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#country-list li")]
    assert len(items) == len(want["countries"])
    assert items[0].startswith(want["countries"][0]["name"])
    assert all(any(li.startswith(c[0]) for c in TOY_CELLS) for li in items)

    shaded = browser.find_elements(By.CSS_SELECTOR, "#cells path")
    assert [int(p.get_attribute("data-cell")) for p in shaded] == [c["cell_id"] for c in want["top_cells"]]
    opac = [float(p.get_attribute("fill-opacity")) for p in shaded]
    assert opac == sorted(opac, reverse=True) and opac[0] == pytest.approx(0.85)

    heat = browser.find_element(By.ID, "heatmap")
    assert heat.get_attribute("src").startswith("data:image/png;base64,")
    wait.until(lambda d: d.execute_script("return document.getElementById('heatmap').naturalWidth") > 0)
    assert "Done in" in browser.find_element(By.ID, "status").text


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
