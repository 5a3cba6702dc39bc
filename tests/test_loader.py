"""The native loader against the reference loader: same plan, same tokens, pixels within a stated bound."""

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from otterfast import _native
from otterfast.data import images as I
from otterfast.data.batching import plan_batches, shard_batches
from otterfast.data.defects import DataError
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare
from otterfast.data.reference import ReferenceLoader
from conftest import encode_image

# Measured on the demo data (JPEG/PNG/WebP crops): the decoders differ on JPEG (zune-jpeg vs libjpeg-turbo:
# up to 4 levels) and the resizers by rounding (fast_image_resize vs Pillow: mostly 1 level, up to 7 when
# upscaling), so normalised Otter pixels differ by at most ~0.21 (about 14 levels of 255 through std 0.26) and
# by ~0.003 on average. The bounds below leave some room over those values.
OTTER_MAX_ABS, OTTER_MEAN_ABS = 0.3, 0.01
FUYU_MAX_ABS, FUYU_MEAN_ABS = 0.1, 0.01  # no resize for images under 1080x1920: decoder differences only
INT_KEYS = ["input_ids", "labels", "attention_mask", "position_ids", "segment_ids", "cu_seqlens", "sample_index",
            "media_row", "media_pos", "media_frames", "image_patches_indices"]


def compare(native, reference, pix_key, max_abs, mean_abs):
    n_batches = 0
    diffs = []
    for a, b in zip(native, reference, strict=True):
        n_batches += 1
        for k in INT_KEYS:
            if k in b:
                assert a[k].dtype == b[k].dtype, k
                assert np.array_equal(a[k], b[k]), k
        assert a["sample_id"] == b["sample_id"] and a["group"] == b["group"]
        assert a[pix_key].shape == b[pix_key].shape
        if a[pix_key].size:
            d = np.abs(a[pix_key] - b[pix_key])
            diffs.append((float(d.max()), float(d.mean())))
    assert n_batches > 0 and diffs
    worst = max(m for m, _ in diffs)
    mean = float(np.mean([m for _, m in diffs]))
    assert worst <= max_abs and mean <= mean_abs, (worst, mean)
    return worst, mean


@pytest.mark.parametrize("pack,draft", [(False, False), (True, False), (True, True)])
def test_native_equals_reference_otter(demo_index, pack, draft):
    kw = dict(batch_size=4, seed=5, pack=pack, capacity=512, jpeg_draft=draft)
    compare(NativeLoader(demo_index, **kw), ReferenceLoader(demo_index, **kw), "pixel_values",
            OTTER_MAX_ABS, OTTER_MEAN_ABS)


def test_native_equals_reference_clip_transform(demo_index):
    kw = dict(batch_size=8, seed=1, pack=True, image_transform="clip", num_threads=1)
    compare(NativeLoader(demo_index, **kw), ReferenceLoader(demo_index, **kw), "pixel_values",
            OTTER_MAX_ABS, OTTER_MEAN_ABS)


@pytest.mark.parametrize("pack", [False, True])
def test_native_equals_reference_fuyu(demo_index_fuyu, pack):
    kw = dict(batch_size=2, seed=2, pack=pack, capacity=4096)
    compare(NativeLoader(demo_index_fuyu, **kw), ReferenceLoader(demo_index_fuyu, **kw), "image_patches",
            FUYU_MAX_ABS, FUYU_MEAN_ABS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=120), st.integers(0, 10**6), st.booleans(),
       st.integers(1, 9), st.integers(1, 50), st.integers(1, 4))
def test_plan_equals_reference_plan(lengths, seed, pack, batch_size, window, world):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    want = plan_batches(lengths, order, batch_size, pack, 300, window)
    for rank in range(world):
        mine, dropped = shard_batches(want, rank, world, True)
        got, got_dropped = _native.plan_batches(lengths, order, batch_size, pack, 300, window, rank, world, True)
        assert got == mine and got_dropped == dropped


def test_plan_rejects_too_long_samples():
    with pytest.raises(ValueError, match="more than the packing capacity"):
        _native.plan_batches([10, 500], [0, 1], 2, True, 100, 10)


def test_resume_mid_epoch_is_exact(demo_index):
    kw = dict(batch_size=3, seed=11, pack=True, capacity=256, num_threads=1)
    straight = [b["sample_index"].tolist() for b in NativeLoader(demo_index, **kw)]
    first = NativeLoader(demo_index, **kw)
    it = iter(first)
    head = [next(it)["sample_index"].tolist() for _ in range(3)]
    state = first.state_dict()
    del it
    second = NativeLoader(demo_index, **kw)
    second.load_state_dict(state)
    tail = [b["sample_index"].tolist() for b in second]
    assert head + tail == straight and state == {"epoch": 0, "batches": 3, "seed": 11}


