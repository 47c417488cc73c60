"""The web page's evidence in headless Chromium: a bundle with a gallery built from a manifest with url/author/
license/source columns; the page asks for evidence, draws each evidence photo as a small marker with its
similarity, and a marker's popup links to the photo's url (new tab, noopener; the source's text shown as text).

Needs the Debian packages `chromium` and `chromium-driver`; skipped with that message when they are missing
(the browser fixture and helpers are tests/test_webpage.py's).
"""

from __future__ import annotations

import math

import pytest
import torch

from test_webpage import CHROMIUM, DRIVER, _answered, _open, _page, browser, serve_page  # noqa: F401  (browser: a fixture)

torch.set_num_threads(2)
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium not found: install it with `apt-get install -y chromium chromium-driver`",
)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    import pandas as pd

    from pigeon.index import RefineConfig
    from pigeon.predictor import Predictor
    from worlds import gallery_bundle

    root = tmp_path_factory.mktemp("webev")
    bundle = gallery_bundle(root, seed=23, source_columns=True)
    manifest = pd.read_csv(root / "world" / "manifest.csv", keep_default_na=False)
    pred = Predictor.from_bundle(bundle, refine=RefineConfig(max_refinement_km=math.inf))   # the toy cells span continents
    photo = root / "world" / manifest.loc[manifest["split"] == "test", "image"].iloc[0]
    return pred, photo, manifest.set_index("image")


@pytest.fixture(scope="module")
def server(gallery):
    yield from serve_page(gallery[0])


def test_evidence_markers_with_similarity_and_links(server, browser, gallery):  # noqa: F811
    from PIL import Image
    from selenium.webdriver.common.by import By

    from pigeon.predictor import AnswerOptions

    pred, photo, manifest = gallery
    want = pred.locate([Image.open(photo).convert("RGB")], options=AnswerOptions(evidence=True))[0]["evidence"]
    assert len(want) == 5 and any("url" in e for e in want)

    wait = _open(browser, server)
    assert browser.find_element(By.ID, "evidence").is_selected()     # asked by default
    browser.find_element(By.ID, "file").send_keys(str(photo))
    _answered(browser, wait)

    # one small circle marker per evidence photo, where the photo was taken, best first
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.pigeon-evidence")) == len(want)
    got = _page(browser, "p.evidenceLayers.map((m) => [m.evidence.key, m.getLatLng().lat, m.getLatLng().lng, m.evidence.similarity])")
    assert [g[0] for g in got] == [e["key"] for e in want]
    for g, e in zip(got, want):
        assert g[1:] == pytest.approx([e["lat"], e["lon"], e["similarity"]], abs=1e-5)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-icon")) == 1   # the answer's marker only

    # the tooltip says the similarity; the popup credits the photo and links to its url
    tips = _page(browser, "p.evidenceLayers.map((m) => m.getTooltip().getContent().textContent)")
    assert tips == [f"similarity {e['similarity']:.2f}" for e in want]
    i = next(j for j, e in enumerate(want) if "url" in e)
    browser.execute_script(f"window.pigeonPage.evidenceLayers[{i}].openPopup();")
    link = browser.find_element(By.CSS_SELECTOR, ".leaflet-popup-content a")
    url = manifest.loc[want[i]["key"], "url"]
    assert link.get_attribute("href") == browser.execute_script("return new URL(arguments[0]).href", url)
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel").split()
    popup = browser.find_element(By.CSS_SELECTOR, ".leaflet-popup-content").text
    assert manifest.loc[want[i]["key"], "author"] in popup                                       # "Author 9 <&>" shown as text
    assert not browser.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content pigeon")           # never parsed as HTML

    # the list beside the map: one entry per photo, a link for each that has a url
    items = browser.find_elements(By.CSS_SELECTOR, "#evidence-list li")
    assert len(items) == len(want)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#evidence-list li a[target=_blank]")) == sum("url" in e for e in want)
    assert "5 gallery photos decided the refinement" in browser.find_element(By.ID, "evidence-note").text

    # unticked: the page does not ask, and draws no evidence
    browser.find_element(By.ID, "evidence").click()
    browser.execute_script("document.body.dataset.state = ''; document.getElementById('file').value = '';")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    _answered(browser, wait)
    assert not browser.find_elements(By.CSS_SELECTOR, "path.pigeon-evidence")
    assert not browser.find_element(By.ID, "evidence-box").is_displayed()
