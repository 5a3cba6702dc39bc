"""Training config, optimizer groups, LR schedule, checkpoint discovery: in-process, no training."""

import glob
import os

import pytest
import torch

from otterfast.train.config import ConfigError, load_config
from otterfast.train.optim import lr_multiplier, param_groups, warmup_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml")))
BASE = {"max_steps": 3, "model": {"config": "configs/models/otterhd-tiny.yaml"}, "data": {"index": "IDX"}}


def test_configs_shipped():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"demo-otter.yaml", "demo-otterhd.yaml", "otter-mpt7b.yaml", "otterhd-8b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.max_steps or cfg.epochs
    if cfg.model.config:  # model YAMLs are in the repository (their checkpoints are local paths)
        assert os.path.exists(os.path.join(ROOT, cfg.model.config)), cfg.model.config
        from otterfast.models.build import load_model_config

        load_model_config(os.path.join(ROOT, cfg.model.config))


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1e-3"], "unknown key 'optim.lrr' (did you mean 'lr'?); valid keys of optim: lr, weight_decay"),
    (["maxsteps=3"], "unknown key 'maxsteps' (did you mean 'max_steps'?)"),
    (["data.loader.batch_sz=2"], "unknown key 'data.loader.batch_sz' (did you mean 'batch_size'?)"),
    (["data.loader.seed=3"], "data.loader.seed: set by the top-level `seed`"),
    (["data.loader.world_size=2"], "set by the launcher (WORLD_SIZE)"),
    (["max_steps=abc"], "max_steps: expected int or null, got 'abc'"),
    (["export=maybe"], "export: expected true or false"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.betas=[0.9]"], "optim.betas: expected two numbers"),
    (["data.prepare.format=nope"], "unknown format 'nope'"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: expected 0, 1, 2 or 3"),
    (["deepspeed.offload_params=true"], "offload_params needs zero_stage 3"),
    (["schedule.name=step"], "schedule.name: expected cosine, linear or constant"),
    (["precision=fp16"], "precision: expected auto, bf16 or fp32"),
    (["max_steps=null"], "set max_steps or epochs"),
    (["model.inline={architecture: otterhd}"], "exactly one of model.config"),
    (["data.index=null"], "data: set data.index"),
    (["optim=3"], "optim: expected a mapping"),
    (["nonsense"], "expected key.path=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, override)
    assert message in str(e.value)


def test_overrides_are_typed():
    cfg = load_config(BASE, ["optim.lr=3e-4", "schedule.warmup_ratio=0.1", "data.loader.pack=false",
                             "data.loader.capacity=1024", "resume=off", "deepspeed.zero_stage=3", "seed=7"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # PyYAML alone reads 3e-4 as a string
    assert cfg.data.loader.pack is False and cfg.data.loader.capacity == 1024
    assert cfg.resume == "off" and cfg.deepspeed.zero_stage == 3 and cfg.seed == 7


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("max_steps: 3\nmodel: {config: x.yaml}\ndata: {index: i, loadr: {}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.loadr' \(did you mean 'loader'\?\)"):
        load_config(str(p))


def test_weight_decay_only_on_linear_weights():
    from otterfast.models.otterhd import OtterHDConfig, build_otterhd

    torch.manual_seed(0)
    m = build_otterhd(OtterHDConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "intermediate_size": 64}),
                      vocab_size=100, image_token_id=5)
    groups, rep = param_groups(m, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay = set(rep["decay_names"])
    assert "model.vision_embed_tokens.weight" in decay  # the patch projection is a Linear
    assert "lm_head.weight" in decay
    assert any("mlp.dense_h_to_4h.weight" in n for n in decay)
    no = set(rep["no_decay_names"])
    assert any("embed_tokens.weight" in n and "vision" not in n for n in no)  # token embedding: no decay
    assert all(n.endswith(".bias") or "norm" in n or "embed_tokens" in n for n in no), no
    m.lm_head.weight.requires_grad_(False)
    _, rep2 = param_groups(m, 0.1)
    assert "lm_head.weight" not in rep2["decay_names"] and rep2["frozen"] == m.lm_head.weight.numel()
    _, rep3 = param_groups(m, 0.1, decay_embeddings=True)
    assert any("embed_tokens.weight" in n for n in rep3["decay_names"])


def test_otter_gates_and_latents_not_decayed():
    from otterfast.models.flamingo import GatedCrossAttentionBlock, PerceiverResampler

    m = torch.nn.ModuleDict({"x": GatedCrossAttentionBlock(dim=16, dim_visual=8, dim_head=4, heads=2),
                             "p": PerceiverResampler(dim=8, depth=1, dim_head=4, heads=2, num_latents=4)})
    _, rep = param_groups(m, 0.1)
    assert all("gate" not in n for n in rep["decay_names"])
    assert any("gate" in n for n in rep["no_decay_names"])
    assert "p.latents" in rep["no_decay_names"]


def test_schedule_counts_optimizer_steps():
    total, w = 10, warmup_steps(10, 0, 0.2)
    assert w == 2
    cos = [lr_multiplier(s, total, w, "cosine", 0.1) for s in range(total)]
    assert cos[0] == 0.5 and cos[1] == 1.0 and cos[2] == 1.0
    assert cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cos[1:], cos[2:]))
    lin = [lr_multiplier(s, total, 0, "linear") for s in range(total)]
    assert lin[0] == 1.0 and lin[-1] == 0.0
    assert all(lr_multiplier(s, total, 3, "constant") == 1.0 for s in range(3, total))


def test_checkpoint_discovery(tmp_path):
    from otterfast.train.checkpoint import complete_checkpoints, find_resume

    root = tmp_path / "checkpoints"
    for name, done in [("step_2", True), ("step_10", True), ("step_12", False), (".tmp-step_14", False)]:
        (root / name).mkdir(parents=True)
        if done:
            (root / name / "COMPLETE").write_text("")
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 10]
    assert find_resume("auto", str(tmp_path)).endswith("step_10")
    assert find_resume("off", str(tmp_path)) is None
    assert find_resume("auto", str(tmp_path / "empty")) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume(str(root / "step_12"), str(tmp_path))


def test_user_deepspeed_json_auto_and_conflicts(tmp_path):
    import json

    from otterfast.train.deepspeed_setup import ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                             "gradient_clipping": "auto", "zero_optimization": {"stage": "auto"},
                             "bf16": {"enabled": "auto"}}))
    cfg = load_config(BASE, [f"deepspeed.config={p}", "grad_accum=4", "deepspeed.zero_stage=2"])
    ds = ds_config(cfg, "bf16", 2, 8)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 2 * 4 * 8
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    p.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 2 but the training config gives 4"):
        ds_config(cfg, "fp32", 1, 1)
    p.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="'scheduler' section"):
        ds_config(cfg, "fp32", 1, 1)


def test_cli_help():
    from otterfast.cli import main

    for cmd in (["train"], ["plot"], ["bench", "train"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + ["--help"])
        assert e.value.code == 0


def test_param_groups_count_zero3_partitioned_parameters_in_full():
    """Under ZeRO-3 (zero.Init) a parameter's local tensor is empty; its full size is ds_numel / ds_shape."""
    import torch

    m = torch.nn.Module()
    m.latents = torch.nn.Parameter(torch.empty(0))
    m.latents.ds_numel, m.latents.ds_shape = 64 * 32, torch.Size([64, 32])
    m.gate = torch.nn.Parameter(torch.empty(0))
    m.gate.ds_numel, m.gate.ds_shape = 1, torch.Size([1])
    _, rep = param_groups(m, 0.1, decay_embeddings=True)
    assert rep["trainable"] == 64 * 32 + 1 and rep["decay"] == 64 * 32  # latents are 2-D: decayed when asked
