"""Webdataset tar shards (MMC4 documents, LAION pairs): Otter's filters and label rule on hand-built data (golden
tokens and labels written from ../shared/pretraining-reference.md), defects, both loaders, resume, ranks, mixing."""

import base64
import json
import os
import tarfile

import numpy as np
import pytest
import yaml

from otterfast.data import shards
from otterfast.data.defects import DataError, DefectsFound
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare, validate
from otterfast.data.reference import ReferenceLoader
from otterfast.data.shard_writer import mmc4_member, pair_members, write_tar
from otterfast.data.tokenizer import labels_from_spans, load_tokenizer
from conftest import encode_image
from test_loader import OTTER_MAX_ABS, OTTER_MEAN_ABS, compare

X = -100
BIG = [encode_image(120, 100, "PNG", seed=i) for i in range(8)]  # ~36 KB of noise each: above Otter's 10 KB
SMALL = encode_image(8, 8, "PNG", seed=9)  # under 10 KB: filtered


@pytest.fixture(scope="module")
def tok(demo_tok_dir):
    return load_tokenizer(demo_tok_dir, "simple")


def T(tok, text):
    """Tokens of a plain-text segment; special tokens split the text, so each segment tokenizes on its own."""
    return tok[0](text, add_special_tokens=False)["input_ids"]


def write_yaml(root, doc) -> str:
    p = os.path.join(root, "data.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(doc, f)
    return p


def prep(root, tok_dir, doc, on_error="raise", **kw):
    out = os.path.join(root, "index")
    meta = prepare(write_yaml(root, doc), tok_dir, out, PrepareOptions(on_error=on_error, **kw))
    return PreparedIndex(out), meta


def by_id(ix):
    return {ix.sample(i).sample_id: ix.sample(i) for i in range(len(ix))}


def test_brace_patterns():
    assert shards.expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert shards.expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar",
                                                           "b/10.tar"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]


# ---- golden tokens and labels --------------------------------------------------------------------------------

def test_mmc4_golden_tokens_labels_and_media_order(tmp_path, demo_tok_dir, tok):
    t, info = tok
    IMG, EOC, EOS = info.media_id, info.eoc_id, info.eos_id
    sentences = ["A cat sits.", "It is red.", "A dog runs."]
    # image_info deliberately not in sentence order; one small image and one low-sim image are filtered
    doc1 = mmc4_member("d1", sentences, [(BIG[1], 2, 0.40), (SMALL, 1, 0.9), (BIG[0], 0, 0.50), (BIG[2], 1, 0.10)])
    doc2 = mmc4_member("d2", ["Intro here.", "A cat sits."], [(BIG[3], 1, 0.33)])
    write_tar(str(tmp_path / "docs" / "00000.tar"), [doc1, doc2])
    ix, meta = prep(str(tmp_path), demo_tok_dir,
                    {"MMC4": {"docs": {"shards": "docs/{00000..00000}.tar", "single_image_drop": 0.0}}})
    s = by_id(ix)
    d1, d2 = s["docs/00000.tar/d1"], s["docs/00000.tar/d2"]
    # text (reference step 3): "<image>A cat sits. It is red.<|endofchunk|><image>A dog runs.<|endofchunk|></s>"
    assert shards.mmc4_text(sentences, [0, 2], "</s>") == \
        "<image>A cat sits. It is red.<|endofchunk|><image>A dog runs.<|endofchunk|></s>"
    t1, t2 = T(tok, "A cat sits. It is red."), T(tok, "A dog runs.")
    assert d1.input_ids == [IMG] + t1 + [EOC, IMG] + t2 + [EOC, EOS]
    # labels: <image> and the first token ignored; text after each image through its <|endofchunk|> learned; the
    # EOS after the last <|endofchunk|> ignored (Otter's rule: up to the next <image>, here the end)
    assert labels_from_spans(d1.input_ids, d1.label_spans) == [X] + t1 + [EOC, X] + t2 + [EOC, X]
    assert d1.media_pos == [0, len(t1) + 2]
    img_ids = [[ix.image(r)["image_id"] for r in m] for m in d1.media_images]
    # media follow their sentences: image_info[2] (sentence 0) first, then image_info[0] (sentence 2)
    assert img_ids == [["docs/00000.tar/d1.json#image_info[2]"], ["docs/00000.tar/d1.json#image_info[0]"]]
    # "Intro here.<image>A cat sits.<|endofchunk|></s>": everything before the first <image> is ignored
    ti, tc = T(tok, "Intro here."), T(tok, "A cat sits.")
    assert d2.input_ids == ti + [IMG] + tc + [EOC, EOS]
    assert labels_from_spans(d2.input_ids, d2.label_spans) == [X] * len(ti) + [X] + tc + [EOC, X]
    f = meta["report"]["filtered"]
    assert f["mmc4_small_image"] == 1 and f["mmc4_low_sim"] == 1
    # the reference loader decodes the image at the located byte range: the image written there
    ref = ReferenceLoader(ix)
    for m, want in zip(d1.media_images, (BIG[0], BIG[1])):
        src, r = ix.image_ref(m[0])
        assert base64.b64decode(ref.blobs.read(src, r)) == want


