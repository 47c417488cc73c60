"""A corpus of bad (and awkward-but-valid) uploads, generated here: each gets a JSON 4xx (or a 200 when
it is in fact a usable photo), never a 5xx, and the server stays healthy after all of them."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pigeon.api import Settings, create_app
from api_support import encode, photo, tiny_predictor

torch.set_num_threads(2)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(w: int, h: int, depth: int = 8, ctype: int = 2, idat: bytes = b"") -> bytes:
    """A PNG that claims w x h pixels (the IHDR is all a dimension check needs)."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b"")


def _png16_rgb(w: int = 40, h: int = 30) -> bytes:
    """A real 16-bit-per-channel RGB PNG (PIL cannot write one), filter 0 rows."""
    rng = np.random.default_rng(0)
    px = rng.integers(0, 65535, (h, w, 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    return _png_header(w, h, depth=16, ctype=2, idat=raw)


def _jpeg_claiming(w: int, h: int) -> bytes:
    data = bytearray(encode(photo(32, 32)))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _webp_vp8x_claiming(w: int, h: int) -> bytes:
    vp8x = struct.pack("<I", 0) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _frames(fmt: str, **kw) -> bytes:
    frames = [photo(seed=s) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", encode(photo()))
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    return encode(photo().convert("CMYK"), "JPEG")


def _gray16_png() -> bytes:
    arr = (np.linspace(0, 65535, 96 * 72).reshape(72, 96)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def _palette_transparent() -> bytes:
    im = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(im, "PNG", transparency=0)


def _bad_crc_png() -> bytes:
    data = bytearray(encode(photo(), "PNG"))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def _corrupt_scan_jpeg() -> bytes:
    data = bytearray(encode(photo(200, 150)))
    mid = len(data) // 2
    data[mid : mid + 200] = np.random.default_rng(1).integers(0, 255, 200, dtype=np.uint8).tobytes()
    return bytes(data)


def _bad_exif_jpeg() -> bytes:
    data = encode(photo())
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 10) + b"Exif\x00\x00" + b"MM\x00*\xff\xff\xff\xff\x00\x00"
    return data[:2] + app1 + data[2:]


JPEG = encode(photo())
PNG = encode(photo(), "PNG")
V = {200}  # a usable photo: answered

# name -> (file bytes, declared content type, accepted statuses)
FILES: dict[str, tuple[bytes, str, set[int]]] = {
    "empty": (b"", "image/jpeg", {400}),
    "truncated_jpeg_half": (JPEG[: len(JPEG) // 2], "image/jpeg", {400}),
    "jpeg_signature_only": (JPEG[:20], "image/jpeg", {400}),
    "truncated_png_half": (PNG[: len(PNG) // 2], "image/png", {400}),
    "png_signature_only": (PNG[:8], "image/png", {400}),
    "text_behind_jpeg_magic": (b"\xff\xd8\xff" + b"hello, this is not a photo" * 20, "image/jpeg", {400}),
    "text_behind_png_magic": (b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20, "image/png", {400}),
    "riff_webp_garbage": (b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x00" * 24, "image/webp", {400}),
    "png_bad_crc": (_bad_crc_png(), "image/png", {400}),
    "plain_text": (b"just some text\n" * 10, "text/plain", {415}),
    "html": (b"<!doctype html><html><body>hi</body></html>", "text/html", {415}),
    "json": (b'{"image": "nope"}', "application/json", {415}),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"/>', "image/svg+xml", {415}),
    "zip": (_zip(), "application/zip", {415}),
    "gzip": (gzip.compress(JPEG), "application/gzip", {415}),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "application/pdf", {415}),
    "gif_static": (encode(photo(), "GIF"), "image/gif", {415}),
    "gif_animated": (_frames("GIF"), "image/gif", {415}),
    "gif_declared_as_jpeg": (encode(photo(), "GIF"), "image/jpeg", {415}),
    "bmp": (encode(photo(), "BMP"), "image/bmp", {415}),
    "tiff": (encode(photo(), "TIFF"), "image/tiff", {415}),
    "ico": (encode(photo(32, 32), "ICO"), "image/x-icon", {415}),
    "random_bytes": (np.random.default_rng(2).integers(0, 255, 4096, dtype=np.uint8).tobytes(), "image/jpeg", {415}),
    "one_by_one_png": (encode(Image.new("RGB", (1, 1)), "PNG"), "image/png", {422}),
    "one_by_one_jpeg": (encode(Image.new("RGB", (1, 1))), "image/jpeg", {422}),
    "sliver_8x500": (encode(photo(8, 500), "PNG"), "image/png", {422}),
    "png_header_60000x60000": (_png_header(60000, 60000), "image/png", {413}),
    "png_header_9000x9000": (_png_header(9000, 9000), "image/png", {413}),
    "jpeg_header_60000x60000": (_jpeg_claiming(60000, 60000), "image/jpeg", {413}),
    "webp_header_16384x16384": (_webp_vp8x_claiming(16384, 16384), "image/webp", {400, 413}),
    "cmyk_jpeg": (_cmyk_jpeg(), "image/jpeg", V),
    "gray16_png": (_gray16_png(), "image/png", V),
    "rgb16_png": (_png16_rgb(), "image/png", V),
    "grayscale_jpeg": (encode(photo().convert("L")), "image/jpeg", V),
    "palette_transparent_png": (_palette_transparent(), "image/png", V),
    "rgba_png": (encode(photo().convert("RGBA"), "PNG"), "image/png", V),
    "la_png": (encode(photo().convert("LA"), "PNG"), "image/png", V),
    "webp": (encode(photo(), "WEBP"), "image/webp", V),
    "webp_animated": (_frames("WEBP"), "image/webp", V),
    "apng": (_frames("PNG"), "image/png", V),
    "progressive_jpeg": (encode(photo(), "JPEG", progressive=True), "image/jpeg", V),
    "jpeg_declared_text_plain": (JPEG, "text/plain", V),
    "jpeg_broken_exif": (_bad_exif_jpeg(), "image/jpeg", {200, 400}),
    "jpeg_corrupt_scan": (_corrupt_scan_jpeg(), "image/jpeg", {200, 400}),
}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(tiny_predictor(), Settings(max_batch=4, warmup=False))) as c:
        yield c


def _check(r, accepted: set[int]):
    assert r.status_code < 500, r.text
    assert r.status_code in accepted, (r.status_code, r.text)
    body = r.json()
    if r.status_code >= 400:
        assert set(body) == {"error", "detail"} and body["error"] and body["detail"], body
    else:
        assert -90 <= body["lat"] <= 90 and -180 <= body["lon"] <= 180
    return body


@pytest.mark.parametrize("name", list(FILES))
def test_bad_file(client, name):
    data, ctype, accepted = FILES[name]
    body = _check(client.post("/locate", files={"image": (f"{name}.bin", data, ctype)}), accepted)
    if name.startswith("png_header") or name.startswith("jpeg_header"):
        assert body["error"] == "too_many_pixels"


def _raw(client, body: bytes, ctype: str, path: str = "/locate"):
    return client.post(path, content=body, headers={"content-type": ctype})


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, fname, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{fname}"' if fname else "")
        ctype = b"Content-Type: application/octet-stream\r\n" if fname else b""
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode() + ctype + b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


REQUESTS = {
    "missing_image_field": (lambda c: c.post("/locate", data={"top_k": "3"}), {422}),
    "wrong_field_name": (lambda c: c.post("/locate", files={"file": ("p.jpg", JPEG, "image/jpeg")}), {422}),
    "image_as_text_field": (lambda c: _raw(c, *_multipart([("image", None, b"not a file")])), {422}),
    "two_files": (lambda c: c.post("/locate", files=[("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b.jpg", JPEG, "image/jpeg"))]), {422}),
    "top_k_not_a_number": (lambda c: c.post("/locate", files={"image": ("p.jpg", JPEG, "image/jpeg")}, data={"top_k": "abc"}), {422}),
    "top_k_negative": (lambda c: c.post("/locate", files={"image": ("p.jpg", JPEG, "image/jpeg")}, data={"top_k": "-1"}), {422}),
    "explain_not_a_bool": (lambda c: c.post("/locate", files={"image": ("p.jpg", JPEG, "image/jpeg")}, data={"explain": "maybe"}), {422}),
    "json_body": (lambda c: c.post("/locate", json={"image": "aGVsbG8="}), {422}),
    "raw_jpeg_body": (lambda c: _raw(c, JPEG, "image/jpeg"), {422}),
    "no_content_type": (lambda c: c.post("/locate", content=JPEG), {422}),
    "multipart_without_boundary": (lambda c: _raw(c, JPEG, "multipart/form-data"), {400, 422}),
    "multipart_wrong_boundary": (lambda c: _raw(c, _multipart([("image", "p.jpg", JPEG)], "AAA")[0], "multipart/form-data; boundary=BBB"), {400, 422}),
    "multipart_truncated": (lambda c: _raw(c, _multipart([("image", "p.jpg", JPEG)])[0][:300], _multipart([])[1]), {400, 422}),
    "too_many_fields": (lambda c: _raw(c, *_multipart([("image", "p.jpg", JPEG)] + [(f"f{i}", None, b"x") for i in range(40)])), {400}),
    "huge_text_field": (lambda c: _raw(c, *_multipart([("image", "p.jpg", JPEG), ("top_k", None, b"1" * 200_000)])), {400, 422}),
    "batch_too_many": (lambda c: c.post("/locate/batch", files=[("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(5)]), {413}),
    "batch_no_images": (lambda c: c.post("/locate/batch", data={"top_k": "2"}), {422}),
    "batch_wrong_field": (lambda c: c.post("/locate/batch", files={"image": ("p.jpg", JPEG, "image/jpeg")}), {422}),
    "oversize_with_length": (lambda c: c.post("/locate", files={"image": ("big.jpg", JPEG + b"\x00" * (21 * 1024 * 1024), "image/jpeg")}), {413}),
    "oversize_chunked": (lambda c: c.post("/locate", content=(b"\x00" * (1 << 20) for _ in range(22)), headers={"content-type": "multipart/form-data; boundary=XyZ"}), {413}),
    "bad_content_length": (lambda c: c.post("/locate", content=JPEG, headers={"content-type": "image/jpeg", "content-length": "abc"}), {400}),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_bad_request(client, name):
    send, accepted = REQUESTS[name]
    body = _check(send(client), accepted)
    if name.startswith("oversize"):
        assert body["error"] == "payload_too_large"


def test_corpus_is_large_and_server_healthy_after(client):
    assert len(FILES) + len(REQUESTS) >= 40
    for name, (data, ctype, accepted) in FILES.items():  # once more, back to back
        _check(client.post("/locate", files={"image": (name, data, ctype)}), accepted)
    assert client.get("/health").json() == {"status": "ok", "in_flight": 0, "capacity": 9, "cells": 8}
    r = client.post("/locate", files={"image": ("ok.jpg", JPEG, "image/jpeg")})
    assert r.status_code == 200 and r.json()["top_cells"]


def test_decoded_pixels_are_sensible():
    """CMYK and 16-bit inputs are converted to the same-looking 8-bit RGB, not clipped to white."""
    from pigeon.api.uploads import decode_image

    ref = np.asarray(photo(), dtype=np.float32)
    cmyk = np.asarray(decode_image(_cmyk_jpeg()).image, dtype=np.float32)
    assert np.abs(cmyk - ref).mean() < 12
    g16 = np.asarray(decode_image(_gray16_png()).image)
    assert g16.shape == (72, 96, 3) and g16[0, 0, 0] == 0 and g16[-1, -1, 0] == 255 and 100 < g16.mean() < 155
