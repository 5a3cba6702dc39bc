"""Image size bounds (issue 14 item 1): extreme aspect ratios and oversized resizes are refused from the header,
before anything is allocated, by the same rule in prepare, the reference loader (PIL), the native loader (Rust),
eval and generate; a refused image is a named defect, raised or skipped and counted."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from otterfast import _native
from otterfast.data import images as I
from otterfast.data.defects import DataError
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare, validate
from otterfast.data.reference import ReferenceLoader
from conftest import encode_image


def header_only_png(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h (the body is a few zero bytes): only a header reader accepts it, so a
    test using it can never make the old code allocate the w x h image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def native_refusal(data: bytes, mode: str, **kw) -> str | None:
    try:
        _native.transform_image(data, mode, **kw)
    except ValueError as e:
        return str(e)
    return None


def reference_refusal(data: bytes, mode: str, size=224, max_h=1080, max_w=1920, max_pixels=I.DEFAULT_MAX_IMAGE_PIXELS):
    try:
        img = I.decode_rgb(data, None, max_pixels)
        if mode == "fuyu":
            I.fuyu_patches(img, max_h, max_w)
        elif mode == "clip":
            I.clip_transform(img, size, max_pixels)
        else:
            I.otter_transform(img, size)
    except ValueError as e:
        return str(e)
    return None


# (w, h) on both sides of the 200:1 bound, both orientations
SIZES = [(1, 1), (1, 200), (200, 1), (1, 201), (201, 1), (3, 600), (3, 601), (601, 3), (2, 1000), (1000, 1)]


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("mode", ["otter", "clip", "fuyu"])
def test_native_and_reference_refuse_the_same_sizes(w, h, mode):
    data = encode_image(w, h, "PNG", seed=w + h)
    want = I.size_defect(w, h)
    got_native, got_ref = native_refusal(data, mode), reference_refusal(data, mode)
    if want is None:
        assert got_native is None and got_ref is None, (got_native, got_ref)
    else:
        assert want[0] == "extreme_aspect_ratio"
        assert got_native is not None and got_native.startswith("extreme aspect ratio: "), got_native
        assert got_ref == got_native  # word for word the same message


@pytest.mark.parametrize("mode", ["otter", "clip", "fuyu"])
def test_a_1_by_500000_strip_is_refused_from_its_header(mode):
    """The issue's example: it passes the pixel limit (500,000 pixels), and CLIP would make 224 x 112,000,000."""
    for w, h in [(1, 500_000), (500_000, 1)]:
        data = header_only_png(w, h)
        assert I.size_defect(w, h)[0] == "extreme_aspect_ratio"
        msg = f"extreme aspect ratio: {w}x{h}: long side over 200 x short side"
        assert native_refusal(data, mode) == msg
        assert reference_refusal(data, mode) == msg
        with pytest.raises(ValueError, match="extreme aspect ratio"):
            _native.decode_image(data)
        with pytest.raises(ValueError, match="extreme aspect ratio"):
            _native.decode_image(data, draft=224)


def test_clip_resize_is_bounded_by_max_pixels():
    """A 1 x 100 strip under CLIP at 224 makes 224 x 22,400 = 5,017,600 pixels: allowed at that limit, refused
    one pixel below it, by both loaders and with the same message."""
    data = encode_image(1, 100, "PNG")
    n = 224 * 22_400
    assert native_refusal(data, "clip", max_pixels=n) is None
    assert reference_refusal(data, "clip", max_pixels=n) is None
    got = native_refusal(data, "clip", max_pixels=n - 1)
    assert got == ("image too large: 1x100: CLIP's resize would make it 224x22400, over max_image_pixels "
                   f"{n - 1}")
    assert reference_refusal(data, "clip", max_pixels=n - 1) == got
    assert native_refusal(data, "otter", max_pixels=n - 1) is None  # Otter's squash is size x size, whatever the image


def test_fuyu_fit_with_a_side_of_zero_is_refused():
    """1 x 150 into 100 x 1920 shrinks by 2/3: width int(0.67) = 0, no patch column (an empty image)."""
    data = encode_image(1, 150, "PNG")
    assert I.fuyu_resized_size(150, 1, 100, 1920) == (100, 0)
    got = native_refusal(data, "fuyu", max_h=100, max_w=1920)
    assert got == "extreme aspect ratio: 1x150: Fuyu's fit into 100x1920 would make it 0x100"
    assert reference_refusal(data, "fuyu", max_h=100, max_w=1920) == got


def test_decode_checks_max_pixels_from_the_header():
    data = encode_image(100, 100, "PNG")
    for kw in ({}, {"draft": 16}):
        _native.decode_image(data, max_pixels=10_000, **kw)
        with pytest.raises(ValueError, match=r"image too large: 100x100 = 10000 pixels > max_image_pixels 9999"):
            _native.decode_image(data, max_pixels=9_999, **kw)
    with pytest.raises(ValueError, match=r"image too large: 100x100 = 10000 pixels > max_image_pixels 9999"):
        I.decode_rgb(data, None, 9_999)
    # the JPEG fast path (libjpeg-turbo) checks the same header
    jpeg = encode_image(100, 100, "JPEG")
    with pytest.raises(ValueError, match="image too large"):
        _native.decode_image(jpeg, draft=16, max_pixels=9_999)


# ---- prepare and the loaders, end to end -------------------------------------------------------------

