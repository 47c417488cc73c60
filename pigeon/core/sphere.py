"""Geometry on the sphere: unit vectors, haversine, spherical means.

Everything that measures distance in pigeon goes through here so that no code measures in raw
degrees and the antimeridian needs no special case.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0088


def to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) for latitudes/longitudes in degrees; Euclidean distance is monotone in great-circle distance."""
    lat_r = np.radians(np.asarray(lat, dtype=np.float64))
    lon_r = np.radians(np.asarray(lon, dtype=np.float64))
    c = np.cos(lat_r)
    return np.stack([c * np.cos(lon_r), c * np.sin(lon_r), np.sin(lat_r)], axis=-1)


def from_xyz(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latitude/longitude in degrees of (not necessarily unit) vectors (n, 3)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon = np.degrees(np.arctan2(y, x))
    return lat, lon


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km, broadcasting over numpy arrays."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2.0) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2.0) ** 2
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def chord_to_km(chord: np.ndarray) -> np.ndarray:
    """Great-circle km from the Euclidean distance between unit vectors."""
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0))


def km_to_chord(km: np.ndarray | float) -> np.ndarray | float:
    """Euclidean distance between unit vectors that are `km` apart on the sphere."""
    return 2.0 * np.sin(np.minimum(np.asarray(km, dtype=np.float64) / EARTH_RADIUS_KM, np.pi) / 2.0)


def spherical_mean(lat: np.ndarray, lon: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Mean position on the sphere (normalised mean of unit vectors); correct across the antimeridian."""
    xyz = to_xyz(lat, lon)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    m = (xyz * w[:, None]).sum(axis=0)
    if not np.any(m):
        m = xyz[0]
    la, lo = from_xyz(m[None, :])
    return float(la[0]), float(lo[0])


def wrap_lon(lon: np.ndarray) -> np.ndarray:
    """Longitudes folded into [-180, 180)."""
    return (np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0


def pairwise_km(x: np.ndarray, c: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Great-circle km (n, C) between unit vectors x (n, 3) and c (C, 3), via the chord; chunked to bound memory."""
    out = np.empty((len(x), len(c)), dtype=np.float64)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = chord_to_km(np.sqrt(np.clip(2.0 - 2.0 * (x[i:i + chunk] @ c.T), 0.0, 4.0)))
    return out