def test_laion_golden_tokens_labels_truncation_and_base64_members(tmp_path, demo_tok_dir, tok):
    t, info = tok
    IMG, EOC, EOS = info.media_id, info.eoc_id, info.eos_id
    long_caption = " ".join(["a red cat sits on a mat"] * 10)
    members = (pair_members("p0", "  A red cat.\n", BIG[0])
               + pair_members("p1", long_caption, BIG[1], ext="png", as_base64=True)
               + [("p2.txt", b"no image")] + [("p3.jpg", BIG[2])]
               + pair_members("p4", "<image>A <|endofchunk|>cat", BIG[3], ext="jpeg"))
    write_tar(str(tmp_path / "pairs.tar"), members)
    ix, meta = prep(str(tmp_path), demo_tok_dir, {"LAION": {"pairs": {"shards": "pairs.tar"}}})
    s = by_id(ix)
    assert sorted(s) == ["pairs.tar/p0", "pairs.tar/p1", "pairs.tar/p4"]
    p0 = s["pairs.tar/p0"]
    tc = T(tok, "A red cat.")
    assert p0.input_ids == [IMG] + tc + [EOC, EOS]  # "<image>{caption stripped}<|endofchunk|></s>"
    assert labels_from_spans(p0.input_ids, p0.label_spans) == [X] + tc + [EOC, EOS]  # first token, <image>: ignored
    p1 = s["pairs.tar/p1"]
    full = [IMG] + T(tok, long_caption) + [EOC, EOS]
    assert p1.input_ids == full[:32] and p1.num_tokens == 32  # truncated to 32 tokens
    assert labels_from_spans(p1.input_ids, p1.label_spans) == [X] + full[1:32]
    # special-token strings typed in a caption are removed: one media, one <image>
    assert s["pairs.tar/p4"].input_ids == [IMG] + T(tok, "A cat") + [EOC, EOS]
    f = meta["report"]["filtered"]
    assert f == {"pair_without_caption": 1, "pair_without_image": 1, "truncated": 1}
    # the base64 member is a source of its own; both read back to the image written
    enc = {ix.sources[ix.image_ref(r)[0]].encoding for r in range(len(ix.images))}
    assert enc == {"raw", "base64"}
    ref = ReferenceLoader(ix)
    got = {ix.image(r)["image_id"]: ref.blobs.read(*ix.image_ref(r)) for r in range(len(ix.images))}
    assert base64.b64decode(got["pairs.tar/p1.png"]) == BIG[1] and got["pairs.tar/p0.jpg"] == BIG[0]


