"""`eval run` end to end on tiny Otter and OtterHD checkpoints exported to folders (random weights, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from otterfast.eval.runner import run_config  # noqa: E402
from otterfast.eval.synth import image_struct, png, write_parquet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(__file__))
pytestmark = pytest.mark.slow


def _export(index_dir: str, model_yaml: str, out: str, fmt: str) -> str:
    from otterfast.data.index import PreparedIndex
    from otterfast.models.build import build_model, load_model_config

    idx = PreparedIndex(index_dir)
    torch.manual_seed(0)
    model = build_model(load_model_config(os.path.join(ROOT, "configs/models", model_yaml)), idx.tok)
    model.save_pretrained(out)
    shutil.copytree(os.path.join(index_dir, "tokenizer"), os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "otterfast.json"), "w") as f:
        json.dump({"format": fmt}, f)
    return out


def _bench(d) -> list[dict]:
    img = image_struct(png((120, 80, 40), size=(40, 30)))
    return [
        {"task": "mme", "data": write_parquet(str(d / "mme.parquet"), {
            "question_id": ["a", "a"], "question": ["Is there a dog?", "Is there a cat?"], "answer": ["Yes", "No"],
            "category": ["existence"] * 2, "image": [img] * 2})},
        {"task": "pope", "data": write_parquet(str(d / "pope.parquet"), {
            "question": ["Is there a dog in the image?"] * 2, "answer": ["yes", "no"], "image": [img] * 2})},
        {"task": "scienceqa", "data": write_parquet(str(d / "sqa.parquet"), {
            "image": [img, None], "question": ["Which barks?", "Which swims?"], "choices": [["cat", "dog"],
                                                                                          ["a", "b", "c"]],
            "answer": [1, 2], "hint": ["pets", ""]})},
        {"task": "seedbench", "name": "seed", "data": write_parquet(str(d / "seed.parquet"), {
            "question": ["What is it?"] * 2, "choice_a": ["cat"] * 2, "choice_b": ["dog"] * 2,
            "choice_c": ["bird"] * 2, "choice_d": ["fish"] * 2, "answer": ["A", "B"], "image": [img] * 2})},
    ]


@pytest.mark.parametrize("kind,index_fixture,yaml_name,fmt", [
    ("otter", "demo_index", "otter-tiny.yaml", "simple"),
    ("otterhd", "demo_index_fuyu", "otterhd-tiny.yaml", "fuyu"),
])
def test_eval_run_on_tiny_checkpoint(kind, index_fixture, yaml_name, fmt, request, tmp_path):
    ckpt = _export(request.getfixturevalue(index_fixture), yaml_name, str(tmp_path / "ckpt"), fmt)
    cfg = {"output": str(tmp_path / "runs"),
           "models": [{"name": kind, "kind": kind, "path": ckpt, "decode": {"max_new_tokens": 4, "num_beams": 1}}],
           "datasets": _bench(tmp_path)}
    results = run_config(cfg, progress=False)
    assert [(r["task"], r["n"]) for r in results] == [("mme", 2), ("pope", 2), ("scienceqa", 2), ("seedbench", 2)]
    for r in results:
        m = r["metrics"]
        assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy",) if k in m)
    mme = results[0]["metrics"]
    assert 0 <= mme["perception"] <= 200 and set(mme["by_category"]) == {"existence"}
    preds = [json.loads(x) for x in open(tmp_path / "runs" / kind / "seed" / "predictions.jsonl")]
    for p in preds:
        assert len(p["logliks"]) == 4 and all(math.isfinite(v) and v < 0 for v in p["logliks"])
        assert p["reply"] == "ABCD"[max(range(4), key=lambda i: p["logliks"][i])]
    gen = [json.loads(x) for x in open(tmp_path / "runs" / kind / "pope" / "predictions.jsonl")]
    if kind == "otter":  # the checkpoint's own training template (simple), one <image> per image
        assert gen[0]["prompt"] == "<image>User:Is there a dog in the image? GPT:<answer>"
    else:
        assert gen[0]["prompt"] == "User:Is there a dog in the image? Assistant:\x04"
    assert gen[0]["decode"]["max_new_tokens"] == 4 and isinstance(gen[0]["reply"], str)
