"""The `otterfast` command: help everywhere, inspect, validate, prepare through the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from otterfast.cli import main

CMDS = [[], ["demo"], ["data"], ["data", "demo"], ["data", "validate"], ["data", "prepare"], ["data", "inspect"],
        ["bench"], ["bench", "loader"]]


@pytest.mark.parametrize("cmd", CMDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: otterfast" in capsys.readouterr().out


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "otterfast")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in out and "demo" in out


def test_inspect_json_and_arrays(demo_index, tmp_path, capsys):
    npz = str(tmp_path / "s.npz")
    assert main(["data", "inspect", demo_index, "--index", "2", "--json", "--save-arrays", npz]) == 0
    rec = json.loads(capsys.readouterr().out)
    for k in ("sample_id", "group", "text", "input_ids", "labels", "image_ids"):
        assert k in rec
    arrs = np.load(npz)
    assert arrs["input_ids"].shape == (1, len(rec["input_ids"]))
    assert arrs["labels"][0].tolist() == rec["labels"]
    assert arrs["pixel_values"].shape[0] == sum(len(m) for m in rec["image_ids"])


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_inspect_backends_agree(demo_index, tmp_path, backend, capsys):
    npz = str(tmp_path / f"{backend}.npz")
    assert main(["data", "inspect", demo_index, "--index", "5", "--json", "--save-arrays", npz,
                 "--backend", backend]) == 0
    rec = json.loads(capsys.readouterr().out)
    arrs = np.load(npz)
    assert arrs["input_ids"][0].tolist() == rec["input_ids"]
    assert arrs["pixel_values"].shape[0] == sum(len(m) for m in rec["image_ids"])


def test_validate_and_prepare_cli(demo_dir, tmp_path, capsys):
    y = os.path.join(demo_dir, "data.yaml")
    assert main(["data", "validate", y]) == 0
    assert "no defects" in capsys.readouterr().out
    out = str(tmp_path / "idx")
    assert main(["data", "prepare", y, "--tokenizer", os.path.join(demo_dir, "tokenizer"), "--out", out,
                 "--format", "llama2", "--max-seq-len", "512", "--video-frames", "2"]) == 0
    assert "index written" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))


def test_data_error_exit_code(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("WHATEVER:\n  x: {}\n")
    assert main(["data", "validate", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown group" in capsys.readouterr().err


def test_deepspeed_launchers_local_rank_argument_is_accepted(monkeypatch, capsys):
    from otterfast.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--local_rank=1", "train", "--help"])
    assert e.value.code == 0 and "CONFIG" in capsys.readouterr().out.upper()
    assert os.environ["LOCAL_RANK"] == "1"
