"""Turn the image cells of published parquet files into RGB PIL images."""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    pass


def _open_bytes(data: bytes, what: str):
    from PIL import Image

    from ..data.images import ImageSizeError, check_size

    try:
        img = Image.open(io.BytesIO(data))
        check_size(*img.size)  # from the header, before decoding: the training loaders' size rule
        img.load()
    except ImageSizeError as e:
        raise ImageError(f"{what}: {e}") from e
    except Exception as e:  # PIL raises several types; the caller wants one with the cell named
        raise ImageError(f"{what}: not a decodable image ({e})") from e
    return img.convert("RGB")


def _open_path(path: str, base_dir: str | None, what: str):
    full = path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)
    if not os.path.exists(full):
        raise ImageError(f"{what}: image path {path!r} not found (looked at {full})")
    with open(full, "rb") as f:
        return _open_bytes(f.read(), f"{what} ({full})")


def _looks_like_path(s: str) -> bool:
    return len(s) < 1024 and s.lower().endswith(_IMAGE_EXTS)


def _from_string(s: str, base_dir: str | None, what: str):
    # A short string ending in an image extension is a path (AI4Math/MathVista `image`); anything else is base64
    # (HuggingFaceM4/MMBench `image`), possibly as a data URL.
    if _looks_like_path(s):
        return _open_path(s, base_dir, what)
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        data = base64.b64decode(s + "=" * (-len(s) % 4), validate=False)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{what}: string is neither an image path nor base64 ({e})") from e
    if not data:
        raise ImageError(f"{what}: empty base64 string")
    return _open_bytes(data, what)


def to_pil_list(cell: Any, base_dir: str | None = None, what: str = "image") -> list:
    """One cell -> list of RGB images. None -> []; a struct, bytes or string -> one image; a list -> each."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        out = []
        for i, c in enumerate(cell):
            out.extend(to_pil_list(c, base_dir, f"{what}[{i}]"))
        return out
    if hasattr(cell, "tolist") and not isinstance(cell, (bytes, str)):  # numpy arrays from pandas-written files
        return to_pil_list(cell.tolist(), base_dir, what)
    from PIL import Image

    from ..data.images import ImageSizeError, check_size

    if isinstance(cell, Image.Image):
        try:
            check_size(*cell.size)
        except ImageSizeError as e:
            raise ImageError(f"{what}: {e}") from e
        return [cell.convert("RGB")]
    if isinstance(cell, dict):
        b = cell.get("bytes")
        if b:
            return [_open_bytes(b, what)]
        p = cell.get("path")
        if p:
            return [_open_path(p, base_dir, what)]
        raise ImageError(f"{what}: image struct has neither bytes nor path")
    if isinstance(cell, (bytes, bytearray)):
        return [_open_bytes(bytes(cell), what)]
    if isinstance(cell, str):
        return [_from_string(cell, base_dir, what)] if cell else []
    raise ImageError(f"{what}: unsupported image cell of type {type(cell).__name__}")


def count_images(cell: Any) -> int:
    """How many images a cell holds, without decoding."""
    if cell is None or (isinstance(cell, str) and not cell):
        return 0
    if isinstance(cell, (list, tuple)):
        return sum(count_images(c) for c in cell)
    if hasattr(cell, "tolist") and not isinstance(cell, (bytes, str)):
        return count_images(cell.tolist())
    return 1
