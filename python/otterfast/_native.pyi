"""Type stubs for otterfast._native (the Rust extension, rust/lib.rs)."""

from collections.abc import Buffer

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
