"""The reference loader: pixels against transformers' processors, Fuyu tokens and patches, order, padding."""

import numpy as np
import pytest
from PIL import Image

from otterfast.data import images as I
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import as_torch
from otterfast.data.reference import ReferenceLoader, dense_media
from otterfast.data.tokenizer import labels_from_spans


def _rand_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


SIZES = [(1, 1), (37, 61), (224, 224), (300, 200), (31, 900), (2000, 1200), (1000, 2500)]


@pytest.mark.parametrize("w,h", SIZES)
def test_otter_transform_matches_square_bicubic_resize(w, h):
    # Otter: Resize((224, 224), BICUBIC) + ToTensor + Normalize(FLAMINGO stats); the same geometry and stats
    # through transformers' PIL image processor, an implementation we did not write.
    from transformers import CLIPImageProcessorPil

    img = _rand_image(w, h)
    ref = CLIPImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False, resample=3,
                                image_mean=list(I.FLAMINGO_MEAN), image_std=list(I.FLAMINGO_STD))
    want = ref(images=[img], return_tensors=None)["pixel_values"][0]
    got = I.otter_transform(img)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-6


@pytest.mark.parametrize("w,h", SIZES)
def test_clip_transform_matches_clip_image_processor(w, h):
    from transformers import CLIPImageProcessorPil

    img = _rand_image(w, h, seed=1)
    want = CLIPImageProcessorPil()(images=[img], return_tensors=None)["pixel_values"][0]
    assert np.abs(I.clip_transform(img) - want).max() < 2e-6


def _fuyu_reference(img):
    import torch
    from transformers import FuyuImageProcessorPil

    fp = FuyuImageProcessorPil()
    out = fp(images=[img], return_tensors=None)
    padded = torch.from_numpy(np.asarray(out["images"][0][0]))[None, None]
    uh, uw = out["image_unpadded_heights"][0][0], out["image_unpadded_widths"][0][0]
    res = fp.preprocess_with_tokenizer_info(padded, torch.ones(1, 1, 1), torch.tensor([[uh]]),
                                            torch.tensor([[uw]]), 7, 8, True)
    return (res["image_patches"][0][0].numpy(), res["image_input_ids"][0][0].numpy(),
            res["image_patch_indices_per_subsequence"][0][0].numpy())


@pytest.mark.parametrize("w,h", SIZES)
def test_fuyu_patches_and_tokens_match_fuyu_image_processor(w, h):
    img = _rand_image(w, h, seed=2)
    patches, rows, cols = I.fuyu_patches(img)
    ids, idx = I.fuyu_image_tokens(rows, cols, 7, 8)
    want_p, want_ids, want_idx = _fuyu_reference(img)
    assert patches.shape == want_p.shape == (rows * cols, 2700)
    assert np.abs(patches - want_p).max() <= 2.5e-7  # float32 rounding of x/255
    assert (ids == want_ids).all() and (idx == want_idx).all()
    assert len(ids) == I.fuyu_num_tokens(h, w)
    assert patches.min() >= -1 and patches.max() <= 1


def test_fuyu_token_counts_from_reference_table():
    # otter-reference 4.2: 224^2 -> 72, 448^2 -> 240, 512^2 -> 342, 768^2 -> 702, 1080^2 -> 1332
    for side, n in [(224, 72), (448, 240), (512, 342), (768, 702), (1080, 1332)]:
        assert I.fuyu_num_tokens(side, side) == n
    assert I.fuyu_resized_size(2160, 1000) == (1080, 500)  # keeps aspect ratio
    assert I.fuyu_resized_size(100, 50) == (100, 50)  # never upscales


def test_otter_batch_unpacked(demo_index):
    idx = PreparedIndex(demo_index)
    loader = ReferenceLoader(idx, batch_size=6, seed=3, pack=False, jpeg_draft=False)
    batch = next(iter(loader))
    B, T = batch["input_ids"].shape
    assert B == 6 and batch["labels"].shape == (B, T)
    rows = loader.plan()[0]
    assert all(len(r) == 1 for r in rows)
    frame = 0
    for b, (row,) in enumerate(rows):
        s = idx.sample(row)
        n = len(s.input_ids)
        assert batch["input_ids"][b, :n].tolist() == s.input_ids
        assert (batch["input_ids"][b, n:] == idx.tok["pad_id"]).all()
        assert batch["labels"][b, :n].tolist() == labels_from_spans(s.input_ids, s.label_spans)
        assert (batch["labels"][b, n:] == -100).all() and batch["attention_mask"][b].sum() == n
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
        for m, media in enumerate(s.media_images):
            for r in media:
                assert np.array_equal(batch["pixel_values"][frame], I.otter_transform(loader.load_image(r)))
                frame += 1
        mine = batch["media_row"] == b
        assert batch["media_pos"][mine].tolist() == s.media_pos
        assert batch["media_frames"][mine].tolist() == [len(m) for m in s.media_images]
    assert frame == len(batch["pixel_values"])
    dense, counts = dense_media(batch)
    assert dense.shape[:3] == (B, counts.shape[1], int(counts.max(initial=0)))
    t = as_torch(batch)
    assert t["input_ids"].data_ptr() == batch["input_ids"].ctypes.data  # no copy