def test_epochs_change_order_and_ranks_split(demo_index):
    kw = dict(batch_size=2, seed=3, pack=False)
    loader = NativeLoader(demo_index, **kw)
    e0 = [b["sample_index"].tolist() for b in loader]
    e1 = [b["sample_index"].tolist() for b in loader]  # a second iter() is the next epoch
    assert loader.epoch == 2 and e0 != e1
    shards = []
    for rank in range(3):
        r = NativeLoader(demo_index, rank=rank, world_size=3, **kw)
        shards.append([s for b in r for s in b["sample_index"].tolist()])
    assert len({len(s) for s in shards}) == 1  # even: every rank the same number of steps
    flat = [s for sh in shards for s in sh]
    assert len(flat) == len(set(range(len(flat)))) and set(flat) <= set(s for b in e0 for s in b)


def test_zero_copy_to_torch_and_dataloader(demo_index):
    import torch

    loader = NativeLoader(demo_index, batch_size=2, pack=False)
    b = next(iter(loader))
    t = torch.from_numpy(b["input_ids"])
    assert t.data_ptr() == b["input_ids"].ctypes.data
    dl = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=0)
    assert isinstance(next(iter(dl))["input_ids"], torch.Tensor)


def test_forked_process_starts_its_own_threads(demo_index):
    """A loader used (threads started) in the parent keeps working in a forked child (DataLoader-style fork),
    and pickles without its engine (spawned workers)."""
    import multiprocessing as mp
    import pickle

    loader = NativeLoader(demo_index, batch_size=2, pack=False)
    parent = next(iter(loader))["input_ids"]
    loader.set_epoch(0)
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        q.put(next(iter(loader))["input_ids"].tolist())

    p = ctx.Process(target=child)
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    assert q.get(timeout=5) == parent.tolist()
    clone = pickle.loads(pickle.dumps(loader))
    assert next(iter(clone))["input_ids"].tolist() == parent.tolist()


