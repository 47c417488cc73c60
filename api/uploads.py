"""Uploaded image validation: type from the bytes, size and pixel limits before decoding, safe decoding.

Every refusal is an `UploadError` carrying the HTTP status, a short error code and a plain
sentence that names the upload (`image (photo.jpg)`, `images[2] (b.png)`), so the app can answer
`{error, detail}` without guessing. No decoder message goes out: they name Python objects
(`<_io.BytesIO object at 0x...>`) or limits that are not ours. Nothing here trusts the client's
filename or Content-Type; the first bytes decide the format.

Two steps, so a request's pixel budget can be checked over all its images before any is decoded:
`probe_image` reads the header only (format, size; 413 over `max_pixels`, 422 under `min_side`),
`check_request_pixels` sums the probed headers against `max_request_pixels` (413 for the request),
`decode_probed` decodes the pixels, fully and once, and refuses what does not decode (400).

Decisions (documented in docs/serve.md):
- JPEG, PNG and WebP are accepted (animated PNG/WebP: the first frame). GIF, BMP, TIFF, zip,
  text... are refused with 415.
- The pixel count is read from the header and checked *before* decoding (413), so a
  60000x60000 PNG costs nothing.
- Files that claim a format but do not decode (truncated, corrupt data, text behind an image
  signature) -> 400. A PNG's pixel data is compressed and filtered, so corruption there shows;
  a JPEG has no checksum, so flipped bits in its scan decode into wrong pixels without an error.
- Images smaller than `min_side` pixels on a side (a 1x1 image carries no information) -> 422.
- Large images are brought down to about the backbone's input size while decoding: JPEG at
  reduced scale (libjpeg's DCT scaling), PNG/WebP (no reduced decode) by an integer box
  reduction right after decoding, so only one full-size image is ever held at a time.
- CMYK, grayscale, palette, 16-bit and alpha images are valid photos: converted to 8-bit RGB
  (alpha over white) and answered.
- EXIF orientation is applied; EXIF GPS is only *reported* (`exif_gps_present`, and the position and
  capture time in `metadata`, read here once by `pigeon.exif.read_exif`), never used; malformed EXIF
  is ignored.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pigeon.exif import NO_METADATA, PhotoMetadata, read_exif

# Our own pixel limit is checked first; PIL's warning (between 1x and 2x its default) is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_GPS_IFD = 0x8825
_ORIENTATION = 0x0112
ACCEPTED = ("jpeg", "png", "webp")
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_REDUCIBLE = ("RGB", "L", "RGBA", "LA", "CMYK", "I", "F")  # modes Image.reduce handles (not P, 1, I;16)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, IndexError, TypeError, MemoryError)
_FIX = "send the complete, original file"


class UploadError(Exception):
    """A refused upload: HTTP `status`, machine-readable `code`, human `detail`."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def as_item(self) -> dict:
        """The per-item error of a batch answer: `{error, detail, status}`."""
        return {"error": self.code, "detail": self.detail, "status": self.status}


@dataclass
class DecodedImage:
    """A decoded upload: RGB image ready for the backbone, plus what the file said about itself."""

    image: Image.Image
    format: str
    width: int  # original (header) size, after EXIF orientation
    height: int
    exif_gps_present: bool
    metadata: PhotoMetadata = NO_METADATA  # the file's own EXIF position and capture time (reported, never used)


