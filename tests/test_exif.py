"""The EXIF cross-check (pigeon.exif): a photo's own GPS position and capture time, read from JPEGs these
tests write, reported beside the answer (API, CLI) and never used for it."""

from __future__ import annotations

import datetime as dt
import io
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from api_support import encode, photo, tiny_bundle, tiny_predictor
from pigeon.core.sphere import haversine_km
from pigeon.exif import UTC_FROM_GPS, UTC_FROM_OFFSET, cross_check, metadata_fields, read_metadata, sun_elevation_deg

torch.set_num_threads(2)


def _dms(deg: float) -> tuple[float, float, float]:
    d = int(deg)
    m = int((deg - d) * 60)
    return float(d), float(m), round((deg - d - m / 60) * 3600, 4)


def _exif(lat=None, lon=None, taken=None, offset=None, gps_time=None, gps_date=None, raw_gps=None, raw_exif=None) -> Image.Exif:
    """An EXIF block as a camera writes it: GPS as unsigned (d, m, s) rationals with N/S, E/W refs."""
    e = Image.Exif()
    gps = dict(raw_gps or {})
    if lat is not None:
        gps.update({1: "N" if lat >= 0 else "S", 2: _dms(abs(lat)), 3: "E" if lon >= 0 else "W", 4: _dms(abs(lon))})
    if gps_time is not None:
        gps[7] = gps_time
    if gps_date is not None:
        gps[29] = gps_date
    if gps:
        e[0x8825] = gps
    ex = dict(raw_exif or {})
    if taken is not None:
        ex[0x9003] = taken
    if offset is not None:
        ex[0x9011] = offset
    if ex:
        e[0x8769] = ex
    return e


def _jpeg(im: Image.Image | None = None, **kw) -> bytes:
    return encode(im or photo(64, 48, seed=3), "JPEG", quality=95, exif=_exif(**kw))


