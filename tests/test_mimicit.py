"""Dataset YAML, instruction JSON, resampling."""

import json
import random

import pytest

from otterfast.data.defects import DataError
from otterfast.data.mimicit import load_data_yaml, load_instructions, resample_frames, resample_keys


def _write(p, text):
    p.write_text(text)
    return str(p)


def test_yaml_paths_resolve_against_yaml_folder(tmp_path):
    sub = tmp_path / "d"
    sub.mkdir()
    (sub / "a.json").write_text(json.dumps({"meta": {}, "data": {}}))
    (sub / "a.parquet").write_bytes(b"")
    y = _write(sub / "data.yaml", "IMAGE_TEXT:\n  A:\n    mimicit_path: a.json\n    images_path: a.parquet\n"
               "    num_samples: 5\n    task_description: just one string\n")
    (spec,) = load_data_yaml(y)
    assert spec.mimicit_path == str(sub / "a.json") and spec.images_path == str(sub / "a.parquet")
    assert spec.num_samples == 5
    assert spec.task_descriptions == ["just one string"]  # not a list of characters (Otter's bug)


@pytest.mark.parametrize("body, msg", [
    ("NOT_A_GROUP:\n  A:\n    mimicit_path: a.json\n", "unknown group 'NOT_A_GROUP'"),
    ("TEXT_ONLY:\n  A:\n    mimicit_path: missing.json\n", "does not exist"),
    ("TEXT_ONLY:\n  A:\n    mimicit_path: a.json\n    num_samples: many\n", "num_samples"),
    ("TEXT_ONLY:\n  A:\n    mimicit_path: a.json\n    typo_key: 1\n", "unknown key"),
    ("IMAGE_TEXT:\n  A:\n    mimicit_path: a.json\n", "images_path"),
    ("TEXT_ONLY: [\n", "malformed YAML"),
])
def test_yaml_errors_name_the_file(tmp_path, body, msg):
    (tmp_path / "a.json").write_text(json.dumps({"meta": {}, "data": {}}))
    y = _write(tmp_path / "data.yaml", body)
    with pytest.raises(DataError, match=msg) as e:
        load_data_yaml(y)
    assert "data.yaml" in str(e.value)


def test_instructions_malformed_json(tmp_path):
    p = _write(tmp_path / "x.json", '{"data": {"a": ')
    with pytest.raises(DataError, match="malformed JSON"):
        load_instructions(p)


def test_instructions_fields(tmp_path):
    p = _write(tmp_path / "x.json", json.dumps({"meta": {}, "data": {
        "a": {"instruction": "q", "answer": "r", "image_ids": None, "rel_ins_ids": ["b"]},
        "b": {"instruction": "", "answer": "r"}}}))
    recs = load_instructions(p)
    assert recs["a"].image_ids == [] and recs["a"].rel_ins_ids == ["b"]
    assert recs["b"].instruction is None  # empty counts as missing


def test_resample_rule():
    keys = list("abcde")
    rng = random.Random(0)
    assert resample_keys(keys, -1, rng) == keys
    assert resample_keys(keys, 0, rng) == keys
    more = resample_keys(keys, 12, rng)
    assert len(more) == 12 and more[:10] == keys * 2 and set(more[10:]) <= set(keys)
    fewer = resample_keys(keys, 3, rng)
    assert len(fewer) == 3 and len(set(fewer)) == 3


def test_resample_frames_linspace():
    ids = [f"f{i}" for i in range(10)]
    assert resample_frames(ids, 4) == ["f0", "f3", "f6", "f9"]
    assert resample_frames(ids[:2], 4) == ["f0", "f0", "f0", "f1"]  # np.linspace(0, 1, 4, dtype=int)
