"""A prepared index records what it was made from (issue 14 item 7): a re-exported image table, an edited YAML,
instruction file or tokenizer is refused with a message naming the file, never silently reused."""

from __future__ import annotations

import json
import os
import shutil
import time
from types import SimpleNamespace

import pytest

from conftest import encode_image
from otterfast.data import fingerprint
from otterfast.data.defects import DataError
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.prepare import PrepareOptions, prepare
from otterfast.data.reference import ReferenceLoader

IMAGES = {"A": encode_image(40, 30, "PNG", seed=1), "B": encode_image(40, 30, "PNG", seed=2)}


def _dataset(mini, tok_src):
    img = mini.parquet_b64("img", IMAGES)
    mini.dataset("IMAGE_TEXT", "D", images_path=img, mimicit_path=mini.instructions("d", {
        "a": {"instruction": "what is it", "answer": "image a", "image_ids": ["A"]},
        "b": {"instruction": "what is it", "answer": "image b", "image_ids": ["B"]}}))
    tok = os.path.join(mini.root, "tokenizer")
    shutil.copytree(tok_src, tok)
    return mini.yaml(), tok


def _reexport(mini, images):
    """The same table name written again (as a re-export does), a moment later."""
    time.sleep(0.02)  # file mtimes tick at the kernel's clock (a few ms)
    return mini.parquet_b64("img", images)


def test_prepare_records_every_input(mini, demo_tok_dir, tmp_path):
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    meta = prepare(yaml_path, tok, str(tmp_path / "idx"), PrepareOptions())
    inputs = meta["inputs"]
    root = mini.root
    assert inputs["yaml"] == {"path": yaml_path, "sha256": fingerprint.sha256_file(yaml_path)}
    assert [e["path"] for e in inputs["instructions"]] == [os.path.join(root, "d_instructions.json")]
    assert {os.path.relpath(e["path"], tok) for e in inputs["tokenizer"]} == set(os.listdir(tok))
    st = os.stat(os.path.join(root, "img.parquet"))
    assert inputs["images"] == [{"path": os.path.join(root, "img.parquet"), "size": st.st_size,
                                 "mtime_ns": st.st_mtime_ns}]
    assert json.load(open(tmp_path / "idx" / "meta.json"))["index_version"] == 2


@pytest.mark.parametrize("loader", [NativeLoader, ReferenceLoader])
def test_reexported_table_is_refused_by_the_loaders(mini, demo_tok_dir, tmp_path, loader):
    """Same ids, rows in another order: the index's positions now point at the other image. Before the
    fingerprint both loaders silently returned B's pixels for sample a."""
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    idx = str(tmp_path / "idx")
    prepare(yaml_path, tok, idx, PrepareOptions())
    first = loader(idx, batch_size=2, pack=False)
    batch = next(iter(first))
    assert batch["skipped"] == 0
    _reexport(mini, {"B": IMAGES["B"], "A": IMAGES["A"]})
    table = os.path.join(mini.root, "img.parquet")
    with pytest.raises(DataError, match=rf"{table}: image table rewritten \(mtime .*\) since the index {idx} was "
                                        r"prepared.*re-run `otterfast data prepare`"):
        loader(idx, batch_size=2, pack=False)
    with pytest.raises(DataError, match="image table rewritten"):  # a loader built before: refused at its next epoch
        next(iter(first))
    os.remove(table)
    with pytest.raises(DataError, match=rf"{table}: image table is gone"):
        loader(idx, batch_size=2, pack=False)


@pytest.mark.parametrize("loader", [NativeLoader, ReferenceLoader])
def test_index_without_fingerprints_is_refused(mini, demo_tok_dir, tmp_path, loader):
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    idx = str(tmp_path / "idx")
    prepare(yaml_path, tok, idx, PrepareOptions())
    meta = json.load(open(os.path.join(idx, "meta.json")))
    del meta["inputs"]
    meta["index_version"] = 1
    json.dump(meta, open(os.path.join(idx, "meta.json"), "w"))
    assert len(PreparedIndex(idx)) == 2  # still opens (inspect, counts) ...
    with pytest.raises(DataError, match=r"prepared without input fingerprints \(index_version 1.*re-run"):
        loader(idx)  # ... but no loader reads images through it


def _train_cfg(yaml_path, tok, out):
    from otterfast.train.config import DataSection

    return SimpleNamespace(output_dir=out, epochs=None, data=DataSection(yaml=yaml_path, tokenizer=tok))


def _edit_yaml(mini, tok):
    with open(os.path.join(mini.root, "data.yaml"), "a") as f:
        f.write("# edited\n")
    return "dataset YAML .*data.yaml: content changed"


def _edit_instructions(mini, tok):
    mini.instructions("d", {"a": {"instruction": "what is it", "answer": "image b", "image_ids": ["A"]},
                            "b": {"instruction": "what is it", "answer": "image a", "image_ids": ["B"]}})
    return "instruction file .*d_instructions.json: content changed"


