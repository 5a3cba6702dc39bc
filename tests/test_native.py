"""otterfast._native: header probing against PIL, errors as codes, never a panic (fuzzed)."""

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from otterfast import _native
from conftest import encode_image


def probe(blobs, is_base64=False):
    arr = pa.array(blobs, type=pa.large_binary())
    bufs = arr.buffers()
    data = bufs[2] if bufs[2] is not None else pa.py_buffer(b"")
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[: len(arr) + 1]
    return _native.probe_images(memoryview(data).cast("B"), np.ascontiguousarray(offsets), is_base64)


FORMATS = [("JPEG", "RGB", "jpeg"), ("JPEG", "L", "jpeg"), ("JPEG", "CMYK", "jpeg"), ("PNG", "RGB", "png"),
           ("PNG", "RGBA", "png"), ("PNG", "P", "png"), ("PNG", "I;16", "png"), ("WEBP", "RGB", "webp"),
           ("GIF", "P", "gif")]


@pytest.mark.parametrize("fmt,mode,name", FORMATS)
def test_sizes_match_pil(fmt, mode, name):
    for w, h in [(1, 1), (17, 5), (640, 33)]:
        data = encode_image(w, h, fmt, mode=mode)
        assert Image.open(io.BytesIO(data)).size == (w, h)
        ((code, pw, ph, pfmt, n, msg),) = probe([data])
        assert (code, pw, ph, pfmt, n) == ("", w, h, name, len(data)), msg


def test_progressive_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (123, 45), (9, 8, 7)).save(buf, "JPEG", progressive=True)
    assert probe([buf.getvalue()])[0][:3] == ("", 123, 45)


def test_base64_both_alphabets_and_errors():
    data = encode_image(9, 4, "PNG")
    rows = probe([base64.b64encode(data), base64.urlsafe_b64encode(data), b"@@@", b"aGVsbG8=", b""], True)
    assert [r[0] for r in rows] == ["", "", "bad_base64", "not_an_image", "not_an_image"]
    assert rows[0][1:3] == (9, 4) and rows[1][1:3] == (9, 4)


def test_truncated_header():
    data = encode_image(9, 4, "JPEG")
    (row,) = probe([data[:30]])
    assert row[0] == "bad_header" and "header" in row[5]


def test_decode_base64():
    assert _native.decode_base64(base64.urlsafe_b64encode(b"\xff\xfe\xfd")) == b"\xff\xfe\xfd"
    with pytest.raises(ValueError, match="base64"):
        _native.decode_base64(b"%%%")


def test_offsets_checked():
    with pytest.raises(ValueError, match="offsets out of range"):
        _native.probe_images(memoryview(b"abc"), np.array([0, 10], dtype=np.int64), False)


_SEEDS = [encode_image(13, 7, f, mode=m) for f, m, _ in FORMATS]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_fuzz_mutated_images_never_panic(seed, flips, cut):
    b = bytearray(seed)
    for pos, val in flips:
        b[pos % len(b)] = val
    rows = probe([bytes(b), bytes(b[: cut % (len(b) + 1)])])
    for code, w, h, *_ in rows:
        assert code in ("", "not_an_image", "bad_header", "truncated_image")
        assert code or (w > 0 and h > 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.booleans())
def test_fuzz_random_bytes_never_panic(blob, is_b64):
    (row,) = probe([blob], is_b64)
    assert row[0] in ("", "not_an_image", "bad_header", "bad_base64", "truncated_image")


def test_probe_parquet_rows_streams_selected_rows_and_nulls(tmp_path):
    import pyarrow.parquet as pq

    blobs = [encode_image(3 + i, 2 + i % 3, "PNG", seed=i) for i in range(50)]
    col = [base64.b64encode(b).decode() for b in blobs]
    col[7] = None
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": [str(i) for i in range(50)], "base64": col}), p, row_group_size=20)
    rows = [0, 3, 7, 19]
    got = _native.probe_parquet_rows(p, "base64", 0, rows, True)
    assert [g[0] for g in got] == ["", "", "null_image", ""]
    for r, g in zip(rows, got):
        if r != 7:
            assert g[1:3] == Image.open(io.BytesIO(blobs[r])).size
    got = _native.probe_parquet_rows(p, "base64", 2, [9], True)  # last row group: rows 40..49
    assert got[0][1:3] == Image.open(io.BytesIO(blobs[49])).size
    assert _native.probe_parquet_rows(p, "base64", 1, [], True) == []
    with pytest.raises(ValueError, match="t.parquet: row 20 out of range"):
        _native.probe_parquet_rows(p, "base64", 0, [20], True)
    with pytest.raises(ValueError, match="no column"):
        _native.probe_parquet_rows(p, "nope", 0, [0], True)
    with pytest.raises(ValueError, match="sorted"):
        _native.probe_parquet_rows(p, "base64", 0, [3, 1], True)