def _strip_dataset(mini, strip: bytes):
    good = encode_image(40, 30, "JPEG", seed=1)
    img = mini.parquet_b64("img", {"GOOD": good, "STRIP": strip})
    mini.dataset("IMAGE_TEXT", "D", images_path=img, mimicit_path=mini.instructions("d", {
        "a": {"instruction": "q", "answer": "a", "image_ids": ["GOOD"]},
        "b": {"instruction": "q", "answer": "b", "image_ids": ["STRIP"]},
        "c": {"instruction": "q", "answer": "c", "image_ids": ["GOOD"]}}))
    return mini.yaml()


def test_prepare_names_and_counts_extreme_aspect_ratios(mini):
    y = _strip_dataset(mini, header_only_png(1, 500_000))
    with pytest.raises(DataError, match=r"extreme_aspect_ratio: 1\n") as e:
        validate(y, PrepareOptions())
    assert "img.parquet: id 'STRIP': 1x500000: long side over 200 x short side" in str(e.value)
    v = validate(y, PrepareOptions(on_error="skip"))
    assert dict(v.report.counts) == {"extreme_aspect_ratio": 1}
    assert sorted(c.query.id for c in v.candidates) == ["a", "c"]


def test_prepare_fuyu_refuses_a_fit_with_an_empty_side(mini):
    y = _strip_dataset(mini, encode_image(1, 150, "PNG"))
    v = validate(y, PrepareOptions(format="fuyu", fuyu_max_height=100, on_error="skip"))
    assert dict(v.report.counts) == {"extreme_aspect_ratio": 1}
    v = validate(y, PrepareOptions(on_error="skip"))  # not Fuyu: no fit, the image is fine
    assert dict(v.report.counts) == {}


@pytest.fixture
def stale_index(mini, tmp_path, demo_tok_dir, monkeypatch):
    """An index holding a 1 x 1000 strip, as one prepared before the aspect-ratio rule would."""
    y = _strip_dataset(mini, encode_image(1, 1000, "PNG", seed=3))
    monkeypatch.setattr(I, "size_defect", lambda w, h, max_pixels=0: None)
    out = str(tmp_path / "idx")
    prepare(y, demo_tok_dir, out, PrepareOptions())
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("transform", ["clip", "otter"])
def test_loaders_raise_naming_the_image(stale_index, transform):
    for loader in (NativeLoader, ReferenceLoader):
        with pytest.raises(DataError, match=r"img\.parquet: (dataset D: )?image id 'STRIP': cannot decode: "
                                            r"extreme aspect ratio: 1x1000: long side over 200 x short side"):
            list(loader(stale_index, batch_size=3, pack=False, image_transform=transform))


@pytest.mark.parametrize("transform", ["clip", "otter"])
def test_loaders_skip_and_count_alike(stale_index, transform):
    kw = dict(batch_size=3, pack=True, on_error="skip", image_transform=transform)
    native = NativeLoader(stale_index, **kw)
    nb = list(native)
    rb = list(ReferenceLoader(stale_index, **kw))
    assert native.skipped == 1 and sum(b["skipped"] for b in rb) == 1
    assert [b["sample_index"].tolist() for b in nb] == [b["sample_index"].tolist() for b in rb]
    assert np.array_equal(nb[0]["input_ids"], rb[0]["input_ids"])
    assert nb[0]["pixel_values"].shape == rb[0]["pixel_values"].shape == (2, 3, 224, 224)


# ---- eval and generate --------------------------------------------------------------------------------

def test_eval_images_refuse_extreme_sizes_before_decoding():
    from otterfast.eval.images import ImageError, to_pil_list

    with pytest.raises(ImageError, match=r"row 3 image: extreme aspect ratio: 1x500000"):
        to_pil_list({"bytes": header_only_png(1, 500_000)}, what="row 3 image")
    with pytest.raises(ImageError, match=r"x: extreme aspect ratio: 1000x1"):
        to_pil_list(Image.new("RGB", (1000, 1)), what="x")
    assert to_pil_list({"bytes": encode_image(200, 1, "PNG")})[0].size == (200, 1)


def test_generate_cli_names_the_image(tmp_path):
    import argparse

    from otterfast.generate.cli import run

    p = tmp_path / "strip.png"
    p.write_bytes(header_only_png(1, 500_000))
    a = argparse.Namespace(example=[], max_new_tokens=None, num_beams=None, resolution=None, image=[str(p)],
                           model=str(tmp_path))
    with pytest.raises(ValueError, match=r"--image .*strip\.png: extreme aspect ratio: 1x500000"):
        run(a)


def test_generator_resolution_resize_is_bounded():
    """OtterHD's --resolution scales the short side: a 1 x 200 strip at 1080 would be 1080 x 216,000."""
    from types import SimpleNamespace

    from otterfast.generate.generator import Generator

    g = Generator.__new__(Generator)  # inputs() checks sizes before any model work: no model needed
    g.kind, g.tok = "otterhd", lambda text, add_special_tokens: {"input_ids": [5]}
    g.info = SimpleNamespace(bos_id=None)
    with pytest.raises(ValueError, match=r"image too large: 1x200: --resolution 1080 would make it 1080x216000"):
        g.inputs("q", [Image.new("RGB", (1, 200))], resolution=1080)
    with pytest.raises(ValueError, match="extreme aspect ratio: 1x201"):
        g.inputs("q", [Image.new("RGB", (1, 201))])