@dataclass
class ProbedImage:
    """An upload whose header was read (format and size known, within limits); pixels not decoded yet."""

    im: Image.Image
    format: str
    width: int
    height: int
    label: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def upload_label(field: str, filename: str | None) -> str:
    """How a detail names an upload: the form field and the client's file name (printable, cut to 80)."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:80]
    return f"{field} ({name})" if name else field


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes ('jpeg' | 'png' | 'webp' | 'gif' | ... | None); ignores headers and names."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    return None


def too_many_pixels(label: str, size: str, limit: int) -> UploadError:
    """413 naming the upload, its size and the limit in force (ours, or PIL's guard where that is lower)."""
    if Image.MAX_IMAGE_PIXELS:
        limit = min(limit, 2 * int(Image.MAX_IMAGE_PIXELS))
    return UploadError(413, "too_many_pixels", f"{label} is {size} pixels; the limit is {limit} pixels per image (width x height); downscale it first")


def _open(data: bytes, fmt: str, label: str, max_pixels: int) -> Image.Image:
    """Image.open (header only), with PIL's errors turned into our sentences."""
    try:
        return Image.open(io.BytesIO(data), formats=[fmt.upper()])
    except Image.DecompressionBombError as e:
        # PIL's own guard (2x Image.MAX_IMAGE_PIXELS) fires before we see the size: take the count from its message
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise too_many_pixels(label, m.group(1) if m else "over the limit of", max_pixels) from None
    except (UnidentifiedImageError, *_DECODE_ERRORS):
        f = fmt.upper()
        raise UploadError(400, "bad_image", f"{label} starts like a {f} but is not a readable {f} (damaged, or not an image); {_FIX}") from None


def probe_image(data: bytes, *, label: str = "image", max_pixels: int = 50_000_000, min_side: int = 16) -> ProbedImage:
    """Check an upload up to its header: not empty (400), a format we read (415), within the pixel
    limit (413) and not too small (422). Nothing is decoded."""
    if not data:
        raise UploadError(400, "empty_file", f"{label} is empty; send a JPEG, PNG or WebP photo")
    fmt = sniff_format(data)
    if fmt not in ACCEPTED:
        what = f"a {fmt.upper()} file" if fmt else "not an image this service reads"
        raise UploadError(415, "unsupported_media_type", f"{label} is {what}; send a JPEG, PNG or WebP photo")
    im = _open(data, fmt, label, max_pixels)
    w, h = im.size
    if w * h > max_pixels:
        raise too_many_pixels(label, f"{w}x{h} = {w * h}", max_pixels)
    if min(w, h) < min_side:
        raise UploadError(422, "image_too_small", f"{label} is {w}x{h} pixels; at least {min_side} pixels on each side are needed to locate anything")
    return ProbedImage(im=im, format=fmt, width=w, height=h, label=label)


def check_request_pixels(probed: Sequence[ProbedImage], limit: int) -> int:
    """The per-request pixel budget: 413 `too_many_pixels` when the images' width x height, read from
    their headers, add up to more than `limit` (checked before any is decoded, so a request's decoded
    memory stays bounded whatever each image's own limit allows). Returns the total."""
    total = sum(p.pixels for p in probed)
    if total > limit:
        raise UploadError(413, "too_many_pixels", f"the {len(probed)} images of this request are {total} pixels together (width x height, "
                                                  f"from their headers); the limit is {limit} pixels per request; send fewer or smaller images")
    return total


def _exif_facts(im: Image.Image) -> tuple[bool, int, PhotoMetadata]:
    """(EXIF GPS present, EXIF orientation 1..8, the file's metadata), from an image already loaded (so
    reading the EXIF decodes nothing). Malformed EXIF says nothing about any; the pixels are still fine."""
    try:
        exif = im.getexif()
    except Exception:  # any parse error in third-party EXIF: treat as no EXIF
        return False, 1, NO_METADATA
    try:
        gps = bool(exif.get_ifd(_GPS_IFD)) or _GPS_IFD in exif and bool(exif[_GPS_IFD])
    except Exception:
        gps = False
    orientation = exif.get(_ORIENTATION, 1)
    return gps, orientation if orientation in _TRANSPOSE else 1, read_exif(exif)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode a JPEG/PNG/WebP can decode to (16-bit scaled, alpha over white)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float32)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        g = np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB...


def _shrunk_rgb(im: Image.Image, draft_size: int | None) -> Image.Image:
    """8-bit RGB, box-reduced by the largest integer factor that keeps the shorter side >= draft_size.
    The full-size decode is dropped as soon as the reduced copy exists."""
    factor = min(im.size) // draft_size if draft_size else 1
    if factor < 2:
        return _to_rgb(im)
    if im.mode not in _REDUCIBLE:
        im = _to_rgb(im)
    return _to_rgb(im.reduce(factor))


def decode_probed(p: ProbedImage, draft_size: int | None = 256) -> DecodedImage:
    """Decode a probed upload fully, once; anything that does not decode is a 400 naming the upload.

    `draft_size` brings large images down to about the model's input size (shorter side still >=
    draft_size): JPEG decodes at reduced scale (libjpeg's DCT scaling), and every format is then
    box-reduced by an integer factor. The app passes the backbone's input size; None keeps full size.
    """
    im, w, h = p.im, p.width, p.height
    try:
        if draft_size and p.format == "jpeg" and min(w, h) > draft_size:
            # draft() keeps both sides >= the request: ask for the aspect-preserving box whose
            # shorter side is draft_size, so a 4032x3024 photo decodes at 1/8 scale, not in full.
            s = draft_size / min(w, h)
            im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()  # the one full decode: a truncated or corrupt stream raises here
    except Image.DecompressionBombError:  # PIL's guard, when it is lower than our max_pixels
        raise too_many_pixels(p.label, f"{w}x{h} = {w * h}", w * h) from None
    except _DECODE_ERRORS as e:
        what = "cut short (truncated)" if isinstance(e, EOFError) or "truncated" in str(e) else "corrupt"
        raise UploadError(400, "bad_image", f"{p.label} is a damaged {p.format.upper()}: its image data is {what}; {_FIX}") from None
    gps, orientation, metadata = _exif_facts(im)
    rgb = im
    try:
        rgb = _shrunk_rgb(im, draft_size)
        if orientation != 1:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
    except _DECODE_ERRORS:
        raise UploadError(400, "bad_image", f"{p.label} is a {p.format.upper()} whose pixels cannot be converted to RGB; {_FIX}") from None
    finally:
        if rgb is not im:  # drop the full-size decode now (the probe keeps a reference to `im`)
            im.close()
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return DecodedImage(image=rgb, format=p.format, width=ow, height=oh, exif_gps_present=gps, metadata=metadata)


def decode_image(
    data: bytes,
    *,
    label: str = "image",
    max_pixels: int = 50_000_000,
    min_side: int = 16,
    draft_size: int | None = 256,
) -> DecodedImage:
    """Validate and decode one upload (`probe_image`, then `decode_probed`); raise `UploadError` (4xx)
    for anything that is not a usable photo."""
    return decode_probed(probe_image(data, label=label, max_pixels=max_pixels, min_side=min_side), draft_size)
