"""A seeded synthetic world: small images whose pixels depend on where and when they were taken.

Why: tests and the demo need data on which a model *can* learn geography from pixels, and a test
must be able to prove that it did. Each image carries the cues a real street photo also has:

- sky colour and the sun's height, from the true solar elevation at that latitude, date and hour;
- ground/vegetation colour by climate belt (|latitude|: tropical, arid, temperate, boreal; snow
  in the local winter far from the equator);
- a road whose centre line sits left or right of the camera by the country's driving side;
- a signpost whose colour is a hash of the country code;
- a smooth location-dependent texture (random Fourier features of the 3-D unit vector), so that
  nearby places look alike and far ones do not;
- pixel noise and brightness jitter.

Locations are sampled on land inside the bundled Natural Earth admin-1 polygons of a set of
countries spread over the globe (both hemispheres, both driving sides). Everything is vectorised
numpy; PIL only encodes the files. 2000 images of 64 px take a few seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import shapely
from PIL import Image

from pigeon.core.errors import UserError
from pigeon.core.io import atomic_path
from pigeon.core.sphere import to_xyz
from pigeon.geocells import bundled

# Spread over all continents, both hemispheres, both driving sides (L = drives on the left).
DEFAULT_COUNTRIES: tuple[str, ...] = (
    "US", "CA", "MX", "BR", "AR", "CL", "PE",   # Americas (R)
    "ZA", "KE", "EG", "NG",                     # Africa (ZA, KE: L)
    "GB", "FR", "ES", "DE", "SE",               # Europe (GB: L)
    "IN", "JP", "ID", "TH", "KZ", "CN",         # Asia (IN, JP, ID, TH: L)
    "AU", "NZ",                                 # Oceania (L)
)

_N_FOURIER = 12          # smooth-texture features
_FOURIER_KM = 900.0      # typical wavelength of the location texture

# Climate-belt ground colours (RGB 0..1) at |lat| = 0, 15, 30, 45, 60, 75.
_BELT_LAT = np.array([0.0, 15.0, 30.0, 45.0, 60.0, 75.0])
_BELT_RGB = np.array([
    [0.10, 0.45, 0.12],   # tropical forest
    [0.45, 0.55, 0.20],   # savanna
    [0.80, 0.68, 0.40],   # desert
    [0.30, 0.55, 0.25],   # temperate
    [0.15, 0.35, 0.22],   # boreal
    [0.70, 0.72, 0.75],   # tundra / ice
])


def _country_colour(iso_a2: np.ndarray) -> np.ndarray:
    """A stable RGB per country code (hash), saturated enough to stand out."""
    uniq, inv = np.unique(iso_a2, return_inverse=True)
    cols = np.empty((len(uniq), 3), dtype=np.float32)
    for i, code in enumerate(uniq):  # one per country, not per sample
        h = hashlib.sha256(str(code).encode()).digest()
        cols[i] = np.frombuffer(h[:3], dtype=np.uint8) / 255.0
    return cols[inv]


def _sample_land(n: int, countries: Sequence[str], rng: np.random.Generator):
    """n points inside the admin-1 polygons of `countries`: country uniform, region by area, point uniform in it."""
    adm = bundled.admin1()
    adm = adm[adm["iso_a2"].isin(list(countries))].reset_index(drop=True)
    missing = sorted(set(countries) - set(adm["iso_a2"]))
    if missing:
        raise UserError(f"synthetic world: unknown country codes {missing}; give ISO 3166-1 alpha-2 codes present in the bundled admin-1 data")
    b = adm.geometry.bounds
    # Regions that straddle the antimeridian have a useless bounding box: leave them out.
    adm = adm[(b.maxx - b.minx) < 90].reset_index(drop=True)
    geoms = adm.geometry.values
    bounds = adm.geometry.bounds.to_numpy()
    cy = (bounds[:, 1] + bounds[:, 3]) / 2
    area = shapely.area(geoms) * np.cos(np.radians(cy))
    codes = adm["iso_a2"].to_numpy()
    uniq = np.unique(codes)
    # P(region) = 1/#countries * area share within its country.
    tot = pd.Series(area).groupby(codes).transform("sum").to_numpy()
    p = area / tot / len(uniq)
    region = rng.choice(len(adm), size=n, p=p / p.sum())
    shapely.prepare(geoms)
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    todo = np.arange(n)
    for _ in range(60):  # rejection sampling in each region's box, all pending points at once
        if len(todo) == 0:
            break
        k = 4
        reg = np.repeat(region[todo], k)
        bx = bounds[reg]
        x = rng.uniform(bx[:, 0], bx[:, 2])
        y = rng.uniform(bx[:, 1], bx[:, 3])
        ok = shapely.contains_xy(geoms[reg], x, y).reshape(-1, k)
        hit = ok.any(axis=1)
        first = ok.argmax(axis=1)
        sel = np.arange(len(todo)) * k + first
        lon[todo[hit]] = x[sel[hit]]
        lat[todo[hit]] = y[sel[hit]]
        todo = todo[~hit]
    if len(todo):  # thin slivers: fall back to a point known to lie inside
        rp = shapely.point_on_surface(geoms[region[todo]])
        lon[todo], lat[todo] = shapely.get_x(rp), shapely.get_y(rp)
    return lat, lon, codes[region], adm["admin1"].to_numpy()[region]


def _solar_elevation(lat: np.ndarray, doy: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """Sun elevation in degrees from latitude, day of year and local solar hour."""
    decl = np.radians(23.44) * np.sin(2 * np.pi * (doy - 81) / 365.0)
    h = np.radians(15.0 * (hour - 12.0))
    phi = np.radians(lat)
    s = np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(h)
    return np.degrees(np.arcsin(np.clip(s, -1, 1)))


def _location_field(lat: np.ndarray, lon: np.ndarray, fourier_seed: int) -> np.ndarray:
    """Smooth location field (n, 6) in [-1, 1]: random Fourier features of the unit vector, the same
    world for every seed, so nearby places look alike and far ones do not."""
    frng = np.random.default_rng(fourier_seed)
    w = frng.normal(size=(_N_FOURIER, 3)) * (6371.0 / _FOURIER_KM)
    ph = frng.uniform(0, 2 * np.pi, size=_N_FOURIER)
    feats = np.sin(to_xyz(lat, lon) @ w.T + ph).astype(np.float32)        # (n, F) in [-1, 1]
    mix = frng.normal(size=(_N_FOURIER, 6)).astype(np.float32) / np.sqrt(_N_FOURIER)
    return np.tanh(feats @ mix)                                             # (n, 6)


def _sky(yy: np.ndarray, xx: np.ndarray, horizon: np.ndarray, lat: np.ndarray, elev: np.ndarray, hour: np.ndarray,
         heading: np.ndarray) -> np.ndarray:
    """Sky (n, H, W, 3): the sun's height sets its colour (high: saturated blue; low: pale, warm), and the
    sun disc sits at its elevation, left or right by its azimuth relative to the heading."""
    e1 = np.clip(elev / 90.0, -0.1, 1.0)
    zen = np.stack([0.15 + 0.5 * (1 - e1), 0.35 + 0.3 * e1, 0.55 + 0.4 * e1], -1)   # (n, 3)
    hor = np.stack([0.85 + 0.1 * (1 - e1), 0.75 + 0.1 * e1, 0.60 + 0.3 * e1], -1)
    t = np.clip(yy / np.maximum(horizon, 1e-3), 0, 1)[..., None]           # (n,H,1,1)
    sky = (1 - t) * zen[:, None, None, :] + t * hor[:, None, None, :]       # (n,H,1,3)
    south = np.where(lat >= 0, 180.0, 0.0)                                  # noon sun is equatorward
    az = south + 15.0 * (hour - 12.0) * np.where(lat >= 0, 1.0, -1.0)
    rel = ((az - heading + 180.0) % 360.0) - 180.0                          # -180..180
    sx = (0.5 + rel / 90.0).astype(np.float32)[:, None, None]
    sy = (horizon[:, 0, 0] * (1 - np.clip(elev, 0, 90) / 90.0)).astype(np.float32)[:, None, None]
    sun = np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 0.05**2)) * (elev[:, None, None] > 0)
    return sky + sun[..., None] * np.array([1.0, 0.95, 0.7], np.float32)  # (n,H,W,3)


def _ground(yy: np.ndarray, xx: np.ndarray, lat: np.ndarray, doy: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Ground (n, H, W, 3): climate-belt colour by |lat| (snow in the local winter far from the
    equator), a location tint and a location-dependent stripe texture."""
    alat = np.abs(lat)
    belt = np.stack([np.interp(alat, _BELT_LAT, _BELT_RGB[:, c]) for c in range(3)], -1)
    winter = np.cos(2 * np.pi * (doy - 172) / 365.0) * np.sign(lat)           # +1 northern summer
    snow = np.clip((alat - 42.0) / 15.0, 0, 1) * np.clip(-winter, 0, 1)
    belt = belt * (1 - snow[:, None]) + np.array([0.92, 0.93, 0.96]) * snow[:, None]
    tint = 0.18 * field[:, 1:4]
    ground_rgb = np.clip(belt + tint, 0, 1).astype(np.float32)             # (n, 3)
    freq = (6.0 + 5.0 * (field[:, 4] + 1))[:, None, None]
    ang = (np.pi * field[:, 5])[:, None, None]
    tex = np.sin(freq * (np.cos(ang) * xx + np.sin(ang) * yy) * 2 * np.pi)  # (n,H,W)
    return ground_rgb[:, None, None, :] * (1 + 0.18 * tex[..., None])


