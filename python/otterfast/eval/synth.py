"""Tiny benchmark files for tests and smoke runs: parquet tables in the published column layouts."""

from __future__ import annotations

import base64
import io
import os


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buf, "PNG")
    return buf.getvalue()


def image_struct(data: bytes | None = None, path: str | None = None) -> dict:
    """The `datasets` Image feature as stored in parquet."""
    return {"bytes": data, "path": path}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_parquet(path: str, columns: dict[str, list]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path
