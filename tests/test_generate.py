"""`otterfast generate`: templates, Otter / OtterHD folders, cached == uncached, option log-likelihoods, the CLI."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from otterfast.data.index import PreparedIndex
from otterfast.generate import Generator
from otterfast.generate.templates import render
from otterfast.models.build import build_model, load_model_config
from otterfast.models.flamingo import GatedCrossAttentionBlock

ROOT = os.path.dirname(os.path.dirname(__file__))


def photo(seed: int, w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def export(index_dir: str, model_yaml: str, out: str, fmt: str | None) -> str:
    idx = PreparedIndex(index_dir)
    torch.manual_seed(0)
    model = build_model(load_model_config(os.path.join(ROOT, "configs/models", model_yaml)), idx.tok)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedCrossAttentionBlock):
                m.attn_gate.fill_(1.0)
                m.ff_gate.fill_(0.5)
    model.save_pretrained(out)
    shutil.copytree(os.path.join(index_dir, "tokenizer"), os.path.join(out, "tokenizer"))
    if fmt:
        with open(os.path.join(out, "otterfast.json"), "w") as f:
            json.dump({"format": fmt}, f)
    return out


@pytest.fixture(scope="module")
def otter_dir(demo_index, tmp_path_factory):
    return export(demo_index, "otter-tiny.yaml", str(tmp_path_factory.mktemp("otter_export")), "simple")


@pytest.fixture(scope="module")
def otterhd_dir(demo_index_fuyu, tmp_path_factory):
    return export(demo_index_fuyu, "otterhd-tiny.yaml", str(tmp_path_factory.mktemp("otterhd_export")), "fuyu")


def test_templates_render_otters_layouts():
    assert render("otter-image", "What?") == "<image>User: What? GPT:<answer>"
    assert render("simple", "What?") == "<image>User:What? GPT:<answer>"
    assert render("otter-image", "Q?", [("A?", "a cat")]) == \
        "<image>User: A? GPT:<answer> a cat<|endofchunk|><image>User: Q? GPT:<answer>"
    assert render("llama2", "Q?") == "[INST]<image>\nQ?[/INST]<answer>"
    assert render("otterhd", "Q?") == "User: Q? Assistant:\x04"
    assert render("idefics", "Q?", [("A?", "a")]) == (
        "User:<fake_token_around_image><image><fake_token_around_image>A?<end_of_utterance>\nAssistant:<answer>a"
        "<end_of_utterance>\nUser:<fake_token_around_image><image><fake_token_around_image>Q?<end_of_utterance>"
        "\nAssistant:<answer>")
    assert render("simple", "Q?", with_image=False) == "User:Q? GPT:<answer>"
    with pytest.raises(ValueError, match="unknown template"):
        render("chatml", "Q?")


def test_otter_generation_cached_equals_uncached_and_stops(otter_dir):
    g = Generator(otter_dir)
    assert g.template == "simple"  # the format it was trained with (otterfast.json)
    imgs = [photo(1), photo(2)]
    examples = [("What is this?", "a thing")]
    kw = dict(max_new_tokens=8, num_beams=1, do_sample=False)
    cached = g.generate("And this?", imgs, examples=examples, use_cache=True, **kw)
    uncached = g.generate("And this?", imgs, examples=examples, use_cache=False, **kw)
    assert cached == uncached
    beams = [g.generate("What is it?", [imgs[0]], num_beams=3, max_new_tokens=6, use_cache=c) for c in (True, False)]
    assert beams[0] == beams[1]
    assert "<image>" not in cached
    with pytest.raises(ValueError, match="one media per <image>"):
        g.generate("Q?", imgs)  # 2 images, 1 <image>
    video = g.generate("What happens?", imgs, video=True, max_new_tokens=4)  # frames of one media
    assert isinstance(video, str)


def test_option_logliks_sum_the_option_tokens_only(otter_dir):
    g = Generator(otter_dir)
    text = g.prompt("Which one?", n_images=1)
    img = photo(3)
    opts = [" yes", " no maybe"]
    got = g.option_logliks(text, [img], opts)
    inputs = g.inputs(text, [img])
    for opt, score in zip(opts, got):
        o = g.tok(opt, add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([o])], dim=1)
        labels = torch.full_like(ids, -100)
        labels[0, -len(o):] = ids[0, -len(o):]
        with torch.no_grad():
            loss = g.model(ids, vision_x=inputs["vision_x"], labels=labels).loss  # transformers' mean NLL
        assert score == pytest.approx(-float(loss) * len(o), rel=1e-4, abs=1e-4)


def test_otterhd_generation_cached_equals_uncached(otterhd_dir):
    g = Generator(otterhd_dir)
    assert g.kind == "otterhd" and g.template == "fuyu"
    img = photo(4, 70, 40)  # 2 x 3 patches of 30
    kw = dict(max_new_tokens=6, num_beams=1, do_sample=False)
    assert g.generate("Describe.", [img], use_cache=True, **kw) == g.generate("Describe.", [img], use_cache=False, **kw)
    ids = g.inputs(g.prompt("Q?"), [img])["input_ids"][0].tolist()
    ph, nl = g.info.fuyu_placeholder_id, g.info.fuyu_newline_id
    assert ids[:8] == [ph, ph, ph, nl, ph, ph, ph, nl] and ids[-1] == g.info.fuyu_boa_id
    assert len(g.option_logliks(g.prompt("Q?"), [img], [" A", " B"])) == 2


def test_generate_cli_json(otter_dir, tmp_path, capsys):
    from otterfast.cli import main

    path = str(tmp_path / "q.png")
    photo(5).save(path)
    assert main(["generate", otter_dir, "--prompt", "What is it?", "--image", path, "--max-new-tokens", "4",
                 "--num-beams", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "<image>User:What is it? GPT:<answer>" and isinstance(out["reply"], str)


def test_train_export_then_generate_with_lora(tmp_path, demo_index):
    """otterfast train (LoRA on the LM, 2 steps) -> export with adapters folded in -> otterfast generate."""
    import subprocess
    import sys

    import yaml

    with open(os.path.join(ROOT, "configs/models/otter-tiny.yaml")) as f:
        doc = yaml.safe_load(f)
    doc["otter"]["lora_config"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    model_yaml = tmp_path / "otter-lora.yaml"
    model_yaml.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "otterfast.cli", "train", "configs/train/demo-otter.yaml",
           "--set", f"model.config={model_yaml}", "--set", "data.yaml=null", "--set", f"data.index={demo_index}",
           "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "save_every=0",
           "--set", "data.loader.capacity=512", "--set", "logging.progress=false"]
    p = subprocess.run(cmd, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    export_dir = str(out / "export")
    with open(os.path.join(export_dir, "otterfast.json")) as f:
        assert json.load(f) == {"format": "simple", "lora_merged": True, "image_transform": "otter", "image_size": 224}
    from safetensors import safe_open

    files = [f for f in os.listdir(export_dir) if f.endswith(".safetensors")]
    keys = set()
    for name in files:
        with safe_open(os.path.join(export_dir, name), "pt") as f:
            keys |= set(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight" in keys
    g = Generator(export_dir)
    assert g.template == "simple" and g.model.config.lora_config is None
    assert isinstance(g.generate("What is it?", [photo(7)], max_new_tokens=3, num_beams=1), str)
    # ... and `otterfast eval run` on the trained export (POPE generative, SEED-Bench likelihood)
    from otterfast.eval.runner import run_config
    from otterfast.eval.synth import image_struct, png, write_parquet

    img = image_struct(png((120, 80, 40), size=(40, 30)))
    datasets = [
        {"task": "pope", "data": write_parquet(str(tmp_path / "pope.parquet"), {
            "question": ["Is there a dog in the image?"] * 2, "answer": ["yes", "no"], "image": [img] * 2})},
        {"task": "seedbench", "data": write_parquet(str(tmp_path / "seed.parquet"), {
            "question": ["What is it?"] * 2, "choice_a": ["cat"] * 2, "choice_b": ["dog"] * 2,
            "choice_c": ["bird"] * 2, "choice_d": ["fish"] * 2, "answer": ["A", "B"], "image": [img] * 2})},
    ]
    results = run_config({"output": str(tmp_path / "eval"), "datasets": datasets,
                          "models": [{"name": "trained", "kind": "otter", "path": export_dir,
                                      "decode": {"max_new_tokens": 4, "num_beams": 1}}]}, progress=False)
    assert [(r["task"], r["n"]) for r in results] == [("pope", 2), ("seedbench", 2)]
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in results)


def test_generate_cli_streams_the_same_reply(otter_dir, tmp_path, capsys):
    from otterfast.cli import main

    path = str(tmp_path / "q.png")
    photo(6).save(path)
    args = ["generate", otter_dir, "--prompt", "What is it?", "--image", path, "--max-new-tokens", "5",
            "--num-beams", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip()
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out.strip() == plain


def test_otterhd_option_logliks_equal_full_forwards(otterhd_dir):
    """The prompt runs once and each option continues its KV cache: the scores equal one full forward per option."""
    g = Generator(otterhd_dir)
    img = photo(5, 100, 70)
    text = g.prompt("Which one?")
    opts = [" A", " no maybe so", " B C"]
    got = g.option_logliks(text, [img], opts)
    base = g.inputs(text, [img])
    patches = {g._patches_kwarg: base[g._patches_kwarg]}
    for opt, score in zip(opts, got):
        o = g.tok(opt, add_special_tokens=False)["input_ids"]
        ids = torch.cat([base["input_ids"], torch.tensor([o])], dim=1)
        with torch.no_grad():
            logits = g.model(input_ids=ids, **patches).logits[0].float()
        want = torch.log_softmax(logits[-len(o) - 1:-1], dim=-1).gather(1, torch.tensor(o)[:, None]).sum()
        assert score == pytest.approx(float(want), rel=1e-4, abs=1e-4)
