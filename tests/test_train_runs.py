"""`otterfast train` end to end on the CPU (DeepSpeed over gloo, fp32), each run in its own process.

Exact resume is bit-for-bit (losses and grad norms compared with ==). The 2-process ZeRO-2 / ZeRO-3 runs are
compared with one process at grad_accum 2: the same batches make each optimizer step (rank r takes batches
r, r + 2, ...), and the loss normalisation makes the gradients equal up to float summation order (torchrun
runs each rank with one thread, the single process with two): tolerance 1e-5 relative.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
OTTER_TINY = os.path.join(ROOT, "configs", "models", "otter-tiny.yaml")


def _env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def train(out, index, *sets, config="configs/train/demo-otterhd.yaml", nproc=1, env=None, check=True, timeout=600):
    args = ["train", config, "--set", "data.yaml=null", "--set", f"data.index={index}", "--set", f"output_dir={out}",
            "--set", "data.loader.num_threads=1", "--set", "logging.progress=false"]
    for s in sets:
        args += ["--set", s]
    if nproc == 1:
        cmd = [sys.executable, "-m", "otterfast.cli"] + args
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "otterfast.cli"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def metrics(out):
    rows = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_index_fuyu):
    """6 straight steps (checkpoints at 3 and 6, export at the end): the reference for resume tests."""
    out = str(tmp_path_factory.mktemp("straight"))
    train(out, demo_index_fuyu, "max_steps=6", "save_every=3")
    return out


def test_straight_run_records_everything(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for k in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "padding",
                  "peak_mem_gb"):
            assert r[k] is not None, k
    assert rows[-1]["loss"] < rows[0]["loss"]
    lrs = [r["lr"] for r in rows]  # warmup 4 then cosine to lr * 0.1 at the last step, per optimizer step
    assert lrs[0] == pytest.approx(3e-3 / 4) and lrs[3] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)
    assert os.listdir(os.path.join(straight, "tensorboard"))
    ck = os.path.join(straight, "checkpoints")
    assert sorted(os.listdir(ck)) == ["step_3", "step_6"]
    assert {"COMPLETE", "trainer.json", "config.yaml", "rank_0.pt"} <= set(os.listdir(os.path.join(ck, "step_6")))


def test_export_loads_with_from_pretrained(straight):
    import torch
    from transformers import FuyuForCausalLM, PreTrainedTokenizerFast

    exp = os.path.join(straight, "export")
    assert any(f.endswith(".safetensors") for f in os.listdir(exp))
    model = FuyuForCausalLM.from_pretrained(exp)
    sd = torch.load(os.path.join(straight, "checkpoints", "step_6", "mp_rank_00_model_states.pt"),
                    weights_only=False)["module"]
    mine = model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(mine[k[len("model."):]], v, rtol=0, atol=0)
    tok = PreTrainedTokenizerFast.from_pretrained(exp)
    assert len(tok) > 0


def test_plot(straight):
    from otterfast.train.plot import plot

    png = plot(straight)
    assert os.path.getsize(png) > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_is_exact(straight, tmp_path, demo_index_fuyu):
    out = str(tmp_path / "split")
    train(out, demo_index_fuyu, "max_steps=6", "save_every=0", "stop_at_step=3", "export=false")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    p = train(out, demo_index_fuyu, "max_steps=6", "save_every=0", "export=false")
    assert "resumed from" in p.stdout and "step_3" in p.stdout
    a, b = metrics(straight), metrics(out)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


def test_kill_during_save_keeps_previous_checkpoint(straight, tmp_path, demo_index_fuyu):
    out = str(tmp_path / "killed")
    p = train(out, demo_index_fuyu, "max_steps=6", "save_every=2", "export=false",
              env={"OTTERFAST_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert p.returncode == -9, p.stderr[-3000:]
    ck = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ck)) == [".tmp-step_4", "step_2"]  # the save of step 4 never completed
    assert os.path.exists(os.path.join(ck, "step_2", "COMPLETE"))
    p = train(out, demo_index_fuyu, "max_steps=6", "save_every=2", "export=false")  # resume: auto
    assert "resumed from" in p.stdout and "step_2" in p.stdout
    assert sorted(os.listdir(ck)) == ["step_4", "step_6"]  # leftovers removed; keep_last 2
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(straight)]


def test_resume_refuses_a_changed_batch_plan(tmp_path, demo_index_fuyu):
    """resume: auto with another capacity would continue at batch N of another plan: refused in one line, before
    any step (issue 14 item 8)."""
    out = str(tmp_path / "replan")
    train(out, demo_index_fuyu, "max_steps=4", "stop_at_step=2", "export=false")
    p = train(out, demo_index_fuyu, "max_steps=4", "export=false", "data.loader.capacity=4096", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("otterfast train:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "resume would not be exact: data.loader.capacity 2048 when saved, 4096 now" in err[0]
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_nan_loss_stops_with_a_clear_message(tmp_path, demo_index_fuyu):
    out = str(tmp_path / "nan")
    p = train(out, demo_index_fuyu, "max_steps=6", "save_every=0", env={"OTTERFAST_TEST_NAN_AT_STEP": "3"},
              check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "loss is not finite at optimizer step 3" in p.stderr
    assert "step_2" in p.stderr  # what was saved
    assert os.path.exists(os.path.join(out, "checkpoints", "step_2", "COMPLETE"))
    with open(os.path.join(out, "nan_report.json")) as f:
        rep = json.load(f)
    assert rep["step"] == 3 and rep["ranks"][0]["sample_ids"][0]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert not os.path.exists(os.path.join(out, "export"))


@pytest.mark.slow
def test_two_processes_zero2_zero3_match_one_process(tmp_path, demo_index_fuyu):
    import torch
    from transformers import FuyuForCausalLM

    common = ["max_steps=4", "save_every=0"]
    one = str(tmp_path / "one")
    train(one, demo_index_fuyu, *common, "grad_accum=2", "export=false")
    ref = metrics(one)
    exports = {}
    for stage in (2, 3):
        out = str(tmp_path / f"zero{stage}")
        p = train(out, demo_index_fuyu, *common, f"deepspeed.zero_stage={stage}", nproc=2)
        assert "2 rank(s)" in p.stdout and f"ZeRO {stage}" in p.stdout
        got = metrics(out)
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
            assert b["tokens"] == a["tokens"]
        assert len(got) == 4
        exports[stage] = FuyuForCausalLM.from_pretrained(os.path.join(out, "export")).state_dict()
    for k, v in exports[2].items():  # ZeRO-3's gathered export: every weight, ~ZeRO-2's
        assert v.numel() > 0 and v.shape == exports[3][k].shape
        torch.testing.assert_close(exports[3][k], v, rtol=1e-3, atol=2e-4)  # Adam amplifies ~0 grads


@pytest.mark.skipif(not os.path.exists(OTTER_TINY), reason="configs/models/otter-tiny.yaml not there yet")
def test_otter_single_process(tmp_path, demo_index):
    out = str(tmp_path / "otter")
    p = train(out, demo_index, "max_steps=3", "save_every=0", "data.loader.capacity=512",
              config="configs/train/demo-otter.yaml")
    assert "model otter" in p.stdout and "frozen" in p.stdout
    rows = metrics(out)
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    from otterfast.models.otter import OtterForConditionalGeneration

    model = OtterForConditionalGeneration.from_pretrained(os.path.join(out, "export"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_zero3_otter_survives_a_rank_without_images(tmp_path, demo_index):
    """Under ZeRO-3 every rank must call the same modules (each call gathers their shards collectively). At this
    seed and row size, step 12 gives rank 0 a text-only row while rank 1 has images: before the blank-media rule
    (models/otter.py otter_inputs) rank 1 waited forever in the perceiver's all-gather."""
    from otterfast.data.index import PreparedIndex
    from otterfast.data.reference import ReferenceLoader

    idx = PreparedIndex(demo_index)
    text_only = []
    for r in (0, 1):
        plan = ReferenceLoader(idx, batch_size=1, capacity=256, seed=0, rank=r, world_size=2).plan()[:12]
        text_only.append({i for i, b in enumerate(plan) if all(not idx.sample(s).media_images for row in b for s in row)})
    assert text_only[0] ^ text_only[1], "the data no longer has a step where only one rank lacks images"
    out = str(tmp_path / "z3")
    p = train(out, demo_index, "max_steps=12", "save_every=0", "export=false", "data.loader.capacity=256",
              "deepspeed.zero_stage=3", config="configs/train/demo-otter.yaml", nproc=2, timeout=300)
    assert "ZeRO 3" in p.stdout and len(metrics(out)) == 12


def test_activation_checkpointing_under_zero3_keeps_the_losses(tmp_path, demo_index):
    """Recomputation under ZeRO-3 (each recomputed module gathers its shards again) on 2 ranks: the same losses
    and grad norms as without checkpointing (Otter: decoder layers with cross-attention and perceiver blocks)."""
    runs = {}
    for mode in ("none", "all"):
        out = str(tmp_path / mode)
        p = train(out, demo_index, "max_steps=3", "save_every=0", "export=false", "data.loader.capacity=512",
                  "deepspeed.zero_stage=3", f"model.activation_checkpointing={mode}",
                  config="configs/train/demo-otter.yaml", nproc=2, timeout=300)
        assert f"activation checkpointing {mode}" in p.stdout
        runs[mode] = metrics(out)
    for a, b in zip(runs["none"], runs["all"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert len(runs["all"]) == 3