def _raw_gps_jpeg(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A JPEG whose EXIF is written by hand (big-endian TIFF): IFD0 pointing at a GPS IFD with `entries`
    (tag, TIFF type, count, value bytes), so a tag can carry a type no camera should write."""
    n = len(entries)
    gps_at = 8 + 2 + 12 + 4
    data_at = gps_at + 2 + 12 * n + 4
    ifd0 = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + bytes.fromhex("8825") + (4).to_bytes(2, "big") + \
        (1).to_bytes(4, "big") + gps_at.to_bytes(4, "big") + bytes(4)
    table, data = (n).to_bytes(2, "big"), b""
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            field = value.ljust(4, b"\x00")
        else:
            field, data = (data_at + len(data)).to_bytes(4, "big"), data + value
        table += tag.to_bytes(2, "big") + typ.to_bytes(2, "big") + count.to_bytes(4, "big") + field
    return encode(photo(64, 48, seed=3), "JPEG", exif=b"Exif\x00\x00" + ifd0 + table + bytes(4) + data)


def _rationals(*vals: tuple[int, int]) -> bytes:
    return b"".join(n.to_bytes(4, "big") + d.to_bytes(4, "big") for n, d in vals)


# -- reading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lat, lon", [(48.8567, 2.3508), (-33.8568, 151.2153), (40.7128, -74.006), (-22.9068, -43.1729)])
def test_gps_signs_come_from_the_refs(lat, lon):
    m = read_metadata(_jpeg(lat=lat, lon=lon))
    assert m.gps == pytest.approx((lat, lon), abs=1e-6)
    assert m.ignored == ()


def test_rationals_are_read_as_degrees_minutes_seconds():
    raw = {1: "N", 2: (IFDRational(48, 1), IFDRational(51, 1), IFDRational(2410, 100)), 3: "W", 4: (IFDRational(2, 1), IFDRational(21, 1), IFDRational(3, 1))}
    m = read_metadata(_jpeg(raw_gps=raw))
    assert m.gps == pytest.approx((48 + 51 / 60 + 24.1 / 3600, -(2 + 21 / 60 + 3 / 3600)), abs=1e-9)


def test_distance_is_the_haversine_to_the_prediction():
    m = read_metadata(_jpeg(lat=0.0001, lon=1.0))
    c = cross_check(m, 0.0001, 0.0, radius_km_90=500.0)
    assert c["exif_gps"]["distance_km"] == pytest.approx(float(haversine_km(0.0001, 1.0, 0.0001, 0.0)), abs=0.05)
    assert c["exif_gps"]["distance_km"] == pytest.approx(111.2, abs=0.05)  # one degree of the equator
    assert c["note"] is None  # within the 90% radius: nothing to say
    far = cross_check(m, 0.0001, 0.0, radius_km_90=50.0)
    assert far["note"].startswith("the EXIF position is 111 km from the prediction, beyond its 90% radius of 50 km")
    assert "either the prediction is wrong or the metadata was edited" in far["note"] and "never uses EXIF" in far["note"]


def test_taken_at_with_an_offset_gives_utc_and_the_sun():
    m = read_metadata(_jpeg(taken="2024:06:01 14:03:00", offset="+02:00"))
    c = cross_check(m, 48.8567, 2.3508, 100.0)
    assert c["exif_gps"] is None and c["note"] is None
    assert (c["taken_at"], c["utc_offset"], c["taken_at_utc"], c["utc_from"]) == ("2024-06-01T14:03:00", "+02:00", "2024-06-01T12:03:00Z", UTC_FROM_OFFSET)
    west = cross_check(read_metadata(_jpeg(taken="2024:06:01 14:03:00", offset="-05:30")), 0, 0)
    assert (west["utc_offset"], west["taken_at_utc"]) == ("-05:30", "2024-06-01T19:33:00Z")


def test_taken_at_without_an_offset_is_local_only():
    c = cross_check(read_metadata(_jpeg(taken="2024:06:01 14:03:00")), 48.8567, 2.3508)
    assert c["taken_at"] == "2024-06-01T14:03:00"
    assert c["utc_offset"] is None and c["taken_at_utc"] is None and c["sun_elevation_deg"] is None and c["utc_from"] is None


def test_gps_date_and_time_stamps_are_utc():
    c = cross_check(read_metadata(_jpeg(taken="2024:06:01 14:03:00", gps_date="2024:06:01", gps_time=(12.0, 3.0, 30.0))), 48.8567, 2.3508)
    assert (c["taken_at"], c["utc_offset"], c["taken_at_utc"], c["utc_from"]) == ("2024-06-01T14:03:00", None, "2024-06-01T12:03:30Z", UTC_FROM_GPS)
    # a recorded offset is the capture moment itself: it wins over the GPS fix's time
    c = cross_check(read_metadata(_jpeg(taken="2024:06:01 14:03:00", offset="+02:00", gps_date="2024:06:01", gps_time=(12.0, 9.0, 0.0))), 0, 0)
    assert (c["taken_at_utc"], c["utc_from"]) == ("2024-06-01T12:03:00Z", UTC_FROM_OFFSET)


def test_sun_elevation_at_known_places_and_times():
    # the subsolar point at the March 2024 equinox noon: the sun is overhead (within the equation of time's ~2 degrees)
    c = cross_check(read_metadata(_jpeg(taken="2024:03:20 12:00:00", offset="+00:00")), 0.0, 0.0)
    assert c["sun_elevation_deg"] > 87.5
    # Sydney at local noon on 1 June (declination +22.0): 90 - (33.87 + 22.0) = 34.1 degrees
    c = cross_check(read_metadata(_jpeg(taken="2024:06:01 11:53:00", offset="+10:00")), -33.8688, 151.2093)
    assert c["sun_elevation_deg"] == pytest.approx(34.1, abs=0.5)
    # Paris at local midnight: well below the horizon
    c = cross_check(read_metadata(_jpeg(taken="2024:06:01 00:00:00", offset="+02:00")), 48.8567, 2.3508)
    assert c["sun_elevation_deg"] < -10
    # the elevation is the PREDICTED place's, not the EXIF position's
    m = read_metadata(_jpeg(lat=-33.8688, lon=151.2093, taken="2024:06:01 11:53:00", offset="+10:00"))
    at_paris = cross_check(m, 48.8567, 2.3508)
    assert at_paris["sun_elevation_deg"] == pytest.approx(sun_elevation_deg(48.8567, 2.3508, dt.datetime(2024, 6, 1, 1, 53, tzinfo=dt.timezone.utc)), abs=0.01)
    assert at_paris["sun_elevation_deg"] < 0


@pytest.mark.parametrize("raw_gps, raw_exif, why", [
    ({1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}, {}, "(0, 0)"),
    ({1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "out of range"),
    ({1: "N", 2: (45.0, 0.0, 0.0), 3: "E", 4: (181.0, 0.0, 0.0)}, {}, "out of range"),
    ({1: "N", 2: (45.0, 70.0, 0.0), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "not valid"),
    ({1: "N", 2: (45.0, 0.0, IFDRational(1, 0)), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "not valid"),
    ({1: "N", 2: (45.0, 0.0, 0.0, 1.0), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "not valid"),
    ({1: "N", 2: (45.0, 0.0, 0.0)}, {}, "not valid"),
    ({2: (45.0, 0.0, 0.0), 4: (2.0, 0.0, 0.0)}, {}, "hemisphere is unknown"),
    ({1: "X", 2: (45.0, 0.0, 0.0), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "hemisphere is unknown"),
    ({1: 7, 2: (45.0, 0.0, 0.0), 3: "E", 4: (2.0, 0.0, 0.0)}, {}, "hemisphere is unknown"),
    ({}, {0x9003: "yesterday at noon"}, "DateTimeOriginal ignored"),
    ({}, {0x9003: "2024:13:45 25:61:00"}, "DateTimeOriginal ignored"),
    ({}, {0x9003: "2024:06:01 14:03:00", 0x9011: "+99:00"}, "OffsetTimeOriginal ignored"),
    ({}, {0x9003: "2024:06:01 14:03:00", 0x9011: "CEST"}, "OffsetTimeOriginal ignored"),
])
def test_malformed_tags_are_absent_with_a_reason(raw_gps, raw_exif, why):
    m = read_metadata(_jpeg(raw_gps=raw_gps, raw_exif=raw_exif))
    assert m.gps is None and m.taken_at_utc is None
    assert len(m.ignored) == 1 and why in m.ignored[0], m.ignored
    c = cross_check(m, 10.0, 10.0)
    assert c["exif_gps"] is None and c["sun_elevation_deg"] is None and c["ignored"] == list(m.ignored)


@pytest.mark.parametrize("lat_entry, why", [
    ((2, 2, 11, b"forty-five\x00"), "not valid"),                      # latitude as text
    ((2, 5, 3, _rationals((45, 1), (0, 1), (1, 0))), "not valid"),      # a zero denominator
    ((2, 5, 2, _rationals((45, 1), (30, 1))), None),                    # degrees and minutes only: fine, 45.5
    ((2, 10, 3, _rationals((45, 1), (0, 1), (0, 1))), None),            # SRATIONAL instead of RATIONAL: read alike
])
def test_hand_written_gps_tags(lat_entry, why):
    entries = [(1, 2, 2, b"S\x00"), lat_entry, (3, 2, 2, b"W\x00"), (4, 5, 3, _rationals((2, 1), (21, 1), (3, 1)))]
    m = read_metadata(_raw_gps_jpeg(entries))
    if why:
        assert m.gps is None and why in m.ignored[0]
    else:
        assert m.gps[0] in (-45.5, -45.0) and m.gps[1] == pytest.approx(-(2 + 21 / 60 + 3 / 3600)) and m.ignored == ()


def test_placeholders_and_bad_gps_stamps_say_nothing():
    """The camera's 'unknown' (zeros, blanks) and an impossible GPS time are simply absent."""
    assert not read_metadata(_jpeg(taken="0000:00:00 00:00:00"))
    assert not read_metadata(_jpeg(taken="    :  :     :  :  "))
    assert not read_metadata(_jpeg(gps_date="2024:06:01", gps_time=(25.0, 0.0, 0.0)))
    assert not read_metadata(_jpeg(raw_gps={0: b"\x02\x02\x00\x00"}))  # a GPS IFD with a version and no position
    assert not read_metadata(encode(photo(32, 32), "JPEG"))
    assert not read_metadata(b"not an image") and not read_metadata(b"")


def _bytes_flipped(data: bytes, rng: random.Random, start: int, end: int, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        b[rng.randrange(start, end)] = rng.randrange(256)
    return bytes(b)


def test_fuzzed_exif_blocks_never_raise():
    """Random bytes written over the EXIF segment: reading never raises, and the upload decoder answers or refuses with a 4xx."""
    from pigeon.api.uploads import UploadError, decode_image

    data = _jpeg(lat=-33.8568, lon=151.2153, taken="2024:06:01 14:03:00", offset="+10:00", gps_date="2024:06:01", gps_time=(4.0, 3.0, 0.0))
    start = data.index(b"Exif\x00\x00") + 6
    end = start + int.from_bytes(data[start - 8 : start - 6], "big") - 8
    rng = random.Random(18)
    decoded = 0
    for i in range(150):
        bad = _bytes_flipped(data, rng, start, end, 1 + i % 8)
        m = read_metadata(bad)
        if m.gps is not None:
            assert -90 <= m.gps[0] <= 90 and -180 <= m.gps[1] <= 180 and m.gps != (0.0, 0.0)
        cross_check(m, 1.0, 2.0, 100.0)
        try:
            d = decode_image(bad, min_side=8)
        except UploadError as e:
            assert 400 <= e.status < 500
        else:
            decoded += 1
            assert d.metadata == m
    assert decoded > 120  # the pixels are intact: nearly every file is still answered


def test_metadata_fields_for_one_photo_and_for_views():
    a = {"lat": 48.0, "lon": 2.0, "radius_km_90": 300.0}
    none, some = read_metadata(_jpeg()), read_metadata(_jpeg(lat=48.5, lon=2.5))
    assert metadata_fields(a, [none]) == {} and metadata_fields(a, [none, none], several=True) == {}
    one = metadata_fields(a, [some])
    assert set(one) == {"metadata"} and one["metadata"]["exif_gps"]["lat"] == 48.5
    views = metadata_fields(a, [none, some], several=True)
    assert views["metadata"] == one["metadata"] and views["view_metadata"] == [None, one["metadata"]]


# -- the API -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    from pigeon.api import Settings, create_app

    with TestClient(create_app(tiny_predictor(), Settings(warmup=False))) as c:
        yield c


def _post(client, data: bytes, name="p.jpg", **form):
    return client.post("/locate", files={"image": (name, data, "image/jpeg")}, data={k: str(v) for k, v in form.items()})


def _same(a: dict, b: dict) -> None:
    """The answers are identical, to the bit: EXIF never touched them."""
    for key in ("lat", "lon", "confidence", "radius_km_50", "radius_km_90", "top_cells", "countries", "admin1", "refinement", "region_at_answer"):
        assert a[key] == b[key], key


def test_api_reports_metadata_and_never_uses_it(client):
    im = photo(96, 72, seed=40)
    plain = _post(client, _jpeg(im)).json()
    assert "metadata" not in plain and "view_metadata" not in plain and plain["exif_gps_present"] is False
    far = (-plain["lat"], plain["lon"] + 180 if plain["lon"] <= 0 else plain["lon"] - 180)  # the antipode: as far as it gets
    for lat, lon in (far, (plain["lat"] + 0.01, plain["lon"])):
        tagged_bytes = _jpeg(im, lat=lat, lon=lon, taken="2024:06:01 14:03:00", offset="+02:00")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(tagged_bytes))), np.asarray(Image.open(io.BytesIO(_jpeg(im)))))  # same pixels
        r = _post(client, tagged_bytes)
        assert r.status_code == 200, r.text
        a = r.json()
        _same(a, plain)
        m = a["metadata"]
        assert a["exif_gps_present"] is True
        assert m["exif_gps"]["lat"] == pytest.approx(lat, abs=1e-6) and m["exif_gps"]["lon"] == pytest.approx(lon, abs=1e-6)
        assert m["exif_gps"]["distance_km"] == pytest.approx(float(haversine_km(lat, lon, a["lat"], a["lon"])), abs=0.05)
        assert (m["taken_at"], m["utc_offset"], m["taken_at_utc"]) == ("2024-06-01T14:03:00", "+02:00", "2024-06-01T12:03:00Z")
        assert m["sun_elevation_deg"] == pytest.approx(sun_elevation_deg(a["lat"], a["lon"], dt.datetime(2024, 6, 1, 12, 3, tzinfo=dt.timezone.utc)), abs=0.01)
    assert m["note"] is None  # 1 km away: within the 90% radius
    far_answer = _post(client, _jpeg(im, lat=far[0], lon=far[1])).json()["metadata"]
    assert far_answer["exif_gps"]["distance_km"] == pytest.approx(20015, abs=5)
    assert "either the prediction is wrong or the metadata was edited" in far_answer["note"]
    assert far_answer["taken_at"] is None and far_answer["sun_elevation_deg"] is None


