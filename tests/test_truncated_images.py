"""Truncated images (issue 14 item 6): the native decoders used to fill in a JPEG cut short (and a WebP a few bytes
short) and report success, where PIL, and so the reference loader, raises "image file is truncated". Now both
loaders refuse the same cuts, prepare counts them (`truncated_image`), raised or skipped and counted."""

import io

import numpy as np
import pytest
from PIL import Image

from otterfast import _native
from otterfast.data import images as I
from otterfast.data.defects import DataError
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare, validate
from otterfast.data.reference import ReferenceLoader


def _photo(w=50, h=40):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(fmt, **kw) -> bytes:
    buf = io.BytesIO()
    _photo().save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_refuses(data: bytes) -> bool:
    try:
        I.decode_rgb(data)
    except Exception:
        return True
    return False


def _native_refusal(data: bytes, draft):
    try:
        _native.decode_image(data, draft=draft)
    except ValueError as e:
        return str(e)
    return None


CASES = [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}), ("WEBP", {}), ("WEBP", {"lossless": True}),
         ("GIF", {}), ("PNG", {})]


@pytest.mark.parametrize("fmt,kw", CASES)
def test_every_cut_is_refused_as_pil_refuses_it(fmt, kw):
    """Every cut point of a small image, both native decoders (zune-jpeg / libjpeg-turbo via draft): refused
    exactly where PIL refuses, except PNG's last 5..20 bytes (IEND, the last IDAT's checksums), where PIL stops at
    the last row and the png crate wants the rest: there the native loader is the stricter one."""
    data = _encode(fmt, **kw)
    for end in range(len(data) + 1):
        cut = data[:end]
        pil = _pil_refuses(cut)
        for draft in (None, 8):
            native = _native_refusal(cut, draft) is not None
            if fmt == "PNG" and 5 <= len(data) - end <= 20:
                assert native and not pil
                continue
            assert native == pil, (fmt, kw, len(data) - end, draft)


@pytest.mark.parametrize("kw", [{"quality": 90}, {"progressive": True}])
@pytest.mark.parametrize("draft", [None, 8])
def test_a_cut_jpeg_is_a_named_truncation(kw, draft):
    data = _encode("JPEG", **kw)
    for cut in (data[:-2], data[: len(data) * 3 // 5]):  # without EOI; cut inside the scans
        msg = _native_refusal(cut, draft)
        assert msg == f"truncated image: JPEG without its end-of-image marker (the data ends at byte {len(cut)})"
        for mode in ("otter", "clip", "fuyu"):
            with pytest.raises(ValueError, match="truncated image: JPEG without its end-of-image marker"):
                _native.transform_image(cut, mode, jpeg_draft=draft is not None)
        with pytest.raises(OSError, match="image file is truncated"):
            I.decode_rgb(cut)
    # PIL's rule, not a stricter one: data after EOI is ignored, a scan cut short but closed by EOI is decoded
    assert _native_refusal(data + b"junk", draft) is None and not _pil_refuses(data + b"junk")
    closed = data[: len(data) // 2] + b"\xff\xd9"
    assert _native_refusal(closed, draft) is None and not _pil_refuses(closed)


def test_a_webp_short_of_its_riff_size_is_a_named_truncation():
    data = _encode("WEBP")
    assert _native_refusal(data[:-1], None) == (f"truncated image: WebP shorter than its RIFF size {len(data)} "
                                                 f"(the data ends at byte {len(data) - 1})")


# ---- prepare and the loaders ------------------------------------------------------------------------------

@pytest.fixture
def cut_jpeg():
    whole = _encode("JPEG", quality=90)
    return whole[: len(whole) * 3 // 5]


def _dataset(mini, cut):
    img = mini.parquet_b64("img", {"GOOD": _encode("PNG"), "CUT": cut})
    mini.dataset("IMAGE_TEXT", "D", images_path=img, mimicit_path=mini.instructions("d", {
        "a": {"instruction": "q", "answer": "a", "image_ids": ["GOOD"]},
        "b": {"instruction": "q", "answer": "b", "image_ids": ["CUT"]},
        "c": {"instruction": "q", "answer": "c", "image_ids": ["GOOD"]}}))
    return mini.yaml()


def test_prepare_counts_truncated_images(mini, cut_jpeg):
    y = _dataset(mini, cut_jpeg)
    with pytest.raises(DataError, match=r"truncated_image: 1\n") as e:
        validate(y, PrepareOptions())
    assert "img.parquet: id 'CUT': truncated image: JPEG without its end-of-image marker" in str(e.value)
    v = validate(y, PrepareOptions(on_error="skip"))
    assert dict(v.report.counts) == {"truncated_image": 1}


@pytest.fixture
def old_index(mini, cut_jpeg, tmp_path, demo_tok_dir, monkeypatch):
    """An index holding the cut JPEG, as prepared before truncation was checked (the probe told to pass it)."""
    y = _dataset(mini, cut_jpeg)
    real = _native.probe_parquet_rows

    def lenient(*a):
        return [("", 50, 40, "jpeg", len(cut_jpeg), "") if r[0] == "truncated_image" else r for r in real(*a)]

    monkeypatch.setattr(_native, "probe_parquet_rows", lenient)
    out = str(tmp_path / "idx")
    prepare(y, demo_tok_dir, out, PrepareOptions())
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("draft", [True, False])  # libjpeg-turbo / zune-jpeg
def test_loaders_raise_naming_the_truncated_image(old_index, draft):
    with pytest.raises(DataError, match=r"img\.parquet: dataset D: image id 'CUT': cannot decode: truncated image: "
                                        r"JPEG without its end-of-image marker"):
        list(NativeLoader(old_index, batch_size=3, pack=False, jpeg_draft=draft))
    with pytest.raises(DataError, match=r"img\.parquet: image id 'CUT': cannot decode: image file is truncated"):
        list(ReferenceLoader(old_index, batch_size=3, pack=False, jpeg_draft=draft))


@pytest.mark.parametrize("draft", [True, False])
def test_loaders_skip_and_count_truncated_images_alike(old_index, draft):
    kw = dict(batch_size=3, pack=True, on_error="skip", jpeg_draft=draft)
    native = NativeLoader(old_index, **kw)
    nb = list(native)
    rb = list(ReferenceLoader(old_index, **kw))
    assert native.skipped == 1 and sum(b["skipped"] for b in rb) == 1
    assert [b["sample_index"].tolist() for b in nb] == [b["sample_index"].tolist() for b in rb]
    assert np.array_equal(nb[0]["input_ids"], rb[0]["input_ids"])
