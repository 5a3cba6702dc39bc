"""Type stubs for otterfast._native (the Rust extension, rust/lib.rs)."""

from collections.abc import Buffer

import numpy as np

from otterfast.data.batching import LoaderConfig
from otterfast.data.native_index import NativeIndex

__version__: str

def probe_images(
    data: Buffer, offsets: Buffer, is_base64: bool
) -> list[tuple[str, int, int, str, int, str]]:
    """Read width/height/format of many encoded images at once, in parallel, without the GIL.

    data: one contiguous byte buffer (e.g. an Arrow binary column's data buffer, as memoryview(...).cast("B"));
    offsets: int64 buffer of n+1 offsets delimiting the n items; is_base64: items are base64 text
    (standard or URL-safe alphabet).

    Returns per item (error_code, width, height, format, encoded_len, message); error_code is "" on
    success, else one of "bad_base64", "not_an_image", "bad_header" (message says why; a header reader that
    panics on the bytes is a "bad_header" too, never an exception), "truncated_image" (the data ends before the
    image does, read from its structure: rust/complete.rs).
    Raises ValueError when the offsets do not fit the buffer.
    """

def probe_parquet_rows(
    path: str, column: str, row_group: int, rows: list[int], is_base64: bool
) -> list[tuple[str, int, int, str, int, str]]:
    """Probe the images at `rows` (sorted, unique, within `row_group`) of a parquet image table.

    Streams the column page by page (memory: a page and 32 images), without the GIL. Rows as
    `probe_images`, plus error_code "null_image" for a null value. ValueError naming the file on a bad path,
    column, row group or row, or a corrupt file (also where the parquet reader panics on it).
    """

def decode_base64(text: bytes) -> bytes:
    """Decode base64 in the standard or URL-safe alphabet; ValueError on bad input."""

class NativeLoader:
    """The Rust engine of otterfast.data.loader.NativeLoader (use that class; this one takes the flattened index)."""

    def __init__(self, index: NativeIndex, config: LoaderConfig) -> None:
        """index: the flattened prepared index (rust/index.rs reads its attributes by name); config: the loader
        options (rust/config.rs reads pack, capacity (an int: None resolved), image_transform, image_size,
        jpeg_draft, on_error, num_threads, prefetch, blob_window, blob_window_mb). Checks the whole index
        without the GIL: ValueError naming the file and sample (or image id) when it contradicts itself, e.g.
        an image reference outside the image table."""
    def start(self, batches: list[list[list[int]]]) -> None:
        """Produce these batches (rows of index sample rows) on a fresh thread + pool; stops a running epoch.
        ValueError when a sample row is out of range; RuntimeError when the thread cannot start."""
    def next_batch(self) -> dict[str, np.ndarray | int] | None:
        """The next batch (numpy arrays owning Rust buffers), None at the end; ValueError naming file, dataset
        and image id when an image cannot be read or decoded (unless skipping), or when a row handed to `start`
        overflows the packing capacity; RuntimeError for the engine's own failures. Waits without the GIL."""
    def stop(self) -> None: ...
    def attach_pixel_cache(self, path: str, failed: list[int]) -> None:
        """Read Otter / CLIP squares from the pixel cache at `path` (see `build_pixel_cache`; data/pixel_cache.py
        checks it was built for this index and transform) from the next `start` on; `failed`: the rows it does not
        hold, decoded as before. ValueError when its size does not match the index or for a Fuyu index."""

def plan_batches(
    lengths: list[int], order: list[int], batch_size: int, pack: bool, capacity: int, window: int,
    rank: int = 0, world_size: int = 1, even: bool = True,
) -> tuple[list[list[list[int]]], int]:
    """(this rank's batches, batches dropped to keep ranks even); the twin of data.batching. ValueError for a
    sample longer than `capacity`, a sample row outside `lengths`, or a rank outside [0, world_size)."""

def transform_image(
    data: bytes, mode: str, is_base64: bool = False, size: int = 224, max_h: int = 1080, max_w: int = 1920,
    jpeg_draft: bool = False, max_pixels: int = 89_478_485,
) -> tuple[np.ndarray, int, int]:
    """Decode + transform one image: "otter"/"clip" -> (3, size, size) float32, "fuyu" -> (rows*cols, 2700);
    with jpeg_draft, JPEGs are decoded as by `decode_image(data, draft=size)`. ValueError on bad bytes or mode,
    and (before anything is allocated) on a size the loaders refuse (rust/limits.rs, data/images.py
    `size_defect`): "extreme aspect ratio: ..." or "image too large: ..." (max_pixels: --max-image-pixels)."""

def build_pixel_cache(index: NativeIndex, path: str, mode: str, size: int = 224, jpeg_draft: bool = False,
                      threads: int = 0, window_mb: int = 256) -> list[tuple[int, str, str]]:
    """Write every image of `index` as the 8-bit `size x size` square of transform `mode` ("otter" / "clip") before
    normalisation, one slot of 3 * size^2 bytes per image row, to `path` (through a `.partial-PID-NANOS` file of
    this build's own, fsynced, then renamed; removed if the build fails). Reads `window_mb` MiB of stored images at a time in storage order, decodes on
    `threads` threads (0: all cores), GIL released. Returns the rows not cached: (row, error code, message naming
    the file and image id). ValueError for a Fuyu transform or an index that contradicts itself; a write that
    fails raises."""

def decode_image(data: bytes, draft: int | None = None, max_pixels: int = 89_478_485) -> np.ndarray:
    """Decode to RGB like PIL's convert("RGB"): (height, width, 3) uint8. With `draft` (a size), greyscale and
    colour JPEGs are decoded by libjpeg-turbo exactly as PIL after img.draft("RGB", (draft, draft)). The header's
    size is checked first, as by `transform_image`."""
