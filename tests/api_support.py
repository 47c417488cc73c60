"""Shared helpers for the API tests: a real tiny zero-shot bundle over toy cells, and test images."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image

# (country, iso_a2, adm0_a3, admin1, driving side, lon0, lat0, lon1, lat1): boxes inside real countries
TOY_CELLS = [
    ("France", "FR", "FRA", "Île-de-France", "right", 1.5, 48.1, 3.5, 49.2),
    ("Kenya", "KE", "KEN", "Nairobi", "left", 36.0, -2.0, 38.0, -0.5),
    ("Japan", "JP", "JPN", "Tokyo", "left", 138.8, 35.2, 140.2, 36.2),
    ("Brazil", "BR", "BRA", "São Paulo", "right", -49.0, -24.5, -45.5, -22.0),
    ("Australia", "AU", "AUS", "New South Wales", "left", 148.0, -35.0, 152.0, -31.0),
    ("United States of America", "US", "USA", "Colorado", "right", -108.0, 37.5, -103.0, 40.5),
    ("India", "IN", "IND", "Maharashtra", "left", 73.0, 17.0, 77.0, 20.5),
    ("Norway", "NO", "NOR", "Innlandet", "right", 9.0, 60.5, 11.5, 62.0),
]


def toy_cells():
    """Eight rectangular cells in eight countries (GeoCells.from_frame fills the rest)."""
    import geopandas as gpd
    from shapely.geometry import box

    from pigeon.geocells.cells import GeoCells

    rows = [
        {"name": f"{a1}, {c}", "iso_a2": iso, "adm0_a3": a3, "country": c, "admin1": a1, "driving_side": ds,
         "count": 10, "lat": (la0 + la1) / 2, "lon": (lo0 + lo1) / 2, "geometry": box(lo0, la0, lo1, la1)}
        for c, iso, a3, a1, ds, lo0, la0, lo1, la1 in TOY_CELLS
    ]
    return GeoCells.from_frame(gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326"))


def build_tiny_bundle(path: Path) -> Path:
    """A real zero-shot bundle: toy cells.parquet + `pigeon train --zero-shot` with the `tiny` backbone."""
    from pigeon.bundle import Bundle
    from pigeon.train import train_zero_shot

    cells = toy_cells()
    b = Bundle(path, create=True)
    b.write_part("cells", lambda tmp: cells.save(tmp), n_cells=len(cells))
    train_zero_shot(path, backbone="tiny")
    return Path(path)


def photo(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    """A seeded photo-like RGB image: a sky-to-ground gradient with noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    base = (1 - y) * np.array([120, 170, 230]) + y * np.array([90, 120, 60])
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


_CACHE: dict[str, object] = {}


def tiny_bundle() -> Path:
    """One tiny zero-shot bundle per test process (built once, shared by the API test modules)."""
    if "bundle" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="pigeon-api-test-"))
        atexit.register(shutil.rmtree, d, True)
        _CACHE["bundle"] = build_tiny_bundle(d / "bundle")
    return _CACHE["bundle"]  # type: ignore[return-value]


def tiny_predictor():
    """The real Predictor over `tiny_bundle()`, loaded once per process."""
    if "predictor" not in _CACHE:
        from pigeon.predictor import Predictor

        _CACHE["predictor"] = Predictor.from_bundle(tiny_bundle())
    return _CACHE["predictor"]


class BlockingPredictor:
    """The real predictor, made to wait inside the backbone forward of a request (`embed`, which the
    service's one locate path calls) for `release` (to fill the server up), or to fail."""

    def __init__(self, inner, fail: bool = False):
        self.inner, self.fail = inner, fail
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images):
        self.entered.set()
        if self.fail:
            raise RuntimeError("boom")
        self.release.wait(30)
        return self.inner.embed(images)