def test_packed_batches(demo_index):
    idx = PreparedIndex(demo_index)
    # a one-epoch run: its leftover row is emitted, not carried (tests/test_epoch_carry.py)
    loader = ReferenceLoader(idx, batch_size=2, seed=1, pack=True, capacity=256, last_epoch=0)
    plan = loader.plan()
    lengths = idx.num_tokens()
    used = sorted(s for batch in plan for row in batch for s in row)
    assert used == sorted(idx.epoch_order(1, 0))  # every sample of the epoch, once
    assert all(sum(lengths[s] for s in row) <= 256 for batch in plan for row in batch)
    batch = loader.collate_rows(plan[0])
    assert batch["input_ids"].shape == (2, 256)
    for b, row in enumerate(plan[0]):
        off = 0
        for k, r in enumerate(row):
            s = idx.sample(r)
            n = len(s.input_ids)
            assert batch["input_ids"][b, off:off + n].tolist() == s.input_ids
            assert batch["position_ids"][b, off:off + n].tolist() == list(range(n))
            assert (batch["segment_ids"][b, off:off + n] == k).all()
            off += n
        assert (batch["segment_ids"][b, off:] == -1).all() and (batch["labels"][b, off:] == -100).all()
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == 2 * 256 and (np.diff(cu) > 0).all()
    padding = 1 - sum(lengths[s] for batch in plan for row in batch for s in row) / (
        256 * sum(len(b) for b in plan))
    assert padding < 0.05


def test_decoded_pixels_equal_pil_on_source_bytes(demo_dir, demo_index):
    """Every layout (base64 parquet, raw bytes, dask directory, legacy JSON) decodes to PIL's pixels."""
    import base64
    import json
    import os

    idx = PreparedIndex(demo_index)
    loader = ReferenceLoader(idx)
    legacy = json.load(open(os.path.join(demo_dir, "DEMO_LEGACY.json")))
    seen_sources = set()
    for r in range(len(idx.images)):
        info = idx.image(r)
        img = loader.load_image(r)
        assert img.size == (info["width"], info["height"]) and img.mode == "RGB"
        if info["image_id"] in legacy and info["source"] not in seen_sources:
            want = I.decode_rgb(base64.b64decode(legacy[info["image_id"]]))
            assert np.array_equal(np.asarray(img), np.asarray(want))
        seen_sources.add(info["source"])
    assert len(seen_sources) == 4


def test_fuyu_batch(demo_index_fuyu):
    idx = PreparedIndex(demo_index_fuyu)
    loader = ReferenceLoader(idx, batch_size=4, seed=0, pack=False)
    batch = next(iter(loader))
    ph, nl = idx.tok["fuyu_placeholder_id"], idx.tok["fuyu_newline_id"]
    ids, pidx, labels = batch["input_ids"], batch["image_patches_indices"], batch["labels"]
    n_patches = batch["image_patches"].shape[0]
    assert sorted(pidx[pidx >= 0].tolist()) == list(range(n_patches))  # each patch used once
    assert ((ids == ph) == (pidx >= 0)).all()
    assert (labels[(ids == ph) | (ids == nl)] == -100).all()
    for b, (row,) in enumerate(loader.plan()[0]):
        s = idx.sample(row)
        assert int(batch["attention_mask"][b].sum()) == s.num_tokens
        if s.media_images and s.media_pos[0] == 0:
            assert ids[b, 0] == ph  # image tokens come before BOS
        # the text tokens, in order, are the prepared ones
        text = [t for t in ids[b, : s.num_tokens].tolist() if t not in (ph, nl)]
        assert text == s.input_ids


def test_epoch_order_deterministic_new_each_epoch_and_sharded(demo_index):
    idx = PreparedIndex(demo_index)
    a0, a0_again, a1 = idx.epoch_order(7, 0), idx.epoch_order(7, 0), idx.epoch_order(7, 1)
    assert a0 == a0_again and a0 != a1
    expected_len = 0
    for d in idx.meta["datasets"]:
        n = d["prepared_samples"]
        expected_len += n if d["num_samples"] in (-1, 0) else d["num_samples"]
    assert len(a0) == expected_len
    shards = [idx.epoch_order(7, 0, rank=r, world_size=3) for r in range(3)]
    merged = sorted(x for s in shards for x in s)
    assert merged == sorted(a0)  # complete
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # disjoint as positions of one order: rank r holds positions r, r+3, ...
    assert [x for pos in zip(*shards) for x in pos] == a0[: 3 * min(map(len, shards))]


def test_text_only_batch_has_no_media(demo_index):
    idx = PreparedIndex(demo_index)
    rows = [i for i in range(len(idx)) if idx.sample(i).group == "TEXT_ONLY"][:3]
    batch = ReferenceLoader(idx).collate([idx.sample(i) for i in rows])
    assert batch["pixel_values"].shape == (0, 3, 224, 224) and batch["media_frames"].shape == (0,)
