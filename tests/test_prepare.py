"""`data prepare` / `data validate` end to end: layouts, truncation, every defect, the tokenizer rules."""

import json
import os
import struct
import zlib

import pyarrow as pa
import pytest

from otterfast.data.defects import DataError
from otterfast.data.index import PreparedIndex
from otterfast.data.prepare import PrepareOptions, prepare, validate
from otterfast.data.tokenizer import labels_from_spans, load_tokenizer
from conftest import encode_image


def test_demo_index_contents(demo_index):
    idx = PreparedIndex(demo_index)
    meta = idx.meta
    assert meta["report"]["defects"] == {}
    groups = {idx.sample(i).group for i in range(len(idx))}
    assert groups == {"IMAGE_TEXT", "TEXT_ONLY", "IMAGE_TEXT_IN_CONTEXT", "VIDEO_TEXT"}
    tok = idx.tokenizer()
    for i in range(len(idx)):
        s = idx.sample(i)
        assert s.num_tokens == len(s.input_ids) <= idx.max_seq_len
        assert s.input_ids[-1] == idx.tok["eos_id"]
        # one <image> token per media, at the recorded positions
        media_positions = [p for p, t in enumerate(s.input_ids) if t == idx.tok["media_id"]]
        assert media_positions == s.media_pos
        assert len(s.media_pos) == len(s.media_images)
        assert tok.decode(s.input_ids[1:-1]) == s.text


def test_in_context_each_example_has_its_own_image(demo_dir, demo_index):
    idx = PreparedIndex(demo_index)
    train = json.load(open(os.path.join(demo_dir, "DEMO_ICL_train.json")))
    data = json.load(open(os.path.join(demo_dir, "DEMO_ICL_instructions.json")))["data"]
    checked = 0
    for i in range(len(idx)):
        s = idx.sample(i)
        if s.group != "IMAGE_TEXT_IN_CONTEXT":
            continue
        assert s.source_ids == train[s.sample_id] + [s.sample_id]
        got = [[idx.image(r)["image_id"] for r in m] for m in s.media_images]
        assert got == [data[x]["image_ids"] for x in s.source_ids]  # one media per <image>, its own image
        assert s.text.count("<image>") == 3
        checked += 1
    assert checked > 0


def test_video_frames_resampled(demo_index):
    idx = PreparedIndex(demo_index)
    vids = [idx.sample(i) for i in range(len(idx)) if idx.sample(i).group == "VIDEO_TEXT"]
    assert vids and all(len(s.media_images) == 1 and len(s.media_images[0]) == 4 for s in vids)


def test_fuyu_lengths_include_image_tokens(demo_index_fuyu):
    from otterfast.data.images import fuyu_num_tokens

    idx = PreparedIndex(demo_index_fuyu)
    for i in range(len(idx)):
        s = idx.sample(i)
        n_img = sum(fuyu_num_tokens(idx.image(r)["height"], idx.image(r)["width"]) for m in s.media_images for r in m)
        assert s.num_image_tokens == n_img and s.num_tokens == len(s.input_ids) + n_img
        assert "<image>" not in s.text


# ---- truncation ---------------------------------------------------------------------------------

def _icl_dataset(mini, n_ctx=3, answer="yes " * 5):
    imgs = {f"I{i}": encode_image(8, 8, seed=i) for i in range(n_ctx + 1)}
    data = {f"Q{i}": {"instruction": f"question {i}", "answer": answer, "image_ids": [f"I{i}"], "rel_ins_ids": []}
            for i in range(n_ctx + 1)}
    mini.dataset("IMAGE_TEXT_IN_CONTEXT", "ICL", mimicit_path=mini.instructions("icl", data),
                 images_path=mini.parquet_b64("icl", imgs), train_config_path="train.json")
    with open(os.path.join(mini.root, "train.json"), "w") as f:
        json.dump({f"Q{n_ctx}": [f"Q{i}" for i in range(n_ctx)]}, f)
    return mini.yaml()


