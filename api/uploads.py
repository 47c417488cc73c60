"""Uploaded image validation: type from the bytes, size and pixel limits before decoding, safe decoding.

Every refusal is an `UploadError` carrying the HTTP status and a short error code, so the app can
answer `{error, detail}` without guessing. Nothing here trusts the client's filename or
Content-Type; the first bytes decide the format.

Decisions (documented in docs/serve.md):
- JPEG, PNG and WebP are accepted (animated PNG/WebP: the first frame). GIF, BMP, TIFF, zip,
  text... are refused with 415.
- The pixel count is read from the header and checked *before* decoding (413), so a
  60000x60000 PNG costs nothing; PIL's own decompression-bomb guard is a second line.
- Files that claim a format but do not decode (truncated, text behind an image signature) -> 400.
- Images smaller than `min_side` pixels on a side (a 1x1 image carries no information) -> 422.
- CMYK, grayscale, palette, 16-bit and alpha images are valid photos: converted to 8-bit RGB
  (alpha over white) and answered.
- EXIF orientation is applied; EXIF GPS is only *reported* (`exif_gps_present`), never used.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own pixel limit is checked first; PIL's warning (between 1x and 2x its default) is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_GPS_IFD = 0x8825
ACCEPTED = ("jpeg", "png", "webp")


class UploadError(Exception):
    """A refused upload: HTTP `status`, machine-readable `code`, human `detail`."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass
class DecodedImage:
    """A decoded upload: RGB image ready for the backbone, plus what the file said about itself."""

    image: Image.Image
    format: str
    width: int  # original (header) size, after EXIF orientation
    height: int
    exif_gps_present: bool


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


def _has_gps(im: Image.Image) -> bool:
    try:
        exif = im.getexif()
        return bool(exif.get_ifd(_GPS_IFD)) or _GPS_IFD in exif and bool(exif[_GPS_IFD])
    except Exception:  # malformed EXIF says nothing about GPS; the pixels may still be fine
        return False


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
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB...


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 50_000_000,
    min_side: int = 16,
    draft_size: int | None = 256,
) -> DecodedImage:
    """Validate and decode an uploaded image; raise `UploadError` (4xx) for anything that is not a usable photo.

    `draft_size` lets JPEG decode at a reduced scale (libjpeg's DCT scaling, shorter side still
    >= draft_size): the backbone sees ~224 pixels, so decoding a 12-megapixel photo in full would
    be wasted time. The app passes the backbone's input size; None decodes in full.
    """
    if not data:
        raise UploadError(400, "empty_file", "the uploaded file is empty; send a JPEG, PNG or WebP photo")
    fmt = sniff_format(data)
    if fmt not in ACCEPTED:
        what = f"a {fmt.upper()} file" if fmt else "not an image this service reads"
        raise UploadError(415, "unsupported_media_type", f"the upload is {what}; send a JPEG, PNG or WebP photo")
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt.upper()])
    except Image.DecompressionBombError as e:
        raise UploadError(413, "too_many_pixels", f"the image is too large to decode ({e}); the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as e:
        raise UploadError(400, "bad_image", f"the file starts like a {fmt.upper()} but cannot be read ({_short(e)}); send a complete, valid image") from None
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise UploadError(413, "too_many_pixels", f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels; downscale it first")
        if min(w, h) < min_side:
            raise UploadError(422, "image_too_small", f"the image is {w}x{h}; at least {min_side} pixels on each side are needed to locate anything")
        gps = _has_gps(im)
        try:
            swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except Exception:
            swapped = False
        if draft_size and fmt == "jpeg" and min(w, h) > draft_size:
            # draft() keeps both sides >= the request: ask for the aspect-preserving box whose
            # shorter side is draft_size, so a 4032x3024 photo decodes at 1/8 scale, not in full.
            s = draft_size / min(w, h)
            im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        rgb.load()
    except UploadError:
        raise
    except Image.DecompressionBombError as e:
        raise UploadError(413, "too_many_pixels", f"the image is too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, IndexError, TypeError, MemoryError) as e:
        raise UploadError(400, "bad_image", f"the {fmt.upper()} image cannot be decoded ({_short(e)}); send a complete, valid image") from None
    ow, oh = (h, w) if swapped else (w, h)
    return DecodedImage(image=rgb, format=fmt, width=ow, height=oh, exif_gps_present=gps)


def _short(e: BaseException) -> str:
    s = str(e) or type(e).__name__
    return s if len(s) <= 160 else s[:157] + "..."
