"""Type stubs for otterfast._native (the Rust extension, rust/lib.rs)."""

from collections.abc import Buffer

import numpy as np

__version__: str

def probe_images(
    data: Buffer, offsets: Buffer, is_base64: bool
) -> list[tuple[str, int, int, str, int, str]]:
    """Read width/height/format of many encoded images at once, in parallel, without the GIL.

    data: one contiguous byte buffer (e.g. an Arrow binary column's data buffer, as memoryview(...).cast("B"));
    offsets: int64 buffer of n+1 offsets delimiting the n items; is_base64: items are base64 text
    (standard or URL-safe alphabet).

    Returns per item (error_code, width, height, format, encoded_len, message); error_code is "" on
    success, else one of "bad_base64", "not_an_image", "bad_header" (message says why).
    Raises ValueError when the offsets do not fit the buffer.
    """

def probe_parquet_rows(
    path: str, column: str, row_group: int, rows: list[int], is_base64: bool
) -> list[tuple[str, int, int, str, int, str]]:
    """Probe the images at `rows` (sorted, unique, within `row_group`) of a parquet image table.

    Streams the column page by page (memory: a page and 32 images), without the GIL. Rows as
    `probe_images`, plus error_code "null_image" for a null value. ValueError naming the file on a bad path,
    column, row group or row.
    """

def decode_base64(text: bytes) -> bytes:
    """Decode base64 in the standard or URL-safe alphabet; ValueError on bad input."""

class NativeLoader:
    """The Rust engine of otterfast.data.loader.NativeLoader (use that class; this one takes the flattened index)."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        datasets: list[str],
        img_ids: list[str],
        sources: list[tuple[bool, list[str], str, bool]],
        options: dict,
    ) -> None:
        """arrays: the flattened index (tok_off, tokens, span_off, spans, mpos_off, mpos, media_off, media_img_off,
        media_imgs, img_source, img_file, img_rg, img_row, img_off, img_len, img_w, img_h, img_bytes)."""
    def start(self, batches: list[list[list[int]]]) -> None:
        """Produce these batches (rows of index sample rows) on a fresh thread + pool; stops a running epoch."""
    def next_batch(self) -> dict[str, np.ndarray | int] | None:
        """The next batch (numpy arrays owning Rust buffers), None at the end; ValueError naming file and
        image id when an image cannot be decoded (unless skipping). Waits without the GIL."""
    def stop(self) -> None: ...

def plan_batches(
    lengths: list[int], order: list[int], batch_size: int, pack: bool, capacity: int, window: int,
    rank: int = 0, world_size: int = 1, even: bool = True,
) -> tuple[list[list[list[int]]], int]:
    """(this rank's batches, batches dropped to keep ranks even); the twin of data.batching."""

def transform_image(
    data: bytes, mode: str, is_base64: bool = False, size: int = 224, max_h: int = 1080, max_w: int = 1920,
    jpeg_draft: bool = False,
) -> tuple[np.ndarray, int, int]:
    """Decode + transform one image: "otter"/"clip" -> (3, size, size) float32, "fuyu" -> (rows*cols, 2700);
    with jpeg_draft, JPEGs are decoded as by `decode_image(data, draft=size)`."""

def decode_image(data: bytes, draft: int | None = None) -> np.ndarray:
    """Decode to RGB like PIL's convert("RGB"): (height, width, 3) uint8. With `draft` (a size), greyscale and
    colour JPEGs are decoded by libjpeg-turbo exactly as PIL after img.draft("RGB", (draft, draft))."""
