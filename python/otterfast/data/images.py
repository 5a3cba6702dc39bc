"""Pixels, the plain way (PIL + numpy): decode, and the Otter / CLIP / Fuyu transforms.

This is the reference the native loader is tested against, so every step is the obvious one.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

# Otter's training transform (MimicitDataset.patch_resize_transform): rounded OpenAI-CLIP stats.
FLAMINGO_MEAN = (0.481, 0.458, 0.408)
FLAMINGO_STD = (0.269, 0.261, 0.276)
# CLIPImageProcessor's defaults (Otter's inference/eval path).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OTTER_SIZE = 224

# Fuyu (FuyuImageProcessor defaults).
FUYU_PATCH = 30
FUYU_MAX_H, FUYU_MAX_W = 1080, 1920
FUYU_PAD_VALUE = 1.0  # applied before rescaling, i.e. on the 0..255 scale, as transformers does

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS); Otter switches it off, we do not.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Long side / short side at most this (transformers' Qwen2-VL processor refuses the same ratio). Without it a
# 1 x 500,000 strip passes the pixel limit and CLIP's "short side to 224" asks for a 224 x 112,000,000 buffer.
MAX_ASPECT_RATIO = 200


class ImageSizeError(ValueError):
    """An image refused for its size before anything is allocated; `kind` is its defect name
    ("extreme_aspect_ratio" or "image_too_large", data/defects.py)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind.replace('_', ' ')}: {message}")
        self.kind, self.message = kind, message


# The size rule, checked from the header before decoding or resizing; rust/limits.rs is the same rule, word for
# word, so that prepare, the reference loader and the native loader refuse the same images:
#   no side 0, long side <= MAX_ASPECT_RATIO x short side, width x height <= max_pixels, and every resized
#   intermediate (CLIP's short-side resize, Fuyu's fit into max_h x max_w) with both sides >= 1 and at most
#   max_pixels pixels.

def size_defect(width: int, height: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """(defect kind, message) when an image of this header size is refused, else None."""
    if width <= 0 or height <= 0:
        return "bad_header", f"zero-sized image {width}x{height}"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return "extreme_aspect_ratio", f"{width}x{height}: long side over {MAX_ASPECT_RATIO} x short side"
    if width * height > max_pixels:
        return "image_too_large", f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}"
    return None


def check_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ImageSizeError (a ValueError) when `size_defect` refuses this header size."""
    d = size_defect(width, height, max_pixels)
    if d is not None:
        raise ImageSizeError(*d) if d[0] != "bad_header" else ValueError(d[1])


def check_resized(what: str, from_size: tuple[int, int], size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a resized intermediate `size` (w, h) made from `from_size` by `what`: a side 0, or over max_pixels."""
    (fw, fh), (w, h) = from_size, size
    if w <= 0 or h <= 0:
        raise ImageSizeError("extreme_aspect_ratio", f"{fw}x{fh}: {what} would make it {w}x{h}")
    if w * h > max_pixels:
        raise ImageSizeError("image_too_large",
                             f"{fw}x{fh}: {what} would make it {w}x{h}, over max_image_pixels {max_pixels}")