def _draw_road(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, horizon: np.ndarray, driving_left: np.ndarray) -> np.ndarray:
    """A perspective road from the horizon to the bottom; its dashed centre line sits on the camera's
    left when driving on the right, on its right when driving on the left (the driving-side cue)."""
    below = np.clip((yy - horizon) / np.maximum(1 - horizon, 1e-3), 0, 1)  # 0 at horizon .. 1 bottom
    half = 0.03 + 0.45 * below
    road = ((np.abs(xx - 0.5) < half) & (yy > horizon)).astype(np.float32)
    side = np.where(driving_left, 1.0, -1.0).astype(np.float32)[:, None, None]
    cx = 0.5 + side * 0.22 * below
    dash = (np.sin(below * 30.0) > 0).astype(np.float32)
    line = (np.abs(xx - cx) < 0.012 + 0.02 * below) * road * dash
    img = img * (1 - road[..., None]) + road[..., None] * np.float32(0.35)
    return img * (1 - line[..., None]) + line[..., None] * np.float32(0.95)


def _draw_signpost(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, horizon: np.ndarray, iso_a2: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """A country-coloured panel on a pole, on a random side, in 85% of the images (the country cue)."""
    n = len(iso_a2)
    has = rng.random(n) < 0.85
    px = np.where(rng.random(n) < 0.5, 0.12, 0.88) + rng.uniform(-0.04, 0.04, n)
    pw = rng.uniform(0.14, 0.22, n)
    py = (horizon[:, 0, 0] - rng.uniform(0.02, 0.10, n))
    ph_ = rng.uniform(0.12, 0.20, n)
    px, pw, py, ph_ = (a.astype(np.float32)[:, None, None] for a in (px, pw, py, ph_))
    panel = (np.abs(xx - px) < pw / 2) & (np.abs(yy - py) < ph_ / 2) & has[:, None, None]
    pole = (np.abs(xx - px) < 0.01) & (yy > py) & (yy < horizon + 0.15) & has[:, None, None]
    img = np.where(pole[..., None], np.float32(0.25), img)
    return np.where(panel[..., None], _country_colour(iso_a2)[:, None, None, :], img)


def _expose(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure jitter and pixel noise, then 8-bit: no two photos of a place are alike."""
    img = img * rng.uniform(0.85, 1.15, (len(img), 1, 1, 1)).astype(np.float32)
    img = img + rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render(
    lat: np.ndarray,
    lon: np.ndarray,
    doy: np.ndarray,
    hour: np.ndarray,
    heading: np.ndarray,
    iso_a2: np.ndarray,
    driving_left: np.ndarray,
    rng: np.random.Generator,
    size: int = 64,
    fourier_seed: int = 1234,
) -> np.ndarray:
    """Render images (n, size, size, 3) uint8 of the given places and times; fully vectorised."""
    yy = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None] / size   # 0 top .. 1 bottom
    xx = (np.arange(size, dtype=np.float32) + 0.5)[None, None, :] / size
    field = _location_field(lat, lon, fourier_seed)
    elev = _solar_elevation(lat, doy, hour).astype(np.float32)
    horizon = (0.42 + 0.08 * field[:, 0])[:, None, None]                   # varies with the local terrain field
    sky_mask = (yy < horizon).astype(np.float32)[..., None]                 # (n, H, 1, 1)
    sky = _sky(yy, xx, horizon, lat, elev, hour, heading)
    ground = _ground(yy, xx, lat, doy, field)
    img = sky_mask * sky + (1 - sky_mask) * ground                          # (n,H,W,3)
    img = _draw_road(img, yy, xx, horizon, driving_left)
    img = _draw_signpost(img, yy, xx, horizon, iso_a2, rng)
    return _expose(img, rng)


def make_world(
    out_dir: str | os.PathLike,
    n_images: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    countries: Sequence[str] | None = None,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    fmt: str = "png",
) -> Path:
    """Write a synthetic world to `out_dir` (images/ + manifest.csv) and return the manifest's path.

    The manifest has columns image (path relative to the manifest), lat, lon, taken_at (ISO UTC),
    heading (degrees), split (train/val/test), plus country (ISO a2) and admin1 for reference.
    """
    if n_images < 1:
        raise UserError(f"synthetic world: n_images must be at least 1, got {n_images}")
    if fmt not in ("png", "jpg"):
        raise UserError(f"synthetic world: format must be 'png' or 'jpg', got {fmt!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    countries = tuple(countries) if countries else DEFAULT_COUNTRIES
    lat, lon, iso, adm1 = _sample_land(n_images, countries, rng)

    ds = bundled.driving_side().drop_duplicates("iso_a2").set_index("iso_a2")["driving_side"]
    left = pd.Series(iso).map(ds).fillna("right").to_numpy() == "left"
    doy = rng.integers(1, 366, n_images)
    hour = rng.uniform(8.0, 16.5, n_images)             # local solar time
    heading = rng.uniform(0.0, 360.0, n_images)

    images = np.empty((n_images, image_size, image_size, 3), np.uint8)
    for s in range(0, n_images, 256):  # chunks keep memory flat
        e = min(s + 256, n_images)
        images[s:e] = render(lat[s:e], lon[s:e], doy[s:e], hour[s:e], heading[s:e], iso[s:e], left[s:e], rng, image_size)

    names = [f"images/{i:06d}.{fmt}" for i in range(n_images)]
    for name, arr in zip(names, images):
        Image.fromarray(arr).save(out / name, quality=92) if fmt == "jpg" else Image.fromarray(arr).save(out / name, compress_level=1)

    # taken_at: local solar hour -> UTC by longitude.
    utc_h = (hour - lon / 15.0)
    base = np.datetime64("2023-01-01T00:00:00") + (doy - 1).astype("timedelta64[D]")
    ts = base + np.round(utc_h * 3600).astype("timedelta64[s]")
    taken = pd.to_datetime(ts).strftime("%Y-%m-%dT%H:%M:%SZ")
    u = rng.random(n_images)
    spl = np.where(u < split[0], "train", np.where(u < split[0] + split[1], "val", "test"))
    df = pd.DataFrame({
        "image": names, "lat": np.round(lat, 6), "lon": np.round(lon, 6), "taken_at": taken,
        "heading": np.round(heading, 1), "split": spl, "country": iso, "admin1": adm1,
    })
    dest = out / "manifest.csv"
    with atomic_path(dest) as tmp:
        df.to_csv(tmp, index=False)
    return dest


__all__ = ["make_world", "render", "DEFAULT_COUNTRIES"]
