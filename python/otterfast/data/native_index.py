"""The prepared index flattened for the Rust engine (`NativeIndex`): what crosses to rust/index.rs `IndexData`, for
the loader (loader.py) and the pixel cache's builder (pixel_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import images as imgs
from .index import PreparedIndex, arrow_numpy
from .sources import ImageSource


def _offsets(col) -> np.ndarray:
    """Offsets of an Arrow list column (chunks combined) as int64."""
    return np.asarray(arrow_numpy(col.offsets), dtype=np.int64) - int(col.offsets[0].as_py())


def _values(col, dtype) -> np.ndarray:
    start, end = int(col.offsets[0].as_py()), int(col.offsets[-1].as_py())
    return np.asarray(arrow_numpy(col.values.slice(start, end - start)), dtype=dtype)


@dataclass(frozen=True)
class NativeIndex:
    """The prepared index, flattened for the Rust engine: rust/index.rs `IndexData` reads these attributes
    by name (a field added here is a field added there). Arrays are 1-D int32/int64; the `*_off` arrays
    delimit each sample's (or each media's) slice of the array after them. Rust checks all of it when the
    loader is built (offsets, spans, media positions, every image reference within the image table)."""

    path: str  # the index folder, named in errors
    # the format and its tokenizer (meta.json)
    fuyu: bool
    pad_id: int
    placeholder_id: int  # Fuyu's image placeholder token, -1 otherwise
    newline_id: int  # Fuyu's image newline token, -1 otherwise
    fuyu_max_h: int
    fuyu_max_w: int
    max_image_pixels: int  # prepare's --max-image-pixels: the loader refuses the same sizes (rust/limits.rs)
    # per sample (samples.arrow)
    sample_ids: list[str]
    datasets: list[str]
    num_tokens: np.ndarray  # what the plan packs by: text tokens + Fuyu image tokens
    tok_off: np.ndarray
    tokens: np.ndarray
    span_off: np.ndarray
    spans: np.ndarray  # label spans as flat (start, end) pairs
    mpos_off: np.ndarray
    mpos: np.ndarray  # the token position of each media
    media_off: np.ndarray  # media per sample ...
    media_img_off: np.ndarray  # ... images (frames) per media ...
    media_imgs: np.ndarray  # ... as image rows
    # per image (images.arrow)
    img_ids: list[str]
    img_source: np.ndarray
    img_file: np.ndarray
    img_rg: np.ndarray
    img_row: np.ndarray
    img_off: np.ndarray  # JSON: byte range of the value
    img_len: np.ndarray
    img_w: np.ndarray
    img_h: np.ndarray
    img_bytes: np.ndarray  # size as stored (base64 is 4/3 of the encoded bytes), bounds the read window
    sources: list[ImageSource]

    @classmethod
    def of(cls, ix: PreparedIndex) -> "NativeIndex":
        t, im = ix.samples, ix.images

        def col(name):
            return t.column(name).combine_chunks()

        def icol(name, dtype):
            return np.ascontiguousarray(arrow_numpy(im.column(name)), dtype=dtype)

        ids, spans, mpos, media = col("input_ids"), col("label_spans"), col("media_pos"), col("media_images")
        m0, m1 = int(media.offsets[0].as_py()), int(media.offsets[-1].as_py())
        media_inner = media.values.slice(m0, m1 - m0)
        opts, tok = ix.meta["options"], ix.tok
        n = arrow_numpy(im.column("encoded_len")).astype(np.int64)
        b64 = np.array([ix.sources[s].encoding == "base64" for s in im.column("source").to_pylist()], bool)
        return cls(
            path=ix.path, fuyu=ix.format == "fuyu", pad_id=int(tok["pad_id"]),
            placeholder_id=int(tok.get("fuyu_placeholder_id") or -1),
            newline_id=int(tok.get("fuyu_newline_id") or -1),
            fuyu_max_h=int(opts["fuyu_max_height"]), fuyu_max_w=int(opts["fuyu_max_width"]),
            max_image_pixels=int(opts.get("max_image_pixels", imgs.DEFAULT_MAX_IMAGE_PIXELS)),
            sample_ids=t.column("sample_id").to_pylist(), datasets=t.column("dataset").to_pylist(),
            num_tokens=np.ascontiguousarray(ix.num_tokens(), dtype=np.int64),
            tok_off=_offsets(ids), tokens=_values(ids, np.int32),
            span_off=_offsets(spans), spans=_values(spans, np.int32),
            mpos_off=_offsets(mpos), mpos=_values(mpos, np.int32),
            media_off=_offsets(media), media_img_off=_offsets(media_inner),
            media_imgs=_values(media_inner, np.int32),
            img_ids=im.column("image_id").to_pylist(),
            img_source=icol("source", np.int32), img_file=icol("file", np.int32),
            img_rg=icol("row_group", np.int32), img_row=icol("row", np.int32),
            img_off=icol("byte_offset", np.int64), img_len=icol("byte_length", np.int64),
            img_w=icol("width", np.int32), img_h=icol("height", np.int32),
            img_bytes=np.where(b64, (n * 4 + 2) // 3, n).astype(np.int64),
            sources=list(ix.sources),
        )
