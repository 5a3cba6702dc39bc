"""No panics (issue 14 item 2): header probing, the parquet reader and every transform, fuzzed at extreme sizes;
a panic in code the data reaches becomes an error naming the file / image, skippable like any bad image."""

import base64
import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from otterfast import _native
from otterfast.data import images as I
from otterfast.data.defects import DataError
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare
from otterfast.data.reference import ReferenceLoader
from conftest import encode_image


# ---- headers declaring any size, in every format ------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def gif_header(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00\x02\x00\x3b"


def jpeg_header(w: int, h: int) -> bytes:
    return b"\xff\xd8\xff\xc0\x00\x0b\x08" + struct.pack(">HH", h, w) + b"\x01\x01\x11\x00\xff\xd9"


def webp_vp8l(w: int, h: int) -> bytes:
    body = b"WEBPVP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", (w - 1) | ((h - 1) << 14)) + b"\x00"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pil_size(blob: bytes) -> tuple[int, int]:
    """The size PIL reads from the header, its own bomb check off (only the header is read)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(blob)).size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def probe_one(blob: bytes):
    offsets = np.array([0, len(blob)], dtype=np.int64)
    return _native.probe_images(memoryview(blob), offsets, False)[0]


HEADERS = st.one_of(
    st.tuples(st.just(png_header), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.tuples(st.just(png_header), st.integers(1, 3), st.integers(0, 2**31 - 1)),
    st.tuples(st.just(png_header), st.integers(0, 2**31 - 1), st.integers(1, 3)),
    st.tuples(st.just(gif_header), st.integers(0, 65_535), st.integers(0, 65_535)),
    st.tuples(st.just(jpeg_header), st.integers(0, 65_535), st.integers(0, 65_535)),
    st.tuples(st.just(webp_vp8l), st.integers(1, 16_383), st.integers(1, 16_383)),
)


@settings(max_examples=300, deadline=None)
@given(HEADERS)
def test_fuzz_declared_sizes_probe_and_decode_never_panic(case):
    """Any declared size, however extreme: the probe reads it (as PIL does) or names a bad header; decoding and
    every transform refuse it by the size rule or fail on the missing pixels: a ValueError, never a panic (a
    PanicException is no ValueError) and never an allocation of the declared size."""
    make, w, h = case
    blob = make(w, h)
    code, pw, ph, _, _, msg = probe_one(blob)
    assert code in ("", "bad_header"), msg
    if code == "":
        assert (pw, ph) == (w, h) == pil_size(blob)
    refused = I.size_defect(w, h) if code == "" else None
    for mode in ("otter", "clip", "fuyu"):
        try:
            out, rows, cols = _native.transform_image(blob, mode)
        except ValueError as e:
            if refused is not None:  # refused by the rule, before decoding
                assert str(e).startswith(refused[0].replace("_", " ") + ": ")
            continue
        assert refused is None  # decoded (a GIF frame may be empty): the right shape
        assert out.shape == ((3, 224, 224) if mode != "fuyu" else (rows * cols, 2700))
    try:
        _native.decode_image(blob, draft=224)
    except ValueError:
        pass


# ---- every transform at extreme sizes, native and reference agreeing ------------------------------------

STRIPS = st.one_of(
    st.tuples(st.just(1), st.integers(1, 1_500)),
    st.tuples(st.integers(1, 1_500), st.just(1)),
    st.integers(1, 7).flatmap(lambda k: st.tuples(st.just(k), st.integers(200 * k - 2, 200 * k + 2))),
    st.integers(1, 7).flatmap(lambda k: st.tuples(st.integers(200 * k - 2, 200 * k + 2), st.just(k))),
)


def _refusal(f):
    try:
        f()
    except ValueError as e:
        return str(e)
    return None


@settings(max_examples=60, deadline=None)
@given(STRIPS, st.sampled_from(["otter", "clip", "fuyu"]), st.integers(1, 64), st.integers(1, 64))
def test_fuzz_extreme_strips_native_and_reference_agree(wh, mode, max_h, max_w):
    """1 x N, N x 1 and strips at the 200:1 bound, through every transform (Fuyu with small fits, so that a side
    of 0 is reachable): both loaders accept or refuse alike, with the same message, and shapes agree."""
    w, h = wh
    data = encode_image(w, h, "PNG", seed=w * 7 + h)
    kw = {"max_h": max_h, "max_w": max_w} if mode == "fuyu" else {}

    def native():
        return _native.transform_image(data, mode, **kw)

    def reference():
        img = I.decode_rgb(data)
        if mode == "fuyu":
            return I.fuyu_patches(img, max_h, max_w)
        return (I.clip_transform if mode == "clip" else I.otter_transform)(img, 224), 0, 0

    got, want = _refusal(native), _refusal(reference)
    assert got == want
    if got is None:
        (a, ra, ca), (b, rb, cb) = native(), reference()
        assert a.shape == b.shape and (ra, ca) == (rb, cb)


# ---- the parquet reader panics on some corrupt footers ---------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def negate_column_offset(path: str, column: str) -> None:
    """Bit rot in place (same size, same mtime): the footer's data_page_offset of `column` (row group 0) made
    negative. Thrift's compact protocol stores an i64 as a zigzag varint (2n for n >= 0): setting the low bit of
    its first byte gives -(n + 1) in as many bytes. The parquet crate 60 panics on it ("column start and length
    should not be negative"); pyarrow reports "Invalid column metadata"."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    col = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == column)
    assert not col.has_dictionary_page
    st_ = os.stat(path)
    data = bytearray(open(path, "rb").read())
    start = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    needle = _varint(2 * col.data_page_offset)
    # preceded by the compact field header of an i64 two (or one) field ids on: ColumnMetaData's field 9 after 7
    # (or 8), ColumnChunk's file_offset (field 2, the same value) after nothing
    hits = [i for i in range(start, len(data) - 8) if data.startswith(needle, i) and data[i - 1] in (0x16, 0x26)]
    assert hits, "data_page_offset not found in the footer"
    for i in hits:
        data[i] |= 1
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    with pytest.raises(OSError, match="Invalid column metadata"):
        pq.read_table(path)