def test_mmc4_filters_max_images_and_truncation(tmp_path, demo_tok_dir):
    seven = mmc4_member("many", [f"Sentence {i}." for i in range(7)], [(BIG[i % 8], i, 0.5) for i in range(7)])
    none_left = mmc4_member("none", ["Only text."], [(SMALL, 0, 0.9)])
    cut = mmc4_member("cut", ["word " * 400, "The end."], [(BIG[0], 1, 0.5), (BIG[1], 1, 0.5)])
    write_tar(str(tmp_path / "d.tar"), [seven, none_left, cut])
    ix, meta = prep(str(tmp_path), demo_tok_dir, {"MMC4": {"d": {"shards": "d.tar"}}})
    s = by_id(ix)
    assert list(s) == ["d.tar/many"]
    many = s["d.tar/many"]
    assert len(many.media_images) == 5 and len(many.media_pos) == 5  # the first 5 images only
    f = meta["report"]["filtered"]
    assert f["mmc4_extra_image"] == 2 and f["mmc4_no_image"] == 1 and f["mmc4_no_image_after_truncation"] == 1
    assert max(ix.num_tokens()) <= 256


def test_single_image_drop_is_seeded(tmp_path, demo_tok_dir):
    docs = [mmc4_member(f"k{i}", [f"Photo {i}."], [(BIG[i % 8], 0, 0.5)]) for i in range(40)]
    write_tar(str(tmp_path / "d.tar"), docs)
    ix, meta = prep(str(tmp_path), demo_tok_dir, {"MMC4": {"d": {"shards": "d.tar"}}})
    kept = set(by_id(ix))
    want = {f"d.tar/k{i}" for i in range(40) if shards.single_image_draw("d", f"d.tar/k{i}") > 0.5}
    assert kept == want and 8 < len(kept) < 32  # about half, decided by the hash of (dataset, sample id)
    assert meta["report"]["filtered"]["mmc4_single_image_dropped"] == 40 - len(kept)
    ix2, _ = prep(str(tmp_path), demo_tok_dir, {"MMC4": {"d": {"shards": "d.tar"}}})
    assert set(by_id(ix2)) == kept


# ---- defects -------------------------------------------------------------------------------------------------

