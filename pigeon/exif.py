"""What a photo's file says about itself (EXIF GPS position, when it was taken), and its cross-check
against an answer.

pigeon answers from the pixels alone. A file's EXIF is only *reported* beside the answer, never used
for it: a reader can compare the two, and a large distance means either a wrong guess or edited
metadata (the answer says both and leaves the judgement to the reader). This module owns reading that
metadata (`read_exif` from a parsed `Image.Exif`, `read_metadata` from a file, bytes or PIL image) and
the cross-check (`cross_check`, `metadata_fields`); the service and `pigeon locate` both go through it.

Rules (docs/serve.md, "EXIF cross-check"):
- GPS: GPSLatitude/GPSLongitude (degrees, minutes, seconds as rationals) with their N/S, E/W refs.
  A missing ref, a value out of range, a zero denominator or (0, 0) (a camera without a fix) makes the
  position absent, with a sentence in `ignored` saying why.
- Time: DateTimeOriginal is local time as the camera recorded it (`taken_at`, no zone). A UTC moment
  comes only from a recorded offset (OffsetTimeOriginal, EXIF 2.31) or, failing that, from
  GPSDateStamp + GPSTimeStamp (UTC by definition); never from a guessed zone.
- Nothing here raises on malformed EXIF: an unreadable tag is absent (with a reason when it was there
  but unusable), an unreadable EXIF block is no metadata.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from .core.sphere import haversine_km

GPS_IFD, EXIF_IFD = 0x8825, 0x8769
_LAT_REF, _LAT, _LON_REF, _LON, _GPS_TIME, _GPS_DATE = 1, 2, 3, 4, 7, 29
_DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x9003, 0x9011
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
UTC_FROM_OFFSET, UTC_FROM_GPS = "OffsetTimeOriginal", "GPSDateStamp+GPSTimeStamp"


@dataclass(frozen=True)
class PhotoMetadata:
    """A photo's own metadata, validated; every field None when the file did not record it usably."""

    gps: tuple[float, float] | None = None          # (lat, lon) in degrees, signs from the refs
    taken_at: dt.datetime | None = None             # DateTimeOriginal: naive, local as recorded
    utc_offset: dt.timedelta | None = None          # OffsetTimeOriginal
    taken_at_utc: dt.datetime | None = None         # aware, UTC: from the offset, else from the GPS stamps
    utc_from: str | None = None                     # UTC_FROM_OFFSET | UTC_FROM_GPS
    ignored: tuple[str, ...] = ()                   # why a recorded tag was not used

    def __bool__(self) -> bool:
        return bool(self.gps or self.taken_at or self.taken_at_utc or self.ignored)


NO_METADATA = PhotoMetadata()


def _text(v: Any) -> str | None:
    """An ASCII tag's text (str or bytes, NULs and spaces stripped); None when it is not text."""
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    return v.strip("\x00 ").strip() if isinstance(v, str) else None


def _number(v: Any) -> float:
    """A rational/number as a float (NaN when it is not one: text, a zero denominator)."""
    if isinstance(v, (str, bytes, tuple, list)):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return math.nan