def _id_table(path: str, images: dict[str, bytes]) -> None:
    pq.write_table(pa.table({"id": list(images), "base64": pa.array([base64.b64encode(b) for b in images.values()],
                                                                     pa.binary())}), path, use_dictionary=False)


def test_corrupt_parquet_footer_is_a_value_error_naming_the_file(tmp_path):
    p = str(tmp_path / "t.parquet")
    _id_table(p, {str(i): encode_image(5 + i, 4, "PNG", seed=i) for i in range(10)})
    assert [r[0] for r in _native.probe_parquet_rows(p, "base64", 0, [0, 3], True)] == ["", ""]
    negate_column_offset(p, "base64")
    with pytest.raises(ValueError, match=r"t\.parquet: row group 0: the parquet reader failed on corrupt data: "
                                         r"column start and length should not be negative"):
        _native.probe_parquet_rows(p, "base64", 0, [0, 3], True)


@pytest.fixture
def rotten_index(mini, tmp_path, demo_tok_dir):
    """Dataset D (a good table) and E (a table whose footer rots after prepare)."""
    good = mini.parquet_b64("good", {"G1": encode_image(20, 16, "PNG", seed=1), "G2": encode_image(9, 30, "PNG")})
    _id_table(os.path.join(mini.root, "rot.parquet"), {"R1": encode_image(12, 12, "PNG", seed=5)})
    mini.dataset("IMAGE_TEXT", "D", images_path=good, mimicit_path=mini.instructions("d", {
        "a": {"instruction": "q", "answer": "a", "image_ids": ["G1"]},
        "c": {"instruction": "q", "answer": "c", "image_ids": ["G2"]}}))
    mini.dataset("IMAGE_TEXT", "E", images_path="rot.parquet", mimicit_path=mini.instructions("e", {
        "b": {"instruction": "q", "answer": "b", "image_ids": ["R1"]}}))
    out = str(tmp_path / "idx")
    prepare(mini.yaml(), demo_tok_dir, out, PrepareOptions())
    negate_column_offset(os.path.join(mini.root, "rot.parquet"), "base64")
    return out


def test_a_panicking_table_read_is_an_image_error_not_a_dead_epoch(rotten_index):
    """The reader's panic used to end the epoch ("the loader thread panicked") even with on_error="skip"."""
    with pytest.raises(DataError, match=r"rot\.parquet: dataset E: image id 'R1': cannot read: row group 0: the "
                                        r"parquet reader failed on corrupt data: column start and length"):
        list(NativeLoader(rotten_index, batch_size=3, pack=False))
    native = NativeLoader(rotten_index, batch_size=3, pack=True, on_error="skip")
    nb = list(native)
    rb = list(ReferenceLoader(rotten_index, batch_size=3, pack=True, on_error="skip"))
    assert native.skipped == 1 and sum(b["skipped"] for b in rb) == 1
    assert [b["sample_index"].tolist() for b in nb] == [b["sample_index"].tolist() for b in rb]
    assert sum(len(b["sample_index"]) for b in nb) == 2
