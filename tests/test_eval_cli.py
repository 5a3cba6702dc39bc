"""`otterfast eval score` and `otterfast eval run` end to end on small generated files, with fake and replay models."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from otterfast.cli import main
from otterfast.eval.model_api import EvalModel, load_eval_model
from otterfast.eval.progress import Progress
from otterfast.eval.runner import ConfigError, parse_config, run_config
from otterfast.eval.synth import image_struct, png, write_parquet

IMG = image_struct(png())


def _jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.fixture
def bench(tmp_path):
    """MME (2 images, 4 questions), POPE (4), ScienceQA (2, one with 5 choices), SEED-Bench (3)."""
    d = tmp_path / "data"
    files = {
        "mme": write_parquet(str(d / "mme.parquet"), {
            "question_id": ["a.jpg", "a.jpg", "b.jpg", "b.jpg"],
            "question": ["Is there a dog?", "Is there a cat?", "Is there a dog?", "Is there a cat?"],
            "answer": ["Yes", "No", "No", "Yes"], "category": ["existence"] * 4, "image": [IMG] * 4}),
        "pope": write_parquet(str(d / "pope.parquet"), {
            "question": ["Is there a dog in the image?", "Is there a cat in the image?"] * 2,
            "answer": ["yes", "no", "no", "yes"], "image": [IMG] * 4, "category": ["random"] * 4}),
        "scienceqa": write_parquet(str(d / "sqa.parquet"), {
            "image": [IMG, None], "question": ["Which animal barks?", "Which is a whale?"],
            "choices": [["cat", "dog"], ["frog", "trout", "robin", "gecko", "whale"]], "answer": [1, 4],
            "hint": ["Think of pets.", ""]}),
        "seedbench": write_parquet(str(d / "seed.parquet"), {
            "question": ["What animal is it?"] * 3, "choice_a": ["cat"] * 3, "choice_b": ["dog"] * 3,
            "choice_c": ["bird"] * 3, "choice_d": ["fish"] * 3, "answer": ["B", "B", "A"],
            "question_id": ["1", "2", "3"], "image": [[IMG], [IMG, IMG], [IMG]]}),
    }
    return files


class FakeModel:
    """Answers 'yes' to dogs and 'no' to anything else; picks 'dog' options; prefers ' B. dog' by likelihood."""

    name = "fake"
    template = "otter"

    def __init__(self):
        self.calls: list[tuple] = []

    def generate(self, prompt, images, **decode):
        self.calls.append(("generate", prompt, len(images), decode))
        assert prompt.count("<image>") == len(images) and all(im.mode == "RGB" for im in images)
        if "There are several" in prompt or "The answer is" in prompt or "option letter" in prompt:
            return "The answer is B." if "dog" in prompt else "The answer is E."
        return "Yes, there is." if "dog" in prompt else "No."

    def option_logliks(self, prompt, images, options):
        self.calls.append(("loglik", prompt, len(images), options))
        return [-0.5 if "dog" in o else -3.0 for o in options]


def _config(tmp_path, bench, **extra):
    return {"output": str(tmp_path / "runs"), "models": [{"name": "fake", "kind": "external",
                                                        "decode": {"num_beams": 1, "max_new_tokens": 8}}],
            "datasets": [{"task": t, "data": p} for t, p in bench.items()], **extra}


def test_fake_model_satisfies_protocol():
    assert isinstance(FakeModel(), EvalModel)


def test_run_end_to_end_with_fake_model(tmp_path, bench):
    fake = FakeModel()
    results = run_config(_config(tmp_path, bench), models={"fake": fake}, progress=False)
    by = {r["task"]: r for r in results}
    # MME: dog questions -> yes, cat -> no. Image a: yes/no both right; image b: dog "No" gold -> wrong, cat gold
    #   "Yes" -> wrong. acc 2/4, acc_plus 1/2 -> 50 + 50 = 100.
    assert by["mme"]["metrics"]["by_category"] == {"existence": 100.0} and by["mme"]["metrics"]["perception"] == 100.0
    # POPE: preds yes, no, yes, no vs gold yes, no, no, yes -> TP 1, TN 1, FP 1, FN 1
    pm = by["pope"]["metrics"]
    assert (pm["accuracy"], pm["precision"], pm["recall"], pm["f1"], pm["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    # ScienceQA: row 0 "dog" in prompt -> B (right); row 1 -> E (right: a fifth letter)
    assert by["scienceqa"]["metrics"]["accuracy"] == 1.0
    # SEED likelihood: ' B. dog' wins everywhere; gold B, B, A -> 2/3
    assert by["seedbench"]["metrics"]["accuracy"] == pytest.approx(2 / 3) and by["seedbench"]["mode"] == "likelihood"

    # trap 9: the model gets the prompt and the option continuations separately, never the options glued in
    ll = [c for c in fake.calls if c[0] == "loglik"]
    assert len(ll) == 3 and ll[0][3] == [" A. cat", " B. dog", " C. bird", " D. fish"]
    assert ll[0][1] == ("<image>User: What animal is it? There are several options: A. cat B. dog C. bird D. fish "
                        "GPT:<answer>")
    assert ll[1][2] == 2 and ll[1][1].startswith("<image><image>User:")
    # ScienceQA text-only row: no <image>, no images
    sqa = [c for c in fake.calls if c[0] == "generate" and "whale" in c[1]]
    assert sqa[0][2] == 0 and not sqa[0][1].startswith("<image>")
    assert sqa[0][3] == {"num_beams": 1, "max_new_tokens": 8}

    # trap 12: predictions.jsonl has {row, reply} plus the prompt and decode settings per row
    out = tmp_path / "runs" / "fake"
    preds = _jsonl(out / "mme" / "predictions.jsonl")
    assert [p["row"] for p in preds] == [0, 1, 2, 3]
    assert preds[0]["reply"] == "Yes, there is." and preds[0]["prompt"] == "<image>User: Is there a dog? GPT:<answer>"
    assert preds[0]["decode"] == {"num_beams": 1, "max_new_tokens": 8}
    seed = _jsonl(out / "seedbench" / "predictions.jsonl")
    assert seed[0]["reply"] == "B" and seed[0]["logliks"] == [-3.0, -0.5, -3.0, -3.0]
    assert seed[0]["decode"] == {"scoring": "option_loglik_sum"}
    samples = _jsonl(out / "pope" / "samples.jsonl")
    assert [s["pred"] for s in samples] == ["yes", "no", "yes", "no"]
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert "| fake | mme | mme | 4 | perception 100.00, cognition 0.00 |" in summary
    assert json.loads((out / "pope" / "metrics.json").read_text())["metrics"]["accuracy"] == 0.5

    # resume: identical prompts and settings are not regenerated
    class Boom(FakeModel):
        def generate(self, *a, **k):
            raise AssertionError("should have resumed")

        def option_logliks(self, *a, **k):
            raise AssertionError("should have resumed")

    again = run_config(_config(tmp_path, bench), models={"fake": Boom()}, progress=False)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]


def test_run_limit_keeps_mme_pairs(tmp_path, bench):
    fake = FakeModel()
    cfg = _config(tmp_path, {"mme": bench["mme"]}, limit=1)
    [r] = run_config(cfg, models={"fake": fake}, progress=False)
    assert r["n"] == 2 and r["missing"] == 2  # limit 1 -> the whole first image (trap 4)


def test_run_cli_with_replay_model(tmp_path, bench, capsys):
    # first a fake run writes predictions; then a YAML replays them through the CLI
    run_config(_config(tmp_path, bench), models={"fake": FakeModel()}, progress=False)
    cfg = {"output": "replayed", "models": [{"name": "again", "kind": "replay", "predictions": "runs/fake"}],
           "datasets": [{"task": t, "data": os.path.relpath(p, tmp_path)} for t, p in bench.items()]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["eval", "run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| again | pope | pope | 4 | accuracy 50.00%" in out
    res = json.loads((tmp_path / "replayed" / "results.json").read_text())
    assert {r["task"]: r["n"] for r in res} == {"mme": 4, "pope": 4, "scienceqa": 2, "seedbench": 3}
    assert res[3]["metrics"]["accuracy"] == pytest.approx(2 / 3)  # likelihood rows replayed from their logliks


def test_run_config_validation(tmp_path, bench, capsys):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['modles'\]; valid: \['output', 'models'"):
        parse_config({"output": "x", "modles": [], "models": [{}], "datasets": [{}]})
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown key\(s\) \['paht'\]; valid"):
        parse_config({"output": "x", "models": [{"name": "m", "kind": "otter", "paht": "p"}],
                      "datasets": [{"task": "mme", "data": "d"}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: task 'mmm'; valid"):
        parse_config({"output": "x", "models": [{"name": "m", "kind": "replay", "predictions": "p"}],
                      "datasets": [{"task": "mmm", "data": "d"}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\].decode: unknown key\(s\) \['beams'\]"):
        parse_config({"output": "x", "models": [{"name": "m", "kind": "replay", "predictions": "p"}],
                      "datasets": [{"task": "mme", "data": "d", "decode": {"beams": 2}}]})
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config({"output": "x", "models": [{"name": "m", "kind": "replay", "predictions": "p"}],
                      "datasets": [{"task": "seedbench", "data": "d", "options": {"mdoe": "generate"}}]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output": "o", "models": [{"name": "m", "kind": "gpt"}],
                                    "datasets": [{"task": "mme", "data": "d"}]}))
    assert main(["eval", "run", str(path)]) == 2
    assert "kind 'gpt'; valid: ['otter', 'otterhd', 'replay', 'external']" in capsys.readouterr().err


def test_otter_kind_without_generate_module_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "otterfast.generate", None)  # as if the adapters were not there yet
    with pytest.raises(NotImplementedError, match="otterfast.generate.load_eval_model"):
        load_eval_model({"name": "m", "kind": "otter", "path": "/ckpt"})


def test_score_cli_end_to_end(tmp_path, bench, capsys):
    preds = tmp_path / "pope.jsonl"
    preds.write_text("\n".join(json.dumps({"row": i, "reply": r})
                               for i, r in enumerate(["Yes.", "", "No, there is not.", "Yes"])) + "\n")
    out = tmp_path / "out" / "pope.json"
    rc = main(["eval", "score", "--task", "pope", "--data", bench["pope"], "--predictions", str(preds),
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "pope" and res["n"] == 4
    m = res["metrics"]
    # gold yes,no,no,yes; preds yes,other,no,yes -> TP 2, TN 1, FP 0, FN 0, other 1
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.75, 1.0, 1.0, 1.0, 0.5)
    assert len(_jsonl(tmp_path / "out" / "pope.samples.jsonl")) == 4
    assert "| pope |" in (tmp_path / "out" / "pope.md").read_text()
    assert "accuracy 75.00%" in capsys.readouterr().out

    # MME on its own scale, every required key present
    mp = tmp_path / "mme.jsonl"
    mp.write_text("\n".join(json.dumps({"row": i, "reply": r}) for i, r in enumerate(["yes", "no", "no", "yes"])))
    assert main(["eval", "score", "--task", "mme", "--data", bench["mme"], "--predictions", str(mp),
                 "--json", str(tmp_path / "mme.json")]) == 0
    mm = json.loads((tmp_path / "mme.json").read_text())["metrics"]
    assert mm["perception"] == 200.0 and mm["cognition"] == 0 and mm["by_category"] == {"existence": 200.0}

    # options reach the task: SEED-Bench re-scored as generation
    sp = tmp_path / "seed.jsonl"
    sp.write_text("\n".join(json.dumps({"row": i, "reply": r}) for i, r in enumerate(["(B)", "B", "Because"])))
    assert main(["eval", "score", "--task", "seedbench", "--data", bench["seedbench"], "--predictions", str(sp),
                 "--json", str(tmp_path / "seed.json"), "--option", "mode=generate"]) == 0
    assert json.loads((tmp_path / "seed.json").read_text())["metrics"]["accuracy"] == pytest.approx(2 / 3)


def test_score_cli_errors(tmp_path, bench, capsys):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"row": 0, "reply": "yes"}\n{"row": 0, "reply": "no"}\n')
    assert main(["eval", "score", "--task", "pope", "--data", bench["pope"], "--predictions", str(dup),
                 "--json", str(tmp_path / "o.json")]) == 2
    assert "row 0 appears twice" in capsys.readouterr().err
    far = tmp_path / "far.jsonl"
    far.write_text('{"row": 9, "reply": "yes"}\n')
    assert main(["eval", "score", "--task", "pope", "--data", bench["pope"], "--predictions", str(far),
                 "--json", str(tmp_path / "o.json")]) == 2
    assert "data has 4 rows" in capsys.readouterr().err
    assert main(["eval", "score", "--task", "mme", "--data", bench["pope"], "--predictions", str(far),
                 "--json", str(tmp_path / "o.json")]) == 2
    assert "no known mme layout" in capsys.readouterr().err


def test_eval_registration_imports_no_torch():
    # the eval half of the CLI stays light: registering and parsing `eval` imports no torch, pandas, PIL or pyarrow
    code = ("import sys, argparse; from otterfast.eval.cli import register; p = argparse.ArgumentParser(); "
            "register(p.add_subparsers(dest='c')); p.parse_args(['eval', 'score', '--task', 'pope', "
            "'--data', 'd', '--predictions', 'p', '--json', 'o']); "
            "print(sorted(m for m in ('torch', 'pandas', 'PIL', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_progress_bar_has_eta():
    buf = io.StringIO()
    p = Progress(4, "m/pope", stream=buf, min_interval=0)
    for _ in range(4):
        p.update()
    p.close()
    line = p.line()
    assert "m/pope [" in line and "4/4 100%" in line and "ETA 0:00:00" in line and "it/s" in line


def test_run_magnifierbench_asks_freeform_and_withholds_without_judge(tmp_path):
    p = write_parquet(str(tmp_path / "mb.parquet"), {
        "id": ["1", "2"], "instruction": ["Which animal is it? A. cat, B. dog", "Which one? A. dog, B. cat"],
        "answer": ["B", "A"], "images": [[IMG], [IMG, IMG]]})
    fake = FakeModel()
    cfg = {"output": str(tmp_path / "runs"), "models": [{"name": "fake", "kind": "external"}],
           "datasets": [{"task": "magnifierbench", "data": p}]}
    [r] = run_config(cfg, models={"fake": fake}, progress=False)
    [line] = _jsonl(tmp_path / "runs" / "fake" / "magnifierbench" / "predictions.jsonl")  # row 1: 2 images, skipped
    assert line["freeform_prompt"] == "<image>User: Which animal is it? GPT:<answer>"
    assert line["freeform_reply"] == "No."
    m = r["metrics"]
    assert m["skipped"] == 1 and r["n"] == 1 and m["accuracy"] == 1.0
    assert m["freeform_accuracy"] is None and m["freeform"]["withheld"] == "no judge configured"


def test_run_resumes_an_interrupted_run_from_its_partial_file(tmp_path, bench):
    """A run killed mid-dataset leaves predictions.jsonl.tmp (its last line maybe torn): the next run keeps
    those replies and generates only the rest."""
    fake = FakeModel()
    run_config(_config(tmp_path, {"pope": bench["pope"]}), models={"fake": fake}, progress=False)
    folder = tmp_path / "runs" / "fake" / "pope"
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    (folder / "predictions.jsonl").unlink()
    (folder / "predictions.jsonl.tmp").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # torn 3rd line
    again = FakeModel()
    run_config(_config(tmp_path, {"pope": bench["pope"]}), models={"fake": again}, progress=False)
    assert len(again.calls) == len(lines) - 2


@pytest.mark.parametrize("name,why", [("../escaped", "path separator"), ("..", "not a folder name"),
                                      ("a/b", "path separator"), ("a\\b", "path separator"),
                                      ("ABSOLUTE", "absolute path"), ("x\ny", "control character"),
                                      (7, "not a string")])
def test_model_and_dataset_names_cannot_leave_the_output_folder(tmp_path, bench, name, why):
    """Issue 14 item 5: a name from the config becomes <output>/<model>/<dataset>; none may point elsewhere."""
    if name == "ABSOLUTE":
        name = str(tmp_path / "elsewhere")
    for where in ("models", "datasets"):
        cfg = _config(tmp_path, bench)
        cfg[where][0]["name"] = name
        with pytest.raises(ConfigError, match=rf"{where}\[0\]\.name: .*{why}"):
            parse_config(cfg)
        with pytest.raises(ConfigError, match=why):
            run_config(cfg, models={"fake": FakeModel()}, progress=False)
    # a RunConfig built without parse_config is checked where the folder is made
    rc = parse_config(_config(tmp_path, bench))
    rc.datasets[0]["name"] = "../../escaped" if isinstance(name, int) else name
    with pytest.raises(ConfigError):
        run_config(rc, models={"fake": FakeModel()}, progress=False)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "elsewhere").exists()
    assert not any(p.name == "predictions.jsonl" for p in tmp_path.glob("**/*") if "runs" not in p.parts)


def test_ordinary_names_still_work(tmp_path, bench):
    cfg = _config(tmp_path, bench)
    cfg["models"][0]["name"] = "otter 9b.v2"
    cfg["datasets"] = [{"task": "pope", "data": bench["pope"], "name": "pope-adversarial_1"}]
    run_config(cfg, models={"otter 9b.v2": FakeModel()}, progress=False)
    assert (tmp_path / "runs" / "otter 9b.v2" / "pope-adversarial_1" / "metrics.json").exists()
