"""The model side of `eval run`: templates, the adapter over otterfast.generate, model loading by kind."""

from __future__ import annotations

import sys
import types

import pytest

from otterfast.eval.model_api import GeneratorModel, load_eval_model
from otterfast.eval.runner import run_config
from otterfast.eval.synth import image_struct, png, write_parquet
from otterfast.eval.templates import continuation, wrap


def test_templates():
    assert wrap("otter", "Is it red?", 2) == "<image><image>User: Is it red? GPT:<answer>"
    assert wrap("otter-image", "q", 0) == "User: q GPT:<answer>"
    assert wrap("simple", "q", 1) == "<image>User:q GPT:<answer>"
    assert wrap("otterhd", "q", 1) == "User: q Assistant:\x04"
    assert wrap("fuyu", "q", 1) == "User:q Assistant:\x04"
    assert wrap("raw", "q", 3) == "q"
    with pytest.raises(ValueError, match="valid"):
        wrap("llava", "q", 1)
    assert continuation("otter-image", "A. cat") == " A. cat" and continuation("simple", "A. cat") == "A. cat"
    assert continuation("otterhd", "A. cat") == " A. cat" and continuation("raw", "A. cat") == "A. cat"


def test_templates_match_otterfast_generate():
    gt = pytest.importorskip("otterfast.generate.templates")
    for name in ("otter-image", "simple", "otterhd", "fuyu", "raw"):
        assert wrap(name, "What is it?", 1) == gt.render(name, "What is it?", [], with_image=True), name


class FakeGenerator:
    kind = "otter"
    template = "simple"
    name = "otter:ckpt"

    def __init__(self):
        self.calls = []

    def prompt(self, query, examples=(), n_images=1, template=None):
        return ("<image>" if n_images else "") + f"User:{query} GPT:<answer>"

    def generate_text(self, text, images=(), **decode):
        self.calls.append(("gen", text, len(images), decode))
        return "Yes"

    def option_logliks(self, text, images, options, video=False):
        self.calls.append(("ll", text, len(images), options))
        return [-1.0 * (i + 1) for i in range(len(options))]


def test_generator_adapter_and_loading(monkeypatch, tmp_path):
    seen = {}
    gen = FakeGenerator()

    def fake_load(spec):
        seen.clear()
        seen.update(spec)
        return gen

    monkeypatch.setitem(sys.modules, "otterfast.generate", types.SimpleNamespace(load_eval_model=fake_load))
    m = load_eval_model({"name": "mine", "kind": "otter", "path": "/ckpt", "template": "simple",
                         "options": {"device": "cuda", "dtype": "bfloat16"}, "decode": {"num_beams": 1}})
    assert isinstance(m, GeneratorModel) and m.name == "mine" and m.template == "simple"
    assert seen == {"kind": "otter", "path": "/ckpt", "name": "mine", "template": "simple", "device": "cuda",
                    "dtype": "bfloat16"}  # decode stays with the runner; options go to the generator
    # several images of a row are the frames of one media (one <image>), passed as video to the generator
    assert m.render("q", 3) == "<image>User:q GPT:<answer>"
    m.generate("<image>User:q GPT:<answer>", [1, 2, 3])
    assert gen.calls[-1][3] == {"video": True}
    gen.calls.clear()
    assert m.render("q", 0) == "User:q GPT:<answer>"

    # the runner uses the model's own template, and its likelihood options follow that template's spacing
    seed = write_parquet(str(tmp_path / "seed.parquet"), {
        "question": ["What is it?"], "choice_a": ["cat"], "choice_b": ["dog"], "choice_c": ["bird"],
        "choice_d": ["fish"], "answer": ["A"], "image": [image_struct(png())]})
    cfg = {"output": str(tmp_path / "runs"), "models": [{"name": "mine", "kind": "otter", "path": "/ckpt"}],
           "datasets": [{"task": "seedbench", "data": seed}]}
    [r] = run_config(cfg, progress=False)
    [ll] = [c for c in gen.calls if c[0] == "ll"]
    # `simple` is trained as `<answer>{a}`: options without a leading space; only option texts, prompt apart
    assert ll == ("ll", "<image>User:What is it? There are several options: A. cat B. dog C. bird D. fish GPT:<answer>",
                  1, ["A. cat", "B. dog", "C. bird", "D. fish"])
    assert r["metrics"]["accuracy"] == 1.0 and r["template"] == "simple"


def test_runner_passes_templated_prompt_and_decode(monkeypatch, tmp_path):
    gen = FakeGenerator()
    monkeypatch.setitem(sys.modules, "otterfast.generate", types.SimpleNamespace(load_eval_model=lambda s: gen))
    pope = write_parquet(str(tmp_path / "pope.parquet"), {
        "question": ["Is there a dog?"], "answer": ["yes"], "image": [image_struct(png())]})
    cfg = {"output": str(tmp_path / "runs"),
           "models": [{"name": "m", "kind": "otter", "path": "/ckpt", "decode": {"num_beams": 1}}],
           "datasets": [{"task": "pope", "data": pope, "decode": {"max_new_tokens": 4}}]}
    [r] = run_config(cfg, progress=False)
    assert gen.calls == [("gen", "<image>User:Is there a dog? GPT:<answer>", 1,
                          {"max_new_tokens": 4, "num_beams": 1, "no_repeat_ngram_size": 3})]
    assert r["metrics"]["accuracy"] == 1.0


def test_unknown_kind_and_replay_needs_predictions():
    with pytest.raises(ValueError, match="valid"):
        load_eval_model({"name": "x", "kind": "llava"})
    with pytest.raises(ValueError, match="predictions"):
        load_eval_model({"name": "x", "kind": "replay"})
