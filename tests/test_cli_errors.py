"""Wrong usage, missing or unreadable files and bad values: through the real `otterfast` command (a subprocess), every
sub-command answers with one line on stderr naming the problem, `otterfast <sub-command>: ...`, a non-zero exit,
and never a traceback. Every case is cheap: no training, no model, tiny files."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def otterfast(*args: str, env: dict | None = None, cwd: str = ROOT) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "OTTERFAST_TRACEBACK")}
    return subprocess.run([sys.executable, "-m", "otterfast.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**e, **(env or {})}, timeout=300)


def assert_one_line(r: subprocess.CompletedProcess, prefix: str, fragment: str) -> None:
    err = r.stderr
    assert r.returncode != 0, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix + ": "), err
    assert fragment in lines[0], err


def _corrupt_parquet_dataset(root: str) -> str:
    """A MIMIC-IT dataset whose image table has a corrupt page header in its image column."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    imgs = {}
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, "PNG")
        imgs[f"I{i}"] = base64.b64encode(buf.getvalue()).decode()
    table = os.path.join(root, "img.parquet")
    pd.DataFrame({"base64": list(imgs.values())}, index=list(imgs)).to_parquet(table, compression=None)
    raw = bytearray(open(table, "rb").read())
    k = raw.find(imgs["I0"][:16].encode())  # the first image's text: its page header is right before it
    assert k > 4
    raw[max(4, k - 20):k] = b"\xff" * (k - max(4, k - 20))
    with open(table, "wb") as f:
        f.write(bytes(raw))
    data = {f"r{i}": {"instruction": "q", "answer": "a", "image_ids": [f"I{i}"]} for i in range(3)}
    with open(os.path.join(root, "a.json"), "w") as f:
        json.dump({"meta": {}, "data": data}, f)
    path = os.path.join(root, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"IMAGE_TEXT": {"A": {"mimicit_path": "a.json", "images_path": "img.parquet"}}}, f)
    return path


@pytest.fixture
def files(tmp_path):
    """Small bad inputs, by name."""
    f = {"empty_dir": str(tmp_path / "empty"), "missing": str(tmp_path / "missing.yaml")}
    os.makedirs(f["empty_dir"])
    (tmp_path / "bad.yaml").write_text("a: [\n")
    f["bad_yaml"] = str(tmp_path / "bad.yaml")
    (tmp_path / "group.yaml").write_text("WHATEVER:\n  x: {}\n")
    f["unknown_group"] = str(tmp_path / "group.yaml")
    (tmp_path / "not_an_image.png").write_text("hello")
    f["not_an_image"] = str(tmp_path / "not_an_image.png")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    f["model"] = str(model)
    f["eval_escape"] = str(tmp_path / "eval.yaml")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "models": [{"name": "../x", "kind": "replay", "predictions": "p"}],
        "datasets": [{"task": "pope", "data": "pope.parquet"}]}))
    return f


# (case id, argv with {placeholders} from `files`, the sub-command's prefix, a fragment of the one line)
CASES = [
    ("no command", [], "otterfast", "required: command"),
    ("unknown command", ["frobnicate"], "otterfast", "invalid choice: 'frobnicate'"),
    ("data without sub-command", ["data"], "otterfast data", "required: data_command"),
    ("prepare without --out", ["data", "prepare", "{missing}", "--tokenizer", "t"], "otterfast data prepare",
     "required: --out"),
    ("prepare bad int", ["data", "prepare", "d", "--tokenizer", "t", "--out", "o", "--max-seq-len", "abc"],
     "otterfast data prepare", "invalid int value: 'abc'"),
    ("validate missing yaml", ["data", "validate", "{missing}"], "otterfast data validate",
     "missing.yaml: dataset YAML not found"),
    ("validate malformed yaml", ["data", "validate", "{bad_yaml}"], "otterfast data validate", "malformed YAML"),
    ("validate unknown group", ["data", "validate", "{unknown_group}"], "otterfast data validate", "unknown group"),
    ("inspect not an index", ["data", "inspect", "{empty_dir}"], "otterfast data inspect", "not a prepared index"),
    ("inspect missing folder", ["data", "inspect", "{missing}"], "otterfast data inspect", "not a prepared index"),
    ("train missing config", ["train", "{missing}"], "otterfast train", "missing.yaml: No such file or directory"),
    ("train bad --set", ["train", "configs/train/demo-otter.yaml", "--set", "optim.lrr=1"], "otterfast train",
     "unknown key 'optim.lrr'"),
    ("train malformed --set", ["train", "configs/train/demo-otter.yaml", "--set", "optim.lr"], "otterfast train",
     "expected key.path=value"),
    ("plot without metrics", ["plot", "{empty_dir}"], "otterfast plot", "metrics.jsonl not found"),
    ("generate bad dtype", ["generate", "{model}", "--prompt", "hi", "--dtype", "float99"], "otterfast generate",
     "invalid choice: 'float99'"),
    ("generate without prompt", ["generate", "{model}"], "otterfast generate", "required: --prompt"),
    ("generate not a model", ["generate", "{empty_dir}", "--prompt", "hi"], "otterfast generate",
     "not a model folder"),
    ("generate bad example", ["generate", "{model}", "--prompt", "hi", "--example", "no arrow"],
     "otterfast generate", "expected 'question=>answer'"),
    ("generate not an image", ["generate", "{model}", "--prompt", "hi", "--image", "{not_an_image}"],
     "otterfast generate", "not a readable image"),
    ("generate missing image", ["generate", "{model}", "--prompt", "hi", "--image", "{missing}"],
     "otterfast generate", "No such file or directory"),
    ("generate bad device", ["generate", "{model}", "--prompt", "hi", "--device", "toaster"], "otterfast generate",
     "--device 'toaster'"),
    ("generate bad model config", ["generate", "{model}", "--prompt", "hi"], "otterfast generate",
     "neither otter nor fuyu"),
    ("eval judge model without url", ["eval", "score", "--task", "pope", "--data", "d.parquet", "--predictions",
                                      "p.jsonl", "--json", "o.json", "--judge-model", "m"],
     "otterfast eval score", "--judge-url and --judge-model go together"),
    ("eval judge over http", ["eval", "score", "--task", "pope", "--data", "d.parquet", "--predictions", "p.jsonl",
                              "--json", "o.json", "--judge-model", "m", "--judge-url", "http://judge.example/v1"],
     "otterfast eval score", "use https"),
    ("eval missing data", ["eval", "score", "--task", "pope", "--data", "{missing}", "--predictions", "p.jsonl",
                           "--json", "o.json"], "otterfast eval score", "no such parquet file"),
    ("eval unknown task", ["eval", "score", "--task", "nope", "--data", "d", "--predictions", "p", "--json", "o"],
     "otterfast eval score", "invalid choice: 'nope'"),
    ("eval run missing config", ["eval", "run", "{missing}"], "otterfast eval run", "No such file or directory"),
    ("eval run name escapes output", ["eval", "run", "{eval_escape}"], "otterfast eval run",
     "models[0].name: '../x' contains a path separator"),
]