def _dms(v: Any) -> float:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals (1 to 3 of them, or one number); NaN if malformed."""
    parts = list(v) if isinstance(v, (tuple, list)) else [v]
    if not 1 <= len(parts) <= 3:
        return math.nan
    nums = [_number(p) for p in parts]
    if not all(math.isfinite(n) and n >= 0 for n in nums) or any(n >= 60 for n in nums[1:]):
        return math.nan
    return sum(n / 60 ** i for i, n in enumerate(nums))


def _gps(g: dict) -> tuple[tuple[float, float] | None, str | None]:
    """((lat, lon) or None, why it was ignored) from the GPS IFD; no reason when no position was recorded."""
    if _LAT not in g and _LON not in g:
        return None, None
    lat, lon = _dms(g.get(_LAT)), _dms(g.get(_LON))
    lat_ref, lon_ref = ((_text(g.get(k)) or "").upper()[:1] for k in (_LAT_REF, _LON_REF))
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None, "EXIF GPS position ignored: GPSLatitude/GPSLongitude are missing or not valid degree, minute, second rationals"
    if lat_ref not in ("N", "S") or lon_ref not in ("E", "W"):
        return None, "EXIF GPS position ignored: GPSLatitudeRef/GPSLongitudeRef (N/S, E/W) are missing or invalid, so the hemisphere is unknown"
    if lat > 90 or lon > 180:
        return None, f"EXIF GPS position ignored: latitude {lat:.4f} or longitude {lon:.4f} is out of range"
    if lat == 0 and lon == 0:
        return None, "EXIF GPS position ignored: (0, 0) is what cameras write without a GPS fix"
    return (-lat if lat_ref == "S" else lat, -lon if lon_ref == "W" else lon), None


def _local_time(v: Any) -> tuple[dt.datetime | None, str | None]:
    """DateTimeOriginal ('YYYY:MM:DD HH:MM:SS') as a naive datetime; blank or zero placeholders are absent."""
    s = _text(v)
    if s is None:
        return None, "DateTimeOriginal ignored: it is not text"
    if not s.strip(" :0-"):
        return None, None  # '0000:00:00 00:00:00' or '    :  :     :  :  ': the camera did not know
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S"):
        try:
            return dt.datetime.strptime(s[:19], fmt), None
        except ValueError:
            continue
    return None, f"DateTimeOriginal ignored: {s[:40]!r} is not a date and time"


def _offset(v: Any) -> tuple[dt.timedelta | None, str | None]:
    """OffsetTimeOriginal ('+02:00') as a timedelta within UTC-12..UTC+14."""
    s = _text(v)
    if s is None or not s.strip(" :"):
        return None, None
    m = _OFFSET.match(s)
    if m:
        off = (1 if m.group(1) == "+" else -1) * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
        if int(m.group(3)) < 60 and dt.timedelta(hours=-12) <= off <= dt.timedelta(hours=14):
            return off, None
    return None, f"OffsetTimeOriginal ignored: {s[:20]!r} is not a UTC offset (+HH:MM, -12:00 to +14:00)"


def _gps_time(g: dict) -> dt.datetime | None:
    """The UTC moment of GPSDateStamp + GPSTimeStamp (both needed), or None."""
    date, t = _text(g.get(_GPS_DATE)), g.get(_GPS_TIME)
    if not date or not isinstance(t, (tuple, list)) or len(t) != 3:
        return None
    h, m, s = (_number(x) for x in t)
    if not all(math.isfinite(x) and x >= 0 for x in (h, m, s)) or h >= 24 or m >= 60 or s >= 61:
        return None
    try:
        day = dt.datetime.strptime(date[:10].replace("-", ":"), "%Y:%m:%d")
    except ValueError:
        return None
    return day.replace(tzinfo=dt.timezone.utc) + dt.timedelta(hours=int(h), minutes=int(m), seconds=min(s, 59.999999))


def _ifd(exif: Image.Exif, tag: int) -> dict:
    """A sub-IFD as a dict: parsed from the file, or set in memory (an `Image.Exif` being built); {} if broken."""
    try:
        ifd = exif.get_ifd(tag)
    except Exception:  # a broken IFD pointer in third-party EXIF, or an in-memory dict get_ifd cannot seek
        ifd = None
    if not ifd:
        try:
            ifd = exif.get(tag)
        except Exception:
            ifd = None
    return dict(ifd) if isinstance(ifd, dict) else {}


def read_exif(exif: Image.Exif) -> PhotoMetadata:
    """The validated metadata of a parsed EXIF block; never raises (malformed tags are absent)."""
    try:
        g, e = _ifd(exif, GPS_IFD), _ifd(exif, EXIF_IFD)
        gps, why_gps = _gps(g)
        taken_at, why_time = _local_time(e[_DATETIME_ORIGINAL]) if _DATETIME_ORIGINAL in e else (None, None)
        offset, why_offset = _offset(e.get(_OFFSET_TIME_ORIGINAL))
        utc, utc_from = None, None
        if taken_at is not None and offset is not None:
            utc, utc_from = (taken_at - offset).replace(tzinfo=dt.timezone.utc), UTC_FROM_OFFSET
        elif (gps_utc := _gps_time(g)) is not None:
            utc, utc_from = gps_utc, UTC_FROM_GPS
        ignored = tuple(w for w in (why_gps, why_time, why_offset) if w)
        return PhotoMetadata(gps, taken_at, offset, utc, utc_from, ignored)
    except Exception:  # anything unforeseen in third-party EXIF: no metadata rather than no answer
        return NO_METADATA


def read_metadata(src: str | os.PathLike | bytes | Image.Image) -> PhotoMetadata:
    """The metadata of an image file, its bytes or an opened PIL image (its EXIF only: for JPEG and
    WebP no pixels are decoded); NO_METADATA for anything unreadable."""
    try:
        if isinstance(src, Image.Image):
            return read_exif(src.getexif())
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as im:
            return read_exif(im.getexif())
    except Exception:  # unreadable file or EXIF: the locate path reports the file itself
        return NO_METADATA


def _utc_offset_text(off: dt.timedelta) -> str:
    minutes = int(off.total_seconds() // 60)
    sign, minutes = ("+" if minutes >= 0 else "-"), abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def sun_elevation_deg(lat: float, lon: float, when_utc: dt.datetime) -> float:
    """The sun's apparent elevation (degrees above the horizon, atmospheric refraction included) at
    (lat, lon) at the UTC moment `when_utc`, from astral's NOAA solar-position equations."""
    from astral import Observer
    from astral.sun import elevation

    return float(elevation(Observer(latitude=float(lat), longitude=float(lon)), when_utc, with_refraction=True))