def _edit_tokenizer(mini, tok):
    path = os.path.join(tok, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg["model_max_length"] = 123
    json.dump(cfg, open(path, "w"))
    return "tokenizer file .*tokenizer_config.json: content changed"


def _edit_images(mini, tok):
    _reexport(mini, {"B": IMAGES["B"], "A": IMAGES["A"]})
    return r"image table .*img.parquet: rewritten \(mtime"


def _add_part(mini, tok):  # a new instruction file named by the YAML
    mini.dataset("TEXT_ONLY", "T", mimicit_path=mini.instructions("t", {"x": {"instruction": "hi", "answer": "yo"}}))
    mini.yaml()
    return "dataset YAML .*content changed.*more"


@pytest.mark.parametrize("edit", [_edit_yaml, _edit_instructions, _edit_tokenizer, _edit_images, _add_part])
def test_train_refuses_an_index_of_other_inputs(mini, demo_tok_dir, tmp_path, monkeypatch, edit):
    import torch.distributed as dist

    from otterfast.train.loop import _index_dir

    monkeypatch.setattr(dist, "barrier", lambda: None)
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    cfg = _train_cfg(yaml_path, tok, str(tmp_path / "run"))
    out = _index_dir(cfg, 0)  # prepared
    mtime = os.stat(os.path.join(out, "meta.json")).st_mtime_ns
    assert _index_dir(cfg, 0) == out  # the same inputs: reused as is
    assert os.stat(os.path.join(out, "meta.json")).st_mtime_ns == mtime
    message = edit(mini, tok)
    with pytest.raises(ValueError, match=rf"{out} was prepared from other inputs: {message}.*delete it"):
        _index_dir(cfg, 0)


def test_train_refuses_an_index_without_fingerprints(mini, demo_tok_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    from otterfast.train.loop import _index_dir

    monkeypatch.setattr(dist, "barrier", lambda: None)
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    cfg = _train_cfg(yaml_path, tok, str(tmp_path / "run"))
    out = _index_dir(cfg, 0)
    meta_path = os.path.join(out, "meta.json")
    meta = json.load(open(meta_path))
    del meta["inputs"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="prepared without input fingerprints.*delete it"):
        _index_dir(cfg, 0)


def test_input_changed_during_prepare_is_an_error(mini, demo_tok_dir, tmp_path, monkeypatch):
    from otterfast.data import prepare as prep

    yaml_path, tok = _dataset(mini, demo_tok_dir)
    real = prep.validate

    def validate_then_edit(*a, **kw):
        v = real(*a, **kw)
        _edit_instructions(mini, tok)  # rewritten while prepare was reading it
        return v

    monkeypatch.setattr(prep, "validate", validate_then_edit)
    with pytest.raises(DataError, match=r"inputs changed while being prepared \(instruction file .*d_instructions"):
        prepare(yaml_path, tok, str(tmp_path / "idx"), PrepareOptions())
    assert not os.path.exists(tmp_path / "idx" / "meta.json")


def test_prepare_killed_while_rewriting_leaves_no_index(mini, demo_tok_dir, tmp_path, monkeypatch):
    """A prepare over an existing index that dies half-way must not leave the old meta.json describing new tables."""
    from otterfast.data import prepare as prep

    yaml_path, tok = _dataset(mini, demo_tok_dir)
    idx = str(tmp_path / "idx")
    prepare(yaml_path, tok, idx, PrepareOptions())
    _edit_instructions(mini, tok)
    real = prep._write_arrow

    def die_at_images(path, table):
        if path.endswith("images.arrow"):
            raise KeyboardInterrupt
        real(path, table)

    monkeypatch.setattr(prep, "_write_arrow", die_at_images)
    with pytest.raises(KeyboardInterrupt):
        prepare(yaml_path, tok, idx, PrepareOptions())
    with pytest.raises(FileNotFoundError, match="not a prepared index"):
        PreparedIndex(idx)


def test_index_fingerprint_follows_the_data(mini, demo_tok_dir, tmp_path):
    yaml_path, tok = _dataset(mini, demo_tok_dir)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare(yaml_path, tok, a, PrepareOptions())
    prepare(yaml_path, tok, b, PrepareOptions())
    assert PreparedIndex(a).fingerprint() == PreparedIndex(b).fingerprint()  # same inputs, same options
    prepare(yaml_path, tok, b, PrepareOptions(max_seq_len=64))
    assert PreparedIndex(a).fingerprint() != PreparedIndex(b).fingerprint()
    _edit_instructions(mini, tok)
    prepare(yaml_path, tok, b, PrepareOptions())
    assert PreparedIndex(a).fingerprint() != PreparedIndex(b).fingerprint()