@pytest.mark.parametrize("argv,prefix,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_and_nonzero_exit(files, argv, prefix, fragment):
    r = otterfast(*[a.format(**files) for a in argv])
    assert_one_line(r, prefix, fragment)


def test_inspect_index_out_of_range(demo_index):
    for i in ("1000000", "-1"):
        assert_one_line(otterfast("data", "inspect", demo_index, "--index", i), "otterfast data inspect",
                        f"--index {i} is out of range")


def test_train_loop_value_error_is_one_line_per_rank(tmp_path):
    import torch

    args = ["train", "configs/train/demo-otter.yaml", "--set", "precision=bf16", "--set", "data.yaml=null",
            "--set", f"data.index={tmp_path / 'no-index'}", "--set", f"output_dir={tmp_path / 'out'}"]
    # train/loop.py's clear ValueError (on a GPU machine the next one: the index is missing)
    want = "not a prepared index" if torch.cuda.is_available() else "precision bf16 needs a GPU"
    assert_one_line(otterfast(*args), "otterfast train", want)
    # another rank says it too, naming itself, in one line (an error only that rank meets is never silent)
    r = otterfast("train", str(tmp_path / "missing.yaml"), env={"RANK": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"otterfast train [rank 1]: {tmp_path / 'missing.yaml'}: No such file or directory"]


def test_corrupt_parquet_page_is_a_named_data_defect(tmp_path, demo_tok_dir):
    y = _corrupt_parquet_dataset(str(tmp_path))
    r = otterfast("data", "prepare", y, "--tokenizer", demo_tok_dir, "--out", str(tmp_path / "idx"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    # a defect report: the count on the first line, then one line per kind and per example, naming file and id
    assert lines[0] == ("otterfast data prepare: 3 data defect(s) found (use --on-error skip to leave them out and "
                        "count them):")
    assert "  unreadable_table: 3" in lines
    assert any(ln.startswith(f"  [unreadable_table] {tmp_path / 'img.parquet'}: id 'I0': cannot be read")
               for ln in lines), r.stderr
    # skipped and counted with --on-error skip
    from otterfast.data.prepare import PrepareOptions, validate

    v = validate(y, PrepareOptions(on_error="skip"))
    assert dict(v.report.counts) == {"unreadable_table": 3} and not v.candidates


def test_traceback_on_request_and_for_bugs(files, monkeypatch, capsys):
    r = otterfast("data", "inspect", files["empty_dir"], env={"OTTERFAST_TRACEBACK": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "not a prepared index" in r.stderr
    # a bug (not a user error) keeps its traceback: main does not swallow it
    from otterfast import cli
    from otterfast.data import cli as data_cli

    def buggy(a):
        raise KeyError("a bug")

    monkeypatch.setattr(data_cli, "cmd_validate", buggy)
    monkeypatch.delenv("OTTERFAST_TRACEBACK", raising=False)
    with pytest.raises(KeyError):
        cli.main(["data", "validate", "x.yaml"])