def b64decode(text: bytes | str) -> bytes:
    """Base64 in either alphabet, like Otter's `urlsafe_b64decode` (which also takes `+` and `/`)."""
    if isinstance(text, str):
        text = text.encode("ascii")
    text = text.replace(b"+", b"-").replace(b"/", b"_")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def decode_rgb(data: bytes, draft: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image (first frame of a GIF; alpha dropped; CMYK/L/P converted), like Otter.

    With `draft` (a size), a greyscale or colour JPEG is decoded at reduced DCT scale first
    (`img.draft("RGB", (draft, draft))`: the largest of 1/2, 1/4, 1/8 keeping both sides >= draft).
    The header size is checked (`check_size`) before any pixel is decoded.
    """
    with Image.open(io.BytesIO(data)) as im:
        check_size(*im.size, max_pixels)
        if draft and im.format == "JPEG" and im.mode in ("L", "RGB"):
            im.draft("RGB", (draft, draft))
        return im.convert("RGB")


def _to_chw_normalised(img: Image.Image, mean, std) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # torchvision ToTensor
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def otter_transform(img: Image.Image, size: int = OTTER_SIZE) -> np.ndarray:
    """Otter training: Resize((size, size), BICUBIC) (a squash, no crop), ToTensor, rounded-stat Normalize."""
    return _to_chw_normalised(img.resize((size, size), Image.BICUBIC), FLAMINGO_MEAN, FLAMINGO_STD)


def clip_resized_size(width: int, height: int, size: int = OTTER_SIZE,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """CLIP's resize (short side -> size, long side truncated) as (w, h), refused by `check_resized`."""
    short, long = (width, height) if width <= height else (height, width)
    if short <= 0:
        raise ValueError(f"zero-sized image {width}x{height}")
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if width <= height else (new_long, size)
    check_resized("CLIP's resize", (width, height), (nw, nh), max_pixels)
    return nw, nh


def clip_resize_crop(img: Image.Image, size: int = OTTER_SIZE, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """CLIPImageProcessor geometry: shortest edge -> size (bicubic, long side truncated), centre crop."""
    nw, nh = clip_resized_size(*img.size, size, max_pixels)
    img = img.resize((nw, nh), Image.BICUBIC)
    top = (nh - size) // 2
    left = (nw - size) // 2
    return img.crop((left, top, left + size, top + size))


def clip_transform(img: Image.Image, size: int = OTTER_SIZE, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Otter inference / OpenFlamingo: CLIP resize + centre crop + exact CLIP stats."""
    return _to_chw_normalised(clip_resize_crop(img, size, max_pixels), CLIP_MEAN, CLIP_STD)


IMAGE_TRANSFORMS = {"otter": otter_transform, "clip": clip_transform}


# ---- Fuyu -------------------------------------------------------------------------------------------

def fuyu_resized_size(height: int, width: int, max_h: int = FUYU_MAX_H, max_w: int = FUYU_MAX_W) -> tuple[int, int]:
    """FuyuImageProcessor.resize: shrink to fit max_h x max_w keeping the aspect ratio; never upscale."""
    if height <= max_h and width <= max_w:
        return height, width
    s = min(max_h / height, max_w / width)
    return int(height * s), int(width * s)


def fuyu_checked_size(height: int, width: int, max_h: int = FUYU_MAX_H, max_w: int = FUYU_MAX_W) -> tuple[int, int]:
    """`fuyu_resized_size`, refused by `check_resized` when a side would be 0 (never larger than the image)."""
    nh, nw = fuyu_resized_size(height, width, max_h, max_w)
    check_resized(f"Fuyu's fit into {max_h}x{max_w}", (width, height), (nw, nh), width * height)
    return nh, nw


def fuyu_grid(height: int, width: int, max_h: int = FUYU_MAX_H, max_w: int = FUYU_MAX_W) -> tuple[int, int]:
    """(patch rows, patch columns) of an image of this original size."""
    h, w = fuyu_resized_size(height, width, max_h, max_w)
    return math.ceil(h / FUYU_PATCH), math.ceil(w / FUYU_PATCH)


def fuyu_num_tokens(height: int, width: int, max_h: int = FUYU_MAX_H, max_w: int = FUYU_MAX_W) -> int:
    """Placeholder tokens plus one newline token per patch row: known from the header alone."""
    rows, cols = fuyu_grid(height, width, max_h, max_w)
    return rows * cols + rows


def fuyu_patches(img: Image.Image, max_h: int = FUYU_MAX_H, max_w: int = FUYU_MAX_W) -> tuple[np.ndarray, int, int]:
    """Image -> (patches (rows*cols, 30*30*3) float32 in [-1, 1], rows, cols), as FuyuImageProcessor.

    Resize (bilinear, only if too large), pad bottom/right with 1.0 on the 0..255 scale to a multiple of 30,
    rescale 1/255, normalise mean = std = 0.5, cut 30x30 patches in raster order, each flattened as
    (patch_h, patch_w, channel). Aspect ratio is kept (Otter squashes to a square first; we do not).
    """
    w, h = img.size
    nh, nw = fuyu_checked_size(h, w, max_h, max_w)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
    rows, cols = math.ceil(nh / FUYU_PATCH), math.ceil(nw / FUYU_PATCH)
    canvas = np.full((rows * FUYU_PATCH, cols * FUYU_PATCH, 3), FUYU_PAD_VALUE, dtype=np.float32)
    canvas[:nh, :nw] = np.asarray(img, dtype=np.float32)
    x = (canvas * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
    patches = x.reshape(rows, FUYU_PATCH, cols, FUYU_PATCH, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(patches.reshape(rows * cols, FUYU_PATCH * FUYU_PATCH * 3)), rows, cols


def fuyu_image_tokens(rows: int, cols: int, placeholder_id: int, newline_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one image (each patch row then a newline) and per-token patch index (-1 for newlines)."""
    ids = np.full((rows, cols + 1), placeholder_id, dtype=np.int64)
    ids[:, cols] = newline_id
    idx = np.full((rows, cols + 1), -1, dtype=np.int64)
    idx[:, :cols] = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    return ids.reshape(-1), idx.reshape(-1)