def test_truncation_drops_context_first_then_sample(mini, demo_tok_dir, tmp_path):
    y = _icl_dataset(mini)
    full = prepare(y, demo_tok_dir, str(tmp_path / "a"), PrepareOptions(max_seq_len=4096))
    n_full = full["counts"]["tokens"]
    idx = PreparedIndex(str(tmp_path / "a"))
    per_turn = n_full // 4
    meta = prepare(y, demo_tok_dir, str(tmp_path / "b"), PrepareOptions(max_seq_len=n_full - 1))
    assert meta["counts"]["samples"] == 1 and meta["report"]["truncation"] == {"context_dropped": 1}
    s = PreparedIndex(str(tmp_path / "b")).sample(0)
    assert s.source_ids == ["Q1", "Q2", "Q3"] and len(s.media_images) == 3  # the oldest example went first
    assert s.text.endswith("<|endofchunk|>")  # never cut mid-answer
    meta = prepare(y, demo_tok_dir, str(tmp_path / "c"), PrepareOptions(max_seq_len=per_turn // 2))
    assert meta["counts"]["samples"] == 0 and meta["report"]["truncation"] == {"sample_too_long": 1}
    assert idx.sample(0).context_dropped == 0


# ---- defects --------------------------------------------------------------------------------------

def _png_bomb(w=20000, h=20000) -> bytes:
    """A PNG whose header declares w x h pixels (the body is irrelevant: only the header is read)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)  # a real bomb would inflate to w*h*3 bytes; the header is what counts
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _defect_dataset(mini):
    good = encode_image(10, 10, "JPEG")
    imgs = {"OK": good, "BOMB": _png_bomb(), "TEXT": b"hello, not an image", "TRUNC": good[:20]}
    import base64

    import pandas as pd

    rows = {k: base64.b64encode(v).decode() for k, v in imgs.items()}
    rows["BADB64"] = "@@@not base64@@@"
    pd.DataFrame({"base64": list(rows.values())}, index=list(rows)).to_parquet(os.path.join(mini.root, "img.parquet"))
    data = {
        "ok": {"instruction": "q", "answer": "a", "image_ids": ["OK"], "rel_ins_ids": []},
        "noins": {"answer": "a", "image_ids": ["OK"]},
        "noans": {"instruction": "q", "image_ids": ["OK"]},
        "noimg": {"instruction": "q", "answer": "a", "image_ids": ["NOPE"]},
        "empty": {"instruction": "q", "answer": "a", "image_ids": []},
        "bomb": {"instruction": "q", "answer": "a", "image_ids": ["BOMB"]},
        "text": {"instruction": "q", "answer": "a", "image_ids": ["TEXT"]},
        "trunc": {"instruction": "q", "answer": "a", "image_ids": ["TRUNC"]},
        "b64": {"instruction": "q", "answer": "a", "image_ids": ["BADB64"]},
        "rel": {"instruction": "q", "answer": "a", "image_ids": ["OK"], "rel_ins_ids": ["ghost"]},
        "dup": {"instruction": "q", "answer": "a", "image_ids": ["OK"]},
    }
    mini.dataset("IMAGE_TEXT", "A", mimicit_path=mini.instructions("a", data), images_path="img.parquet")
    mini.dataset("IMAGE_TEXT", "B", mimicit_path=mini.instructions("b", {"dup": data["dup"]}),
                 images_path="img.parquet")
    return mini.yaml()


EXPECTED = {"missing_instruction": 1, "missing_answer": 1, "missing_image_id": 1, "no_images": 1,
            "image_too_large": 1, "not_an_image": 1, "bad_header": 1, "bad_base64": 1,
            "missing_rel_ins_id": 1, "duplicate_instruction_id": 1}


def test_every_defect_raises_with_file_and_id(mini):
    y = _defect_dataset(mini)
    with pytest.raises(DataError) as e:
        validate(y, PrepareOptions(populate_rel_ins=True))
    msg = str(e.value)
    for kind in EXPECTED:
        assert kind in msg
    assert "img.parquet: id 'BOMB'" in msg and "a_instructions.json: id 'noins'" in msg
    assert "b_instructions.json: id 'dup'" in msg


def test_every_defect_skipped_and_counted(mini, demo_tok_dir, tmp_path):
    y = _defect_dataset(mini)
    v = validate(y, PrepareOptions(populate_rel_ins=True, on_error="skip"))
    assert dict(v.report.counts) == EXPECTED
    meta = prepare(y, demo_tok_dir, str(tmp_path / "idx"), PrepareOptions(populate_rel_ins=True, on_error="skip"))
    idx = PreparedIndex(str(tmp_path / "idx"))
    # "ok" survives; "rel" survives without its missing context id; the rest are out
    assert sorted(idx.sample(i).sample_id for i in range(len(idx))) == ["ok", "rel"]
    assert meta["report"]["defects"] == EXPECTED


def test_duplicate_image_ids_across_tables(mini):
    a = mini.parquet_b64("x", {"I": encode_image(4, 4)})
    b = mini.parquet_b64("y", {"I": encode_image(4, 4, seed=1)})
    rec = {"r": {"instruction": "q", "answer": "a", "image_ids": ["I"]}}
    mini.dataset("IMAGE_TEXT", "A", mimicit_path=mini.instructions("a", rec), images_path=a)
    mini.dataset("IMAGE_TEXT", "B", mimicit_path=mini.instructions("b", {"s": rec["r"]}), images_path=b)
    with pytest.raises(DataError, match="duplicate_image_id"):
        validate(mini.yaml(), PrepareOptions())


def test_same_file_in_two_groups_is_fine(mini, demo_tok_dir, tmp_path):
    ins = mini.instructions("a", {"r": {"instruction": "q", "answer": "a", "image_ids": ["I"]}})
    img = mini.parquet_b64("x", {"I": encode_image(4, 4)})
    mini.dataset("IMAGE_TEXT", "A", mimicit_path=ins, images_path=img)
    mini.dataset("IMAGE_TEXT_IN_CONTEXT", "A", mimicit_path=ins, images_path=img)
    meta = prepare(mini.yaml(), demo_tok_dir, str(tmp_path / "i"), PrepareOptions())
    assert meta["counts"]["samples"] == 2 and meta["counts"]["images"] == 1


def test_multi_image_record_is_one_media_with_frames(mini, demo_tok_dir, tmp_path):
    img = mini.parquet_b64("x", {"I1": encode_image(4, 4), "I2": encode_image(6, 4, seed=1)})
    mini.dataset("IMAGE_TEXT", "A", images_path=img, mimicit_path=mini.instructions(
        "a", {"r": {"instruction": "same?", "answer": "no", "image_ids": ["I1", "I2"]}}))
    prepare(mini.yaml(), demo_tok_dir, str(tmp_path / "i"), PrepareOptions())
    s = PreparedIndex(str(tmp_path / "i")).sample(0)
    assert s.media_images == [[0, 1]] and s.text.count("<image>") == 1


# ---- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_gets_missing_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["some text here"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(tmp_path)
    tok, info = load_tokenizer(str(tmp_path), "simple")
    assert set(info.added_tokens) == {"<|endofchunk|>", "<image>", "<answer>", "<PAD>"}
    assert info.bos_id is None and info.pad_id != info.eos_id
    assert tok.encode("<image>", add_special_tokens=False) == [info.media_id]
    _, finfo = load_tokenizer(str(tmp_path), "fuyu")
    assert finfo.fuyu_placeholder_id is not None and finfo.fuyu_newline_id is not None


def test_tokenizer_saved_beside_index(demo_index):
    idx = PreparedIndex(demo_index)
    tok = idx.tokenizer()
    assert tok.convert_tokens_to_ids("<image>") == idx.tok["media_id"]


def test_index_is_arrow_ipc_memory_mappable(demo_index):
    with pa.memory_map(os.path.join(demo_index, "samples.arrow")) as m:
        t = pa.ipc.open_file(m).read_all()
    assert "input_ids" in t.column_names and "label_spans" in t.column_names