def cross_check(meta: PhotoMetadata, lat: float, lon: float, radius_km_90: float | None = None) -> dict[str, Any] | None:
    """The photo's metadata beside the answer at (lat, lon): the EXIF position and its distance from the
    answer, when it was taken (local as recorded, the offset, UTC), the sun's elevation at the
    *predicted* place at that UTC moment, and a `note` stating both explanations when the EXIF position
    lies beyond the answer's 90% radius. None when the photo recorded nothing. The answer is not changed."""
    if not meta:
        return None
    out: dict[str, Any] = {"exif_gps": None, "taken_at": None, "utc_offset": None, "taken_at_utc": None, "utc_from": meta.utc_from,
                           "sun_elevation_deg": None, "note": None, "ignored": list(meta.ignored)}
    if meta.gps is not None:
        d = float(haversine_km(meta.gps[0], meta.gps[1], lat, lon))
        out["exif_gps"] = {"lat": round(meta.gps[0], 6), "lon": round(meta.gps[1], 6), "distance_km": round(d, 1)}
        r90 = _finite(radius_km_90)
        if r90 is None or d > r90:
            beyond = f", beyond its 90% radius of {r90:,.0f} km" if r90 is not None else ""
            out["note"] = (f"the EXIF position is {d:,.0f} km from the prediction{beyond}: either the prediction is wrong or "
                           f"the metadata was edited; pigeon never uses EXIF to answer")
    if meta.taken_at is not None:
        out["taken_at"] = meta.taken_at.isoformat(timespec="seconds")
    if meta.utc_offset is not None:
        out["utc_offset"] = _utc_offset_text(meta.utc_offset)
    if meta.taken_at_utc is not None:
        out["taken_at_utc"] = meta.taken_at_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        out["sun_elevation_deg"] = round(sun_elevation_deg(lat, lon, meta.taken_at_utc), 2)
    return out


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def metadata_fields(answer: dict[str, Any], views: Sequence[PhotoMetadata], several: bool = False) -> dict[str, Any]:
    """The keys an answer gains from its photos' own metadata, checked against the answer's point:
    `metadata` (the first view that recorded any) and, for several views of one place (`several`),
    `view_metadata` (each view's, in order, null where a view recorded nothing). {} when no view
    recorded anything, so such answers stay as they were."""
    checks = [cross_check(m, answer["lat"], answer["lon"], answer.get("radius_km_90")) for m in views]
    first = next((c for c in checks if c is not None), None)
    if first is None:
        return {}
    return {"metadata": first, **({"view_metadata": checks} if several else {})}


__all__ = ["PhotoMetadata", "NO_METADATA", "read_exif", "read_metadata", "cross_check", "metadata_fields", "sun_elevation_deg",
           "UTC_FROM_OFFSET", "UTC_FROM_GPS"]