def test_api_answers_malformed_exif_without_a_500(client):
    im = photo(96, 72, seed=41)
    plain = _post(client, _jpeg(im)).json()
    r = _post(client, _jpeg(im, raw_gps={1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}, raw_exif={0x9003: "garbage"}))
    assert r.status_code == 200, r.text
    a = r.json()
    _same(a, plain)
    assert a["metadata"]["exif_gps"] is None and len(a["metadata"]["ignored"]) == 2
    data = _jpeg(im, lat=10.0, lon=20.0)
    start = data.index(b"Exif\x00\x00") + 6
    rng = random.Random(5)
    for _ in range(20):
        r = _post(client, _bytes_flipped(data, rng, start, start + 120, 6))
        assert r.status_code in (200, 400), r.text


def test_api_batch_and_views_carry_metadata(client):
    ims = [photo(96, 72, seed=s) for s in (42, 43)]
    files = [("images", ("a.jpg", _jpeg(ims[0], lat=35.68, lon=139.69), "image/jpeg")), ("images", ("b.jpg", _jpeg(ims[1]), "image/jpeg"))]
    res = client.post("/locate/batch", files=files).json()["results"]
    assert res[0]["result"]["metadata"]["exif_gps"]["lat"] == pytest.approx(35.68)
    assert "metadata" not in res[1]["result"]
    # several views of one place: `metadata` is the first view that has any, `view_metadata` each view's
    views = [("image", ("n.jpg", _jpeg(ims[0]), "image/jpeg")), ("image", ("s.jpg", _jpeg(ims[1], taken="2024:06:01 14:03:00"), "image/jpeg"))]
    a = client.post("/locate", files=views, data={"same_place": "true"}).json()
    assert a["metadata"]["taken_at"] == "2024-06-01T14:03:00"
    assert a["view_metadata"][0] is None and a["view_metadata"][1] == a["metadata"]
    plain = client.post("/locate", files=[views[0], ("image", ("s.jpg", _jpeg(ims[1]), "image/jpeg"))], data={"same_place": "true"}).json()
    assert "metadata" not in plain and "view_metadata" not in plain
    _same(a, plain)
    placed = client.post("/locate/batch", files=[(k, v) for k, v in files], data={"place": ["p", "p"]}).json()["results"]
    assert placed[0]["result"]["view_metadata"][1] is None and placed[0]["result"]["metadata"]["exif_gps"]["lon"] == pytest.approx(139.69)


