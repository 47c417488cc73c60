"""The synthetic world: seeded, on land in the chosen countries, and its pixels carry the cues."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pigeon.datasets.synthetic import make_world, render
from pigeon.core.errors import UserError
from pigeon.metrics import reverse_geocode


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("w"), n_images=300, image_size=48, seed=3)


def test_manifest_and_files(world):
    df = pd.read_csv(world)
    assert list(df.columns[:6]) == ["image", "lat", "lon", "taken_at", "heading", "split"]
    assert len(df) == 300
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df["split"] == "train").mean() > 0.7
    im = Image.open(world.parent / df["image"][0])
    assert im.size == (48, 48) and im.mode == "RGB"
    assert df["heading"].between(0, 360).all()
    assert pd.to_datetime(df["taken_at"]).notna().all()


def test_points_on_land_in_the_countries(world):
    df = pd.read_csv(world, keep_default_na=False)
    iso, _, _ = reverse_geocode(df["lat"].to_numpy(), df["lon"].to_numpy())
    assert (iso == df["country"].to_numpy()).mean() > 0.97
    assert df["country"].nunique() > 15
    assert (df["lat"] < 0).mean() > 0.2 and (df["lat"] > 0).mean() > 0.4  # both hemispheres


def test_seeded(tmp_path, world):
    again = make_world(tmp_path, n_images=300, image_size=48, seed=3)
    a, b = pd.read_csv(world), pd.read_csv(again)
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(np.asarray(Image.open(world.parent / a["image"][7])), np.asarray(Image.open(again.parent / b["image"][7])))
    other = pd.read_csv(make_world(tmp_path / "o", n_images=50, image_size=48, seed=4))
    assert not np.allclose(other["lat"].to_numpy(), a["lat"].to_numpy()[:50])


def _render(lat, lon, doy=172.0, hour=12.0, left=False, iso="FR", n=64):
    rng = np.random.default_rng(0)
    f = lambda v: np.full(n, v)
    return render(f(lat), f(lon), f(doy), f(hour), rng.uniform(0, 360, n), np.array([iso] * n), np.full(n, left), rng, size=64).astype(float)


def test_cues_follow_geography():
    # Driving side: the centre line sits on the camera's left (drive right) or right (drive left).
    r, l = _render(45, 5, left=False), _render(45, 5, left=True)
    bottom = slice(52, 64)
    assert r[:, bottom, :32].mean() > r[:, bottom, 32:].mean() + 2
    assert l[:, bottom, 32:].mean() > l[:, bottom, :32].mean() + 2
    # Sky: a high sun (equator at noon) gives a bluer sky than a low one (70 N in December).
    hi, lo = _render(0, 30, doy=80), _render(70, 30, doy=355)
    blue = lambda im: (im[:, :8, :, 2] - im[:, :8, :, 0]).mean()
    assert blue(hi) > blue(lo) + 20
    # Climate belt: the desert belt is yellower/browner than the tropics.
    desert, tropic = _render(28, 30), _render(2, 30)
    assert desert[:, 40:, :8, 0].mean() > tropic[:, 40:, :8, 0].mean() + 40
    # Nearby places look alike, far ones less so (location texture), same belt and country.
    a, b, c = _render(45, 5), _render(45.05, 5.05), _render(45, 25)
    assert np.abs(a - b).mean() < np.abs(a - c).mean()


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="country"):
        make_world(tmp_path, n_images=10, countries=["XX"])
    with pytest.raises(UserError):
        make_world(tmp_path, n_images=0)
