"""Image tables, read lazily by reference: never the whole table in memory.

Three layouts hold MIMIC-IT images:
- parquet, one file, the image id as the pandas index (Otter's layout) or as an `id` column, with a
  `base64` column (standard or URL-safe alphabet) or a raw-bytes (binary) column;
- a directory of such part files (what dask's `to_parquet` writes; Otter itself cannot open it);
- the legacy JSON dict `{id: base64}` (which Otter's pandas call cannot load at all).

An image is addressed by an `ImageRef`: for parquet (file, row group, row within the row group), for
JSON the byte range of its base64 string inside the file. Scanning ids reads only the id column.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import re
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .defects import DataError


@dataclass(frozen=True)
class ImageRef:
    file: int  # index into ImageSource.files
    row_group: int = -1  # parquet only
    row: int = -1  # row within the row group (parquet only)
    byte_offset: int = -1  # JSON and tar only: offset of the stored value (base64 text or raw bytes)
    byte_length: int = -1  # JSON and tar only: its length


@dataclass
class ImageSource:
    path: str  # as named in the YAML (file or directory)
    kind: str  # "parquet" | "json" | "tar" (webdataset shards, data/shards.py: images by byte range)
    files: list[str]
    encoding: str  # "base64" | "raw"
    id_column: str | None = None
    image_column: str | None = None
    json_escaped: bool = False  # JSON only: some values hold escapes (decode with json.loads)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSource":
        return cls(**d)


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _id_column(schema: pa.Schema, path: str) -> str:
    meta = schema.metadata or {}
    if b"pandas" in meta:
        try:
            index_cols = json.loads(meta[b"pandas"]).get("index_columns", [])
        except ValueError:
            index_cols = []
        # A named (string) index is stored as a real column; a RangeIndex is a dict and holds no ids.
        if index_cols and isinstance(index_cols[0], str) and index_cols[0] in schema.names:
            return index_cols[0]
    if "id" in schema.names:
        return "id"
    raise DataError(
        f"{path}: wrong parquet schema: no image ids (neither a pandas index nor an `id` column); "
        f"columns: {schema.names}"
    )


def _image_column(schema: pa.Schema, id_col: str, path: str) -> tuple[str, str]:
    def is_text(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_bin(t):
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    if "base64" in schema.names:
        t = schema.field("base64").type
        if is_text(t) or is_bin(t):
            return "base64", "base64"
        raise DataError(f"{path}: wrong parquet schema: column `base64` has type {t}, expected string")
    binary = [f.name for f in schema if f.name != id_col and is_bin(f.type)]
    if len(binary) == 1:
        return binary[0], "raw"
    raise DataError(
        f"{path}: wrong parquet schema: need a `base64` string column or exactly one binary column of raw "
        f"image bytes; columns: {[f'{f.name}: {f.type}' for f in schema]}"
    )


def open_image_source(path: str) -> ImageSource:
    """Inspect an image table (file, part-file directory or legacy JSON) and check its schema."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.parquet")), key=_natural_key)
        if not files:
            raise DataError(f"{path}: directory holds no *.parquet part files")
        kind = "parquet"
    elif path.endswith(".json"):
        return ImageSource(path=path, kind="json", files=[path], encoding="base64")
    else:
        files, kind = [path], "parquet"
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable parquet file: {e}") from None
    id_col = _id_column(schemas[0], files[0])
    img_col, enc = _image_column(schemas[0], id_col, files[0])
    for f, s in zip(files[1:], schemas[1:]):
        if _id_column(s, f) != id_col or _image_column(s, id_col, f) != (img_col, enc):
            raise DataError(f"{f}: part file's schema differs from {files[0]}")
    return ImageSource(path=path, kind=kind, files=files, encoding=enc, id_column=id_col, image_column=img_col)


# A top-level `"key": "value"` pair of the legacy JSON dict. Values are base64 (no quotes inside);
# escapes such as `\/` or `\n` are allowed and undone when read.
_JSON_PAIR = re.compile(rb'\s*"((?:[^"\\]|\\.)*)"\s*:\s*"((?:[^"\\]|\\.)*)"\s*(,|})', re.S)


