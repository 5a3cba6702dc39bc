"""Images in a request: `data:` URLs (base64 JPEG, PNG or WebP) -> RGB PIL images, with their size checked from
the header before any pixel is decoded.

The size rule is the loaders' (data/images.py `size_defect`, the same in prepare, both loaders, eval and
generate): no side 0, the long side at most 200 x the short one (Otter's CLIP resize scales the short side to
224: a 1 x 10000 image would become 224 x 2.24M pixels), and at most `max_pixels` pixels (decompression bombs: a
small file that decodes to gigabytes), which the server may lower (ServeLimits.max_image_pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from ..data.images import size_defect
from .errors import ApiError

FORMATS = {"JPEG", "PNG", "WEBP"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),(?P<data>.*)", re.S)


def decode_data_url(url: str, what: str) -> bytes:
    """The bytes of a base64 `data:` URL; anything else (http URLs included: the server fetches nothing) is a
    400 naming `what`."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] + "..." if isinstance(url, str) and len(url) > 40 else url
        raise ApiError(400, f"{what}: expected a data URL (data:image/png;base64,...), got {shown!r}; "
                            "the server fetches nothing", code="invalid_image_url", param=what)
    m = _DATA_URL.match(url)
    if not m or ";base64" not in m.group("params"):
        raise ApiError(400, f"{what}: the data URL is not base64 (data:image/...;base64,...)",
                       code="invalid_image_url", param=what)
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what}: invalid base64 ({e})", code="invalid_image", param=what) from e


# the loaders' defect names -> the API's error codes
_CODES = {"bad_header": "invalid_image", "extreme_aspect_ratio": "image_aspect_ratio",
          "image_too_large": "image_too_large"}


def check_bounds(width: int, height: int, max_pixels: int, what: str) -> None:
    defect = size_defect(width, height, max_pixels)
    if defect is not None:
        kind, message = defect
        raise ApiError(400, f"{what}: {kind.replace('_', ' ')}: {message}", code=_CODES.get(kind, "invalid_image"),
                       param=what)


def open_image(data: bytes, max_pixels: int, what: str) -> Image.Image:
    """Encoded bytes -> RGB image. The header is read first and its size checked; only then are pixels decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides, below
            im = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError as e:  # over twice PIL's own limit
        raise ApiError(400, f"{what}: {e}", code="image_too_large", param=what) from e
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, SyntaxError, struct.error, ...)
        raise ApiError(400, f"{what}: not an image ({type(e).__name__}: {e})", code="invalid_image", param=what) from e
    if im.format not in FORMATS:
        raise ApiError(400, f"{what}: {im.format} images are not accepted; send JPEG, PNG or WebP",
                       code="invalid_image", param=what)
    check_bounds(im.width, im.height, max_pixels, what)
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:  # truncated or corrupt pixel data
        raise ApiError(400, f"{what}: cannot decode the image ({type(e).__name__}: {e})", code="invalid_image",
                       param=what) from e