def _decode_threads() -> set[int]:
    """Thread ids of this process's native decode threads (named otterfast-decode-N; comm keeps 15 bytes)."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("otterfast-decod"):
                    out.add(int(tid))
        except OSError:
            pass  # a thread that ended while listed
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_decode_threads_live_as_long_as_the_loader(demo_index):
    """One pool of `num_threads` decode threads serves every epoch (a fresh pool per epoch made glibc's arenas
    fragment: benches/soak.py), and goes when the loader goes."""
    import gc

    before = _decode_threads()
    loader = NativeLoader(demo_index, batch_size=2, pack=False, num_threads=2)
    assert _decode_threads() == before  # no threads until the first epoch
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        seen.append(_decode_threads() - before)
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]
    del loader
    gc.collect()
    import time

    deadline = time.monotonic() + 10
    while _decode_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_decode_threads() - before)


def _corrupt_dataset(mini, tmp_path, demo_tok_dir):
    good = encode_image(40, 30, "JPEG", seed=1)
    bad = encode_image(200, 150, "PNG", seed=2)
    bad = bad[: len(bad) // 2]  # the header is intact (prepare accepts it), the pixel data is cut
    img = mini.parquet_b64("img", {"GOOD": good, "BAD": bad})
    mini.dataset("IMAGE_TEXT", "D", images_path=img, mimicit_path=mini.instructions("d", {
        "a": {"instruction": "q", "answer": "a", "image_ids": ["GOOD"]},
        "b": {"instruction": "q", "answer": "b", "image_ids": ["BAD"]},
        "c": {"instruction": "q", "answer": "c", "image_ids": ["GOOD"]}}))
    out = str(tmp_path / "idx")
    prepare(mini.yaml(), demo_tok_dir, out, PrepareOptions())
    return out


def test_corrupt_image_raises_naming_file_and_id(mini, tmp_path, demo_tok_dir):
    idx = _corrupt_dataset(mini, tmp_path, demo_tok_dir)
    with pytest.raises(DataError, match=r"img\.parquet: dataset D: image id 'BAD': cannot decode"):
        for _ in NativeLoader(idx, batch_size=3, pack=False):
            pass


def test_corrupt_image_skipped_and_counted(mini, tmp_path, demo_tok_dir):
    idx = _corrupt_dataset(mini, tmp_path, demo_tok_dir)
    native = NativeLoader(idx, batch_size=3, pack=True, on_error="skip")
    nb = list(native)
    rb = list(ReferenceLoader(idx, batch_size=3, pack=True, on_error="skip"))
    assert native.skipped == 1 and sum(b["skipped"] for b in rb) == 1
    assert [b["sample_index"].tolist() for b in nb] == [b["sample_index"].tolist() for b in rb]
    assert np.array_equal(nb[0]["input_ids"], rb[0]["input_ids"])


def _spoiled_copy(idx, tmp_path, column, spoil):
    """A copy of the index whose samples.arrow has `column` rewritten by spoil(list of row values)."""
    import shutil

    import pyarrow as pa

    out = str(tmp_path / "spoiled")
    shutil.copytree(idx, out)
    with pa.memory_map(os.path.join(idx, "samples.arrow")) as src:
        t = pa.ipc.open_file(src).read_all()
    i = t.schema.get_field_index(column)
    values = t.column(column).to_pylist()
    spoil(values)
    t = t.set_column(i, t.schema.field(i), pa.array(values, type=t.schema.field(i).type))
    with pa.OSFile(os.path.join(out, "samples.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    return out


@pytest.mark.parametrize("column,spoil,message", [
    # sample 'b' shows image row 99 of an image table of 2 (GOOD, BAD)
    ("media_images", lambda v: v.__setitem__(1, [[99]]),
     r"image row 99 out of range \(the image table .*images\.arrow holds 2 images\)"),
    ("label_spans", lambda v: v.__setitem__(1, [0, 10_000]), r"label span 0\.\.10000 outside its \d+ tokens"),
])
def test_index_out_of_range_raises_at_construction(mini, tmp_path, demo_tok_dir, column, spoil, message):
    """An index whose references leave their tables is refused when the loader is built, with a ValueError
    naming the file and the sample, before any thread starts (never a panic or a wrong batch)."""
    idx = _corrupt_dataset(mini, tmp_path, demo_tok_dir)
    rows = PreparedIndex(idx).samples.column("sample_id").to_pylist()
    bad = _spoiled_copy(idx, tmp_path, column, spoil)
    with pytest.raises(ValueError, match=rf"samples\.arrow: sample '{rows[1]}' \(row 1\): {message}") as e:
        NativeLoader(bad, batch_size=3, pack=False)
    assert isinstance(e.value, DataError)


# ---- decoding, per format ------------------------------------------------------------------------

PHOTO = None


def _photo():
    global PHOTO
    if PHOTO is None:
        import skimage.data

        PHOTO = Image.fromarray(skimage.data.astronaut()).crop((13, 29, 300, 241))
    return PHOTO


@pytest.mark.parametrize("fmt,mode,kw,max_levels", [
    ("PNG", "RGB", {}, 0), ("PNG", "RGBA", {}, 0), ("PNG", "P", {}, 0), ("PNG", "L", {}, 0),
    ("PNG", "I;16", {}, 0), ("GIF", "P", {}, 0), ("WEBP", "RGB", {"lossless": True}, 0),
    ("WEBP", "RGB", {"quality": 80}, 0),
    ("JPEG", "RGB", {"quality": 90}, 4), ("JPEG", "RGB", {"quality": 90, "progressive": True}, 4),
    ("JPEG", "L", {}, 2), ("JPEG", "CMYK", {}, 4),
])
def test_decode_matches_pil(fmt, mode, kw, max_levels):
    img = _photo().convert(mode) if mode != "I;16" else _photo().convert("L").convert("I;16")
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    data = buf.getvalue()
    want = np.asarray(I.decode_rgb(data), dtype=np.int16)
    got = _native.decode_image(data).astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= max_levels


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("size", [(300, 200), (700, 500), (2000, 1900), (224, 900)])
def test_jpeg_draft_decode_is_pil_draft(mode, size):
    """The draft path (libjpeg-turbo, DCT-scaled when large) decodes exactly what PIL decodes after
    img.draft("RGB", (224, 224))."""
    img = _photo().resize(size).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    want = np.asarray(I.decode_rgb(data, 224), dtype=np.int16)
    got = _native.decode_image(data, 224).astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= (0 if mode != "CMYK" else 4)  # CMYK: no draft, the full decoder
    if min(size) >= 448 and mode != "CMYK":
        assert got.shape[0] < size[1]  # really decoded at reduced scale


@pytest.mark.parametrize("w,h", [(1, 1), (37, 61), (300, 200), (2000, 1200), (1000, 2500)])
def test_fuyu_patches_native_vs_reference(w, h):
    rng = np.random.default_rng(w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    got, rows, cols = _native.transform_image(buf.getvalue(), "fuyu")
    want, wr, wc = I.fuyu_patches(img)
    assert (rows, cols) == (wr, wc)
    tol = 0.0 if (w, h) == I.fuyu_resized_size(h, w)[::-1] else 8 * 2 / 255  # resizer rounding when shrinking
    assert np.abs(got - want).max() <= tol + 1e-6


_SEEDS = [encode_image(17, 11, f, mode=m) for f, m in [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("WEBP", "RGB")]]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.integers(0, 10_000), st.sampled_from(["otter", "fuyu"]))
def test_fuzz_decode_never_panics(seed, flips, cut, mode):
    b = bytearray(seed)
    for pos, val in flips:
        b[pos % len(b)] = val
    for blob in (bytes(b), bytes(b[: cut % (len(b) + 1)])):
        try:
            _native.transform_image(blob, mode)
        except ValueError:
            pass