def test_openapi_documents_the_metadata(client):
    s = client.get("/openapi.json").json()["components"]["schemas"]
    props = s["PhotoMetadata"]["properties"]
    assert {"exif_gps", "taken_at", "utc_offset", "taken_at_utc", "sun_elevation_deg", "note", "ignored"} <= set(props)
    assert all(p.get("description") for k, p in props.items())
    assert "metadata" in s["Location"]["properties"] and "view_metadata" in s["Location"]["properties"]


# -- the CLI -------------------------------------------------------------------------------------------
def test_cli_reports_metadata_for_files(tmp_path, capsys):
    from worlds import cli

    im = photo(96, 72, seed=44)
    (tmp_path / "a_tagged.png").write_bytes(encode(im, "PNG", exif=_exif(lat=-33.8568, lon=151.2153, taken="2024:06:01 11:53:00", offset="+10:00")))
    (tmp_path / "b_plain.png").write_bytes(encode(im, "PNG"))
    bundle = str(tiny_bundle())
    assert cli(["locate", str(tmp_path), "--bundle", bundle]) == 0
    lines = sorted(capsys.readouterr().out.strip().splitlines())
    assert len(lines) == 2 and "\tEXIF GPS " in lines[0] and lines[0].endswith(" km away") and "EXIF" not in lines[1]
    assert lines[0].split("\t")[1:3] == lines[1].split("\t")[1:3]  # same pixels, same answer

    out = tmp_path / "r.csv"
    assert cli(["locate", str(tmp_path), "--bundle", bundle, "--out", str(out)]) == 0
    t = pd.read_csv(out).sort_values("image").reset_index(drop=True)
    assert list(t.columns[-3:]) == ["exif_lat", "exif_lon", "exif_distance_km"] and "country_at_answer" in t.columns
    assert t["exif_lat"][0] == pytest.approx(-33.8568) and t["exif_lon"][0] == pytest.approx(151.2153) and pd.isna(t["exif_lat"][1])
    assert t["exif_distance_km"][0] == pytest.approx(float(haversine_km(-33.8568, 151.2153, t["lat"][0], t["lon"][0])), abs=0.05)
    assert (t["lat"][0], t["lon"][0]) == (t["lat"][1], t["lon"][1])

    gj = tmp_path / "r.geojson"
    assert cli(["locate", str(tmp_path), "--bundle", bundle, "--out", str(gj)]) == 0
    props = {f["properties"]["image"].rsplit("/", 1)[1]: f["properties"] for f in json.loads(gj.read_text())["features"] if f["properties"]["kind"] == "answer"}
    m = props["a_tagged.png"]["metadata"]
    assert m["taken_at_utc"] == "2024-06-01T01:53:00Z" and m["exif_gps"]["lat"] == pytest.approx(-33.8568)
    assert "metadata" not in props["b_plain.png"]

    (tmp_path / "a_tagged.png").unlink()
    plain_csv = tmp_path / "plain.csv"
    assert cli(["locate", str(tmp_path / "b_plain.png"), "--bundle", bundle, "--out", str(plain_csv)]) == 0
    assert not any(c.startswith("exif_") for c in pd.read_csv(plain_csv).columns)  # no EXIF, the columns as before


def test_cli_same_place_reports_each_view(tmp_path):
    from pigeon.commands.locate import locate_places

    ims = [photo(96, 72, seed=s) for s in (45, 46)]
    (tmp_path / "1.png").write_bytes(encode(ims[0], "PNG"))
    (tmp_path / "2.png").write_bytes(encode(ims[1], "PNG", exif=_exif(lat=61.0, lon=10.0)))
    answers, failures = locate_places([tmp_path], tiny_bundle())
    assert not failures and len(answers) == 1
    a = answers[0]
    assert a["view_metadata"][0] is None and a["metadata"] == a["view_metadata"][1]
    assert a["metadata"]["exif_gps"] == {"lat": 61.0, "lon": 10.0, "distance_km": pytest.approx(float(haversine_km(61.0, 10.0, a["lat"], a["lon"])), abs=0.05)}