def _broken_dataset(root):
    good = [mmc4_member(f"g{i}", ["One.", "Two."], [(BIG[0], 0, 0.5), (BIG[1], 1, 0.5)]) for i in range(3)]
    bad_json = ("bj.json", b"{not json")
    no_fields = ("nf.json", json.dumps({"text_list": "x"}).encode())
    not_image = mmc4_member("ni", ["One.", "Two."], [(b"\x00" * 12000, 0, 0.5), (BIG[1], 1, 0.5)])
    write_tar(os.path.join(root, "d", "0.tar"), good + [bad_json, no_fields, not_image])
    p1 = os.path.join(root, "d", "1.tar")
    write_tar(p1, [mmc4_member(f"t{i}", ["One.", "Two."], [(BIG[2], 0, 0.5), (BIG[3], 1, 0.5)]) for i in range(4)])
    with open(p1, "r+b") as f:  # cut inside the third document
        f.truncate(os.path.getsize(p1) * 2 // 3)
    return {"MMC4": {"d": {"shards": "d/{0..1}.tar"}}}


def test_broken_shard_and_members_raise_naming_them(tmp_path, demo_tok_dir):
    doc = _broken_dataset(str(tmp_path))
    with pytest.raises(DefectsFound) as e:
        prep(str(tmp_path), demo_tok_dir, doc)
    msg = str(e.value)
    assert "bad_shard: 1" in msg and "bad_member: 2" in msg and "not_an_image: 1" in msg
    assert f"{tmp_path}/d/1.tar" in msg and "unreadable after member 't1.json'" in msg
    assert "'bj.json'" in msg and "'d/0.tar/ni.json#image_info[0]'" in msg


def test_broken_shard_and_members_skipped_and_counted(tmp_path, demo_tok_dir):
    doc = _broken_dataset(str(tmp_path))
    ix, meta = prep(str(tmp_path), demo_tok_dir, doc, on_error="skip")
    assert meta["report"]["defects"] == {"bad_member": 2, "bad_shard": 1, "not_an_image": 1}
    ids = set(by_id(ix))
    assert {"d/0.tar/g0", "d/0.tar/g1", "d/0.tar/g2", "d/1.tar/t0", "d/1.tar/t1"} <= ids
    assert not ids & {"d/0.tar/ni", "d/1.tar/t3"}
    # data validate sees the same defects without a tokenizer
    v = validate(os.path.join(str(tmp_path), "data.yaml"), PrepareOptions(on_error="skip"))
    assert dict(v.report.counts) == {"bad_member": 2, "bad_shard": 1, "not_an_image": 1}


def test_stray_members_are_bad_members(tmp_path, demo_tok_dir):
    members = pair_members("a", "A cat.", BIG[0]) + [("README", b"x")] + pair_members("b", "A dog.", BIG[1]) \
        + [("a.json", b"{}")]
    write_tar(str(tmp_path / "p.tar"), members)
    ix, meta = prep(str(tmp_path), demo_tok_dir, {"LAION": {"p": {"shards": "p.tar"}}}, on_error="skip")
    assert meta["report"]["defects"] == {"bad_member": 2}
    assert set(by_id(ix)) == {"p.tar/a", "p.tar/b"}


def test_yaml_errors_name_file_and_key(tmp_path, demo_tok_dir):
    write_tar(str(tmp_path / "p.tar"), pair_members("a", "A cat.", BIG[0]))
    bad = [({"LAION": {"p": {"shards": "p.tar", "sim_threshold": 0.3}}}, "LAION.p: unknown key(s) ['sim_threshold']"),
           ({"LAION": {"p": {"shards": "q/{0..1}.tar"}}}, "shard does not exist"),
           ({"LAION": {"p": {"weight": 1}}}, "`shards` is required"),
           ({"MMC4": {"p": {"shards": "p.tar", "weight": -1}}}, "`weight` must be a number >= 0.0"),
           ({"LAION": {"p": {"shards": "p.tar"}}, "COYO": {}}, "unknown group 'COYO'")]
    for doc, want in bad:
        with pytest.raises(DataError, match=None) as e:
            prep(str(tmp_path), demo_tok_dir, doc)
        assert want in str(e.value) and "data.yaml" in str(e.value), str(e.value)
    import gzip

    with open(tmp_path / "p.tar", "rb") as f:
        data = f.read()
    with open(tmp_path / "z.tar", "wb") as f:
        f.write(gzip.compress(data))
    with pytest.raises(DataError, match="compressed tar shards are not supported"):
        prep(str(tmp_path), demo_tok_dir, {"LAION": {"p": {"shards": "z.tar"}}})


# ---- loading, mixing, resume, ranks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory, demo_tok_dir):
    from otterfast.data.demo import DemoBuilder, _shard_image

    root = str(tmp_path_factory.mktemp("mixed"))
    b = DemoBuilder(root, seed=7)  # photo crops (JPEG, PNG, WebP): the loaders' pixel bound is for real images
    photos = [_shard_image(b.crop().image, b.rng) for _ in range(12)]
    for s in range(2):
        docs = [mmc4_member(f"d{s}_{i}", [f"Photo {i}.", "More text here.", f"And {s}."],
                            [(photos[(i + s) % 12], 0, 0.5), (photos[(i + 3) % 12], 2, 0.4)]) for i in range(12)]
        write_tar(os.path.join(root, "docs", f"{s:05d}.tar"), docs)
        pairs = []
        for i in range(16):
            pairs += pair_members(f"p{s}_{i}", f"Photo number {i} of shard {s}.", photos[(i * 5 + s) % 12],
                                  ext="png", as_base64=(i % 3 == 0))
        write_tar(os.path.join(root, "pairs", f"{s:05d}.tar"), pairs)
    doc = {"MMC4": {"docs": {"shards": "docs/{00000..00001}.tar", "weight": 1.0}},
           "LAION": {"pairs": {"shards": "pairs/{00000..00001}.tar", "weight": 0.5}}}
    out = os.path.join(root, "index")
    prepare(write_yaml(root, doc), demo_tok_dir, out, PrepareOptions(max_seq_len=512))
    return out


def test_native_equals_reference_on_shards(mixed):
    kw = dict(batch_size=2, seed=3, pack=True, capacity=512)
    compare(NativeLoader(mixed, **kw), ReferenceLoader(mixed, **kw), "pixel_values", OTTER_MAX_ABS, OTTER_MEAN_ABS)


def test_mixing_by_weight_per_packed_row(mixed):
    ix = PreparedIndex(mixed)
    d = {x["name"]: x for x in ix.meta["datasets"]}
    n_docs, n_pairs = d["docs"]["prepared_samples"], d["pairs"]["prepared_samples"]
    assert n_docs >= 20 and n_pairs == 32
    assert d["docs"]["num_samples"] == n_docs and d["pairs"]["num_samples"] == 16  # weight 1.0; weight 0.5
    for epoch in range(2):
        order = ix.epoch_order(seed=0, epoch=epoch)
        groups = [ix.sample(i).group for i in order]
        assert groups.count("MMC4") == n_docs and groups.count("LAION") == 16
    e0, e1 = (set(ix.epoch_order(0, e)) for e in range(2))
    assert e0 != e1  # a fresh subset of pairs each epoch
    batches = list(NativeLoader(mixed, batch_size=1, pack=True, capacity=512, seed=0))
    assert any(set(b["group"]) == {"MMC4", "LAION"} for b in batches)  # sources meet inside packed rows


def test_resume_mid_epoch_is_exact_and_ranks_disjoint(mixed):
    kw = dict(batch_size=1, pack=True, capacity=128, seed=1)
    full = [b["sample_index"].tolist() for b in NativeLoader(mixed, **kw)]
    assert len(full) > 6
    a = NativeLoader(mixed, **kw)
    it = iter(a)
    first = [next(it)["sample_index"].tolist() for _ in range(4)]
    state = a.state_dict()
    del it
    b = NativeLoader(mixed, **kw)
    b.load_state_dict(state)
    rest = [x["sample_index"].tolist() for x in b]
    assert first + rest == full
    ranks = [[i for x in NativeLoader(mixed, rank=r, world_size=2, even_batches=False, **kw)
              for i in x["sample_index"].tolist()] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and ranks[0] and ranks[1]
    assert sorted(ranks[0] + ranks[1]) == sorted(i for x in full for i in x)  # disjoint and complete


def test_rewritten_shard_is_refused(tmp_path, demo_tok_dir):
    write_tar(str(tmp_path / "p.tar"), pair_members("a", "A cat.", BIG[0]))
    ix, _ = prep(str(tmp_path), demo_tok_dir, {"LAION": {"p": {"shards": "p.tar"}}})
    write_tar(str(tmp_path / "p.tar"), pair_members("a", "A cat!", BIG[1]))
    with pytest.raises(DataError, match="p.tar: image table rewritten"):
        NativeLoader(ix.path)


def test_tar_reading_streams(tmp_path):
    """iter_samples groups adjacent members and reports where a cut tar breaks."""
    p = str(tmp_path / "x.tar")
    write_tar(p, pair_members("a", "A.", BIG[0]) + pair_members("dir/b", "B.", BIG[1]))
    got = [(k, sorted(m)) for k, m in shards.iter_samples(p, lambda *a: None)]
    assert got == [("a", ["jpg", "txt"]), ("dir/b", ["jpg", "txt"])]
    with tarfile.open(p) as tf:
        m = tf.getmember("dir/b.jpg")
    for k, mm in shards.iter_samples(p, lambda *a: None):
        if k == "dir/b":
            assert (mm["jpg"].offset, mm["jpg"].size) == (m.offset_data, m.size)


def test_train_on_shards_two_gloo_ranks_equal_one_process(tmp_path, mixed):
    """`otterfast train` (configs/train/demo-pretrain.yaml, validation held out) on the shard index: 2 gloo ranks at
    grad_accum 1 take the batches one process takes at grad_accum 2 (rank r: batches r, r + 2, ...), so their
    losses agree; the loss falls and the validation loss is logged."""
    from test_train_runs import metrics, train

    # rows as small as the longest sample: an epoch holds more than the 8 batches compared, so no epoch boundary
    # (where 2 ranks drop the batch that does not fill a round) falls inside them
    cap = int(PreparedIndex(mixed).num_tokens().max())
    sets = ["max_steps=4", "eval_every=2", "export=false", "data.tokenizer=null", f"data.loader.capacity={cap}"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(one, mixed, *sets, "grad_accum=2", config="configs/train/demo-pretrain.yaml")
    train(two, mixed, *sets, config="configs/train/demo-pretrain.yaml", nproc=2)
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in a if "val_loss" in r] == [2, 4]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert ("val_loss" in x) == ("val_loss" in y)
    assert a[-1]["loss"] < a[0]["loss"]


def test_bench_loader_on_shards(tmp_path):
    """`otterfast bench loader --shards` at a tiny size: pairs and documents, Otter's webdataset pipeline and the
    native loader at equal cores, and the native loader on the shard index's pixel cache."""
    import subprocess
    import sys

    out = tmp_path / "loader.json"
    cmd = [sys.executable, "-m", "otterfast.cli", "bench", "loader", "--shards", "24,10", "--samples", "8",
           "--rounds", "1", "--cores", "1", "--batch-size", "4", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [d["label"] for d in r["datasets"]] == ["LAION pairs (24)", "MMC4 documents (10)"]
    for d in r["datasets"]:
        prepared, cached = d["cases"]
        assert (prepared["label"], cached["label"]) == ("as prepared", "with data cache-pixels")
        res = {x["backend"]: x for x in prepared["results"]}
        assert res["otter_wds"]["workers"] == 1 and res["native"]["threads"] == 1 and res["native"]["pixel_cache"] == 0
        (c,) = cached["results"]
        assert c["backend"] == "native" and c["pixel_cache"] == 1 and d["cache_pixels"]["mib"] > 0
        for x in [*res.values(), c]:
            assert x["samples_per_s"] > 0 and x["mp_per_s"] > 0 and x["samples_measured"] >= 8


def test_shards_next_to_mimicit_groups(tmp_path, demo_dir, demo_tok_dir):
    """One YAML with MIMIC-IT groups and shard groups: one index, both kinds of samples, one native batch of both,
    equal to the reference's; the shards are fingerprinted with the image tables."""
    with open(os.path.join(demo_dir, "data.yaml")) as f:
        doc = yaml.safe_load(f)
    doc = {"IMAGE_TEXT": {"DEMO_IMG": {**doc["IMAGE_TEXT"]["DEMO_IMG"],
                                       "mimicit_path": os.path.join(demo_dir, "DEMO_IMG_instructions.json"),
                                       "images_path": os.path.join(demo_dir, "DEMO_IMG.parquet")}}}
    write_tar(str(tmp_path / "p.tar"), pair_members("a", "A cat.", BIG[0]) + pair_members("b", "A dog.", BIG[1]))
    doc["LAION"] = {"pairs": {"shards": "p.tar"}}
    ix, meta = prep(str(tmp_path), demo_tok_dir, doc)
    groups = [ix.sample(i).group for i in range(len(ix))]
    assert groups.count("LAION") == 2 and groups.count("IMAGE_TEXT") > 10
    assert str(tmp_path / "p.tar") in [e["path"] for e in meta["inputs"]["images"]]
    rows = [[groups.index("LAION"), groups.index("IMAGE_TEXT")]]
    a = NativeLoader(ix, pack=True, capacity=2048).collate_rows(rows)
    b = ReferenceLoader(ix, pack=True, capacity=2048).collate_rows(rows)
    assert a["group"] == ["LAION", "IMAGE_TEXT"] and np.array_equal(a["labels"], b["labels"])
    assert a["pixel_values"].shape == b["pixel_values"].shape == (2, 3, 224, 224)


def test_token_loss_weights_follow_segments():
    batch = {"segment_ids": np.array([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [-1, -1, -1, -1, -1, -1]]),
             "sample_index": np.array([4, 0, 2])}
    w = np.array([10.0, 11.0, 12.0, 13.0, 14.0], np.float32)
    assert shards.token_loss_weights(batch, w).tolist() == [[14, 14, 10, 10, 10, 0], [12] * 6, [0] * 6]


def test_loss_weight_defaults_and_weighted_batch_loss(mixed):
    """LAION's tokens count 0.2 by default (Otter's multiplier): the weighted loss of a batch equals the unweighted
    sums of each source's tokens (computed by masking the other source's labels) combined with 1.0 and 0.2."""
    import torch

    from otterfast.data.loader import as_torch
    from otterfast.models.build import batch_loss, build_model, load_model_config

    ix = PreparedIndex(mixed)
    assert {d["group"]: d["loss_weight"] for d in ix.meta["datasets"]} == {"MMC4": 1.0, "LAION": 0.2}
    sw = shards.sample_loss_weights(ix)
    torch.manual_seed(0)
    model = build_model(load_model_config(os.path.join(os.path.dirname(__file__), "..", "configs", "models",
                                                       "otter-tiny.yaml")), ix.tok).eval()
    b = next(b for b in NativeLoader(ix, batch_size=2, pack=True, capacity=512, seed=0)
             if set(b["group"]) == {"MMC4", "LAION"})
    w = shards.token_loss_weights(b, sw)
    assert set(np.unique(w).tolist()) == {0.0, np.float32(0.2), 1.0}

    def loss_of(batch, keep=None):
        batch = dict(batch)
        if keep is not None:  # labels of the other source's tokens set to -100
            batch["labels"] = np.where(np.isclose(w, keep), batch["labels"], -100)
        with torch.no_grad():
            return batch_loss(model, as_torch(batch))

    (weighted, n), (plain, n2) = loss_of({**b, "loss_weight": w}), loss_of(b)
    (docs, _), (pairs, _) = loss_of(b, keep=1.0), loss_of(b, keep=np.float32(0.2))
    assert n == n2 and float(plain) == pytest.approx(float(docs) + float(pairs), rel=1e-5)
    assert float(weighted) == pytest.approx(float(docs) + 0.2 * float(pairs), rel=1e-5)


def test_escaped_base64_in_mmc4_json_reads_back(tmp_path, demo_tok_dir):
    """A JSON writer that escapes '/' as '\\/' (PHP, some Java): the located range holds the escapes; both loaders
    undo them and decode the image written."""
    from otterfast.data.demo import DemoBuilder, _shard_image

    b = DemoBuilder(str(tmp_path), seed=3)
    photos = [_shard_image(b.crop().image, b.rng) for _ in range(2)]
    texts = [base64.b64encode(p).decode() for p in photos]
    assert all("/" in t for t in texts)
    doc = {"text_list": ["One.", "Two."],
           "image_info": [{"image_base64": t, "matched_text_index": i, "matched_sim": 0.5} for i, t in enumerate(texts)]}
    raw = json.dumps(doc).replace("/", "\\/").encode()
    write_tar(str(tmp_path / "d.tar"), [("k.json", raw)])
    ix, _ = prep(str(tmp_path), demo_tok_dir, {"MMC4": {"d": {"shards": "d.tar"}}})
    (s,) = [ix.sample(i) for i in range(len(ix))]
    ref = ReferenceLoader(ix)
    for m, want in zip(s.media_images, photos):
        assert base64.b64decode(ref.blobs.read(*ix.image_ref(m[0]))) == want
    a = NativeLoader(ix, pack=False).collate_rows([[0]])
    r = ref.collate_rows([[0]])
    assert a["pixel_values"].shape == r["pixel_values"].shape == (2, 3, 224, 224)
    assert float(np.abs(a["pixel_values"] - r["pixel_values"]).max()) <= OTTER_MAX_ABS