def scan_ids(src: ImageSource) -> Iterator[tuple[str, ImageRef]]:
    """Every (image id, ref) of a source, reading ids only (for JSON: one regex pass over an mmap)."""
    if src.kind == "json":
        yield from _scan_json(src)
        return
    for fi, f in enumerate(src.files):
        pf = open_parquet(f)
        for rg in range(pf.num_row_groups):
            col = pf.read_row_group(rg, columns=[src.id_column]).column(0)
            for row, v in enumerate(col.to_pylist()):
                if v is None:
                    raise DataError(f"{f}: row group {rg} row {row}: null image id")
                yield str(v), ImageRef(file=fi, row_group=rg, row=row)


def _scan_json(src: ImageSource) -> Iterator[tuple[str, ImageRef]]:
    path = src.files[0]
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise DataError(f"{path}: empty file, expected a JSON object {{id: base64}}")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0
            n = len(mm)
            while pos < n and mm[pos : pos + 1].isspace():
                pos += 1
            if mm[pos : pos + 1] != b"{":
                raise DataError(f"{path}: malformed JSON image table: expected '{{' at byte {pos}")
            pos += 1
            closed = False
            while not closed:
                m = _JSON_PAIR.match(mm, pos)
                if m is None:
                    rest = mm[pos : pos + 40]
                    if rest.strip() == b"}" or rest.strip().startswith(b"}"):
                        closed = True  # empty dict
                        break
                    raise DataError(
                        f"{path}: malformed JSON image table at byte {pos}: expected \"id\": \"base64\" "
                        f"(got {bytes(rest)!r}...)"
                    )
                key = m.group(1)
                key_s = json.loads(b'"' + key + b'"') if b"\\" in key else key.decode("utf-8")
                if b"\\" in m.group(2):
                    src.json_escaped = True
                yield key_s, ImageRef(file=0, byte_offset=m.start(2), byte_length=m.end(2) - m.start(2))
                pos = m.end()
                closed = m.group(3) == b"}"
            if mm[pos:].strip():
                raise DataError(f"{path}: malformed JSON image table: trailing data after byte {pos}")


def _json_value(raw: bytes, escaped: bool) -> bytes:
    return json.loads(b'"' + raw + b'"').encode("ascii") if escaped and b"\\" in raw else raw


def read_json_blobs(src: ImageSource, refs: list[ImageRef]) -> list[bytes]:
    """The stored (base64) texts of images of a legacy JSON table, read through one open file."""
    out = []
    with open(src.files[0], "rb") as f:
        for ref in refs:
            f.seek(ref.byte_offset)
            out.append(_json_value(f.read(ref.byte_length), src.json_escaped))
    return out


def read_tar_blob(src: ImageSource, ref: ImageRef) -> bytes:
    """An image's stored value in a tar shard: its byte range. Base64 ranges are JSON string contents (an MMC4
    document's `image_base64`), so their escapes are undone; raw ranges are image bytes, returned as they are."""
    path = src.files[ref.file]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if ref.byte_offset + ref.byte_length > size:
            raise ValueError(f"{path}: bytes {ref.byte_offset}+{ref.byte_length} beyond the file's {size}")
        f.seek(ref.byte_offset)
        raw = f.read(ref.byte_length)
    return _json_value(raw, True) if src.encoding == "base64" else raw


# Read column chunks through a buffered stream: without it pyarrow reads a whole column chunk at once, and
# pandas' to_parquet writes one row group per file for typical MIMIC-IT sizes (so: the whole image column).
PARQUET_BUFFER = 4 << 20


def open_parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER)


class BlobReader:
    """Random access to one image's stored value, for the reference loader.

    Parquet: reads the image column of a whole row group and keeps the last one (a byte-bounded cache is
    the native loader's job; this is the plain oracle).
    """

    def __init__(self, sources: list[ImageSource]):
        self.sources = sources
        self._files: dict[tuple[int, int], pq.ParquetFile] = {}
        self._cached_key: tuple[int, int, int] | None = None
        self._cached_col: pa.Array | None = None

    def read(self, source: int, ref: ImageRef) -> bytes | None:
        src = self.sources[source]
        if src.kind == "json":
            return read_json_blobs(src, [ref])[0]
        if src.kind == "tar":
            return read_tar_blob(src, ref)
        key = (source, ref.file, ref.row_group)
        if self._cached_key != key:
            fk = (source, ref.file)
            if fk not in self._files:
                self._files[fk] = open_parquet(src.files[ref.file])
            tbl = self._files[fk].read_row_group(ref.row_group, columns=[src.image_column])
            self._cached_col = tbl.column(0).combine_chunks()
            self._cached_key = key
        v = self._cached_col[ref.row].as_py()
        if v is None:
            return None
        return v.encode("ascii") if isinstance(v, str) else v
