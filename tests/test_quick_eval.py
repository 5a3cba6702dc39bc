"""The quick eval during training (train config `eval_run`, train/quick_eval.py): an `otterfast eval run` YAML run on
the model at each checkpoint, its scores in the step's metrics line, its files under OUTPUT_DIR/evals/step_N."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from otterfast.config import ConfigError
from otterfast.eval.synth import image_struct, png, write_parquet
from otterfast.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs/train/demo-otter.yaml")


def eval_yaml(tmp_path, **extra) -> str:
    """POPE (generative, 3 rows) and SEED-Bench (likelihood, 2 rows) on tiny synthetic images."""
    img = image_struct(png((120, 80, 40), size=(40, 30)))
    data = tmp_path / "bench"
    doc = {"output": "ignored", "models": [{"name": "ignored", "kind": "replay", "predictions": "ignored"}],
           "datasets": [
               {"task": "pope", "data": write_parquet(str(data / "pope.parquet"), {
                   "question": ["Is there a dog in the image?"] * 3, "answer": ["yes", "no", "yes"],
                   "image": [img] * 3})},
               {"task": "seedbench", "name": "seed", "data": write_parquet(str(data / "seed.parquet"), {
                   "question": ["What is it?"] * 2, "choice_a": ["cat"] * 2, "choice_b": ["dog"] * 2,
                   "choice_c": ["bird"] * 2, "choice_d": ["fish"] * 2, "answer": ["A", "B"], "image": [img] * 2})}],
           **extra}
    path = tmp_path / "quick-eval.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("sets, message", [
    (["eval_run.decode={max_new_tokens: 4}"], "set eval_run.config"),
    (["eval_run.config=x.yaml", "eval_run.limit=0"], "eval_run.limit must be >= 1"),
    (["eval_run.config=x.yaml", "eval_run.decode={beams: 2}"], "eval_run.decode: unknown key(s) ['beams']"),
])
def test_config_errors(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, sets)
    assert message in str(e.value)


def test_eval_yaml_is_checked_when_the_run_starts(tmp_path):
    from otterfast.train.quick_eval import QuickEval

    section = load_config(DEMO, [f"eval_run.config={tmp_path / 'missing.yaml'}"]).eval_run
    with pytest.raises(ValueError, match="eval_run.config: cannot read .*missing.yaml"):
        QuickEval(section, "otter", str(tmp_path / "run"), "cpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"task": "no-such-task", "data": "x.parquet"}]}))
    section.config = str(bad)
    with pytest.raises(ValueError, match="no-such-task"):
        QuickEval(section, "otter", str(tmp_path / "run"), "cpu")
    gone = tmp_path / "gone.yaml"
    gone.write_text(yaml.safe_dump({"datasets": [{"task": "pope", "data": "nowhere/pope.parquet"}]}))
    section.config = str(gone)
    with pytest.raises(ValueError, match="dataset file nowhere/pope.parquet does not exist"):
        QuickEval(section, "otter", str(tmp_path / "run"), "cpu")
    # the YAML's own models and output are replaced by the run's: a YAML without them is fine
    section.config = eval_yaml(tmp_path)
    q = QuickEval(section, "otter", str(tmp_path / "run"), "cpu")
    cfg = q._config("step_3")
    assert [m["name"] for m in cfg["models"]] == ["step_3"] and cfg["models"][0]["kind"] == "otter"
    assert cfg["output"] == os.path.join(str(tmp_path / "run"), "evals", "step_3") and cfg["limit"] == 50


def _train(tmp_path, demo_index, name: str, *sets: str) -> tuple[list[dict], str]:
    out = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "otterfast.cli", "train", DEMO, "--set", "data.yaml=null",
           "--set", f"data.index={demo_index}", "--set", f"output_dir={out}", "--set", "max_steps=3",
           "--set", "save_every=2", "--set", "data.loader.capacity=512", "--set", "logging.progress=false",
           "--set", "export=false", *[x for s in sets for x in ("--set", s)]]
    p = subprocess.run(cmd, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], p.stdout


def test_quick_eval_at_each_checkpoint_leaves_training_unchanged(tmp_path, demo_index):
    """save_every 2, 3 steps: evals at steps 2 (a checkpoint) and 3 (the last); the scores are in those steps' lines
    and each step folder holds the runner's files, without the export; the losses equal a run without evals."""
    cfg = eval_yaml(tmp_path)
    with_eval, stdout = _train(tmp_path, demo_index, "with", f"eval_run.config={cfg}", "eval_run.limit=2",
                               "eval_run.decode={max_new_tokens: 4, num_beams: 1}")
    plain, _ = _train(tmp_path, demo_index, "plain")
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in plain]  # the eval's RNG use is put back
    evald = {r["step"]: r for r in with_eval if "eval_s" in r}
    assert sorted(evald) == [2, 3]
    for step, r in evald.items():
        assert 0.0 <= r["eval_pope_accuracy"] <= 1.0 and 0.0 <= r["eval_seed_accuracy"] <= 1.0
        folder = tmp_path / "with" / "evals" / f"step_{step}"
        results = json.loads((folder / "results.json").read_text())
        assert [(x["dataset"], x["n"], x["limit"]) for x in results] == [("pope", 2, 2), ("seed", 2, 2)]
        assert results[0]["decode"]["max_new_tokens"] == 4
        assert not (folder / "export").exists()
    assert "quick eval:" in stdout and "| eval pope_" in stdout
    assert 1 not in evald and not any("eval_s" in r for r in plain)


def test_eval_puts_the_rng_back_and_flattens_numeric_scores(tmp_path, monkeypatch):
    """Loading the evaluated model draws from the RNGs (its random init before the weights load): the run's RNG
    states are put back, so a run with dropout trains the same with or without the evals."""
    import numpy as np
    import torch

    import otterfast.eval.runner as runner
    import otterfast.train.export as export_mod
    from otterfast.train.quick_eval import QuickEval

    section = load_config(DEMO, [f"eval_run.config={eval_yaml(tmp_path)}"]).eval_run
    q = QuickEval(section, "otter", str(tmp_path / "run"), "cpu")
    exported = []

    def fake_export(engine, model, folder, index_dir, rank, meta=None):
        os.makedirs(os.path.join(folder, "export"))
        exported.append(folder)

    def fake_run_config(rc, progress=True):
        torch.rand(100)
        np.random.rand(100)
        return [{"dataset": "pope", "metrics": {"accuracy": 0.5, "f1": float("nan"), "yes_ratio": 1, "note": "x"}}]

    monkeypatch.setattr(export_mod, "export", fake_export)
    monkeypatch.setattr(runner, "run_config", fake_run_config)
    torch.manual_seed(3)
    np.random.seed(3)
    out = q.run(None, None, 7, "idx", 0, {})
    assert exported == [os.path.join(str(tmp_path / "run"), "evals", "step_7")]
    assert not os.path.exists(os.path.join(exported[0], "export"))  # removed (keep_export false)
    assert {k: v for k, v in out.items() if k != "eval_s"} == {"eval_pope_accuracy": 0.5, "eval_pope_yes_ratio": 1.0}
    after_torch, after_np = torch.rand(1).item(), np.random.rand()
    torch.manual_seed(3)
    np.random.seed(3)
    assert (after_torch, after_np) == (torch.rand(1).item(), np.random.rand())
