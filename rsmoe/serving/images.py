"""Uploaded bytes -> the model's pixel array, refusing what should not be decoded.

Checks happen in the cheapest order: the format is sniffed from the header (an allow-list, so PIL
never hands a file to an external decoder such as Ghostscript), the pixel count is read from the
header and checked BEFORE any pixel is decoded (decompression bombs), then the full decode runs
with truncated files refused (PIL's LOAD_TRUNCATED_IMAGES stays False). Preprocessing is
`rsmoe.data.loader.preprocess_image`, the same function training uses.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsmoe.data.loader import preprocess_image

# Formats a remote-sensing user uploads. Everything else is refused before PIL picks a plugin.
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a full 6000 x 6000 aerial tile passes; bombs do not

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)


class InputError(Exception):
    """Bad client input: `status` is the HTTP status to answer with, str(exc) the one-line message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def decode_base64(text: str, field: str) -> bytes:
    """Plain base64 or a `data:<mime>;base64,<...>` URL -> bytes."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(400, f"field '{field}' is empty: give the image as base64 or a data: URL", field)
    s = text.strip()
    if s.startswith("data:"):
        m = _DATA_URL.match(s)
        if m is None or not m.group("b64"):
            raise InputError(400, f"field '{field}' is a data: URL that is not base64 (use data:image/png;base64,...)", field)
        s = m.group("data")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", s), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, f"field '{field}' is not valid base64", field) from None
    if not data:
        raise InputError(400, f"field '{field}' decodes to no bytes", field)
    return data


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "image") -> tuple[str, int, int]:
    """Header-only checks -> (format, width, height). Raises InputError (415 / 413 / 400)."""
    if not data:
        raise InputError(400, f"'{field}' is empty: upload an image file", field)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError:
        # PIL's own limit (2x MAX_IMAGE_PIXELS) fired while reading the header.
        raise InputError(413, f"'{field}' has too many pixels, over the limit of {max_pixels:,}: downscale or tile it", field) from None
    except UnidentifiedImageError:
        raise InputError(415, f"'{field}' is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})", field) from None
    except Exception as exc:  # a header PIL recognises but cannot parse
        raise InputError(400, f"'{field}' is a damaged image ({type(exc).__name__}: {exc})", field) from None
    if w * h > max_pixels:
        raise InputError(413, f"'{field}' is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}: downscale or tile it", field)
    return fmt, w, h


def load_pixels(data: bytes, image_size: int, mean, std, max_pixels: int = DEFAULT_MAX_PIXELS,
                field: str = "image") -> np.ndarray:
    """Bytes -> (3, S, S) float32 exactly as training preprocesses, after `check_image`."""

    check_image(data, max_pixels, field)
    try:
        return preprocess_image(data, image_size, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    except Image.DecompressionBombError:
        raise InputError(413, f"'{field}' has too many pixels, over the limit of {max_pixels:,}: downscale or tile it", field) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
        raise InputError(400, f"'{field}' is a truncated or corrupt image ({exc}): upload the whole file", field) from None
