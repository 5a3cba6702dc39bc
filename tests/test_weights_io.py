"""Weights in and out (models/weights_io.py): OpenFlamingo's checkpoint.pt and Otter's final_weights.pt loaded as
`init_from` on top of a base LM and CLIP, and the trainable-only export, each checked against the model it was
written from (logits), with files written by hand in each layout; bad files give errors naming the keys."""

import os
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from otterfast.models.build import build_model, load_model_config
from otterfast.models.lora import merged_state_dict
from otterfast.models.weights_io import TRAINABLE_FILE, save_trainable

ROOT = os.path.dirname(os.path.dirname(__file__))
with open(os.path.join(ROOT, "configs", "models", "otter-tiny.yaml")) as f:
    TINY = yaml.safe_load(f)["otter"]  # otter-tiny.yaml's sizes; its text/vision configs become the base parts
VISION = {**TINY["vision_config"], "image_size": 64, "patch_size": 16}  # fewer pixels, same shapes otherwise
FLAMINGO = {k: v for k, v in TINY.items() if k not in ("text_config", "vision_config")}
LLAMA = TINY["text_config"]
MPT = dict(model_type="mpt", d_model=64, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=128, no_bias=True,
           norm_type="low_precision_layernorm", tie_word_embeddings=True, use_cache=False,
           attn_config={"alibi": True, "attn_impl": "torch", "attn_pdrop": 0, "softmax_scale": None})

# Token ids as OpenFlamingo and Otter assign them on top of a 96-token LM: OpenFlamingo adds <|endofchunk|> 96,
# <image> 97, <PAD> 98 (99 rows); Otter then adds <answer> 99 (100 rows).
BASE_VOCAB, EOC, IMG, ANSWER = 96, 96, 97, 99
TOK_OF = {"vocab_size": 99, "media_id": IMG, "eoc_id": EOC, "answer_id": None}
TOK = {"vocab_size": 100, "media_id": IMG, "eoc_id": EOC, "answer_id": ANSWER}
MPT_ROWS = 112  # MPT pads its table beyond the tokenizer (50432 for 7B): <answer> takes a padding row


def base_parts(tmp_path, text: dict, vocab: int) -> dict:
    """A pretrained LM and CLIP saved as local folders: the model YAML keys of a new Otter built on them."""
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**text, vocab_size=vocab)).save_pretrained(tmp_path / "lm")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "clip")
    return {"architecture": "otter", "lang_encoder": str(tmp_path / "lm"), "vision_encoder": str(tmp_path / "clip"),
            "otter": dict(FLAMINGO)}


def trained(yaml_doc: dict, tok: dict, skip=()):
    """The model built directly, then every trainable parameter moved (as training would), gates opened."""
    model = build_model(load_model_config(yaml_doc), tok)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not any(s in n for s in skip):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model):
    torch.manual_seed(11)
    ids = torch.tensor([[1, IMG, 5, 6, 7, EOC, IMG, 9, 10]])
    vx = torch.randn(1, 2, 1, 3, 64, 64)
    with torch.no_grad():
        return model.eval()(ids, vision_x=vx).logits


# ------------------------------------------------------------------------------ OpenFlamingo's layout, by hand
PERCEIVER_ATTN = ["norm_media.weight", "norm_media.bias", "norm_latents.weight", "norm_latents.bias",
                  "to_q.weight", "to_kv.weight", "to_out.weight"]
FF = ["0.weight", "0.bias", "1.weight", "3.weight"]
XATTN = ["attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight", "attn.to_out.weight",
         "attn_gate", "ff_gate"]


def openflamingo_checkpoint(model, text: str, v1_duplicates: bool) -> dict:
    """OpenFlamingo's trainable keys (perceiver, cross-attention, input embeddings), each named by hand from
    OpenFlamingo's modules (PerceiverResampler.layers[i] = [PerceiverAttention, FeedForward];
    GatedCrossAttentionBlock.ff), each tensor taken from the Otter model by its Otter name."""
    sd = model.state_dict()
    of = {"perceiver.latents": sd["perceiver.latents"], "perceiver.norm.weight": sd["perceiver.norm.weight"],
          "perceiver.norm.bias": sd["perceiver.norm.bias"]}
    for i in range(FLAMINGO["perceiver_depth"]):
        for name in PERCEIVER_ATTN:
            of[f"perceiver.layers.{i}.0.{name}"] = sd[f"perceiver.layers.{i}.{name}"]
        for name in FF:
            of[f"perceiver.layers.{i}.1.{name}"] = sd[f"perceiver.layers.{i}.feed_forward.{name}"]
    layers = "lang_encoder.transformer.blocks" if text == "mpt" else "lang_encoder.model.layers"
    for i in range(4):
        if (i + 1) % FLAMINGO["cross_attn_every_n_layers"]:
            continue
        block = {name: sd[f"{layers}.{i}.gated_cross_attn_layer.{name}"] for name in XATTN}
        block.update({f"ff.{name}": sd[f"{layers}.{i}.gated_cross_attn_layer.feed_forward.{name}"] for name in FF})
        for name, value in block.items():
            of[f"{layers}.{i}.gated_cross_attn_layer.{name}"] = value
            if v1_duplicates:  # OpenFlamingo v1 saved the blocks a second time under this ModuleList
                of[f"lang_encoder.gated_cross_attn_layers.{i}.{name}"] = value.clone()
    emb = "lang_encoder.transformer.wte.weight" if text == "mpt" else "lang_encoder.model.embed_tokens.weight"
    of[emb] = sd[emb]
    return {k: v.clone() for k, v in of.items()}


@pytest.mark.parametrize("layout", ["released", "training"])
def test_openflamingo_llama_checkpoint_with_answer_added(tmp_path, layout):
    """LLaMA (untied, unpadded): the file's 99 rows load; <answer> (99) is a new row, as Otter's resize adds it."""
    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    # OpenFlamingo's model: its tokenizer has no <answer>; its lm_head is frozen (not in the file)
    ref = trained(doc, TOK_OF, skip=("lm_head",))
    of = openflamingo_checkpoint(ref, "llama", v1_duplicates=layout == "training")
    if layout == "training":  # OpenFlamingo's train script: DDP's module. prefix, under model_state_dict
        of = {"epoch": 3, "model_state_dict": {"module." + k: v for k, v in of.items()},
              "optimizer_state_dict": {"state": {}}}
    torch.save(of, tmp_path / "checkpoint.pt")
    model = build_model(load_model_config({**doc, "init_from": {"format": "openflamingo",
                                                                "path": str(tmp_path / "checkpoint.pt")}}), TOK)
    emb = model.lang_encoder.get_input_embeddings().weight
    assert emb.shape[0] == 100 and model.lang_encoder.lm_head.weight.shape[0] == 100
    torch.testing.assert_close(emb[:99], ref.lang_encoder.get_input_embeddings().weight, rtol=0, atol=0)
    # the LM's own tokens: equal to the model the file was written from (the rows of tokens OpenFlamingo added
    # are new in its lm_head too, drawn at random in both)
    torch.testing.assert_close(logits(model)[..., :BASE_VOCAB], logits(ref)[..., :BASE_VOCAB], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lang_encoder.model.embed_tokens.weight" in trainable and "perceiver.latents" in trainable


def test_openflamingo_mpt_checkpoint_padded_table(tmp_path):
    """MPT (tied, table padded beyond the tokenizer): no resize; <answer> takes a padding row; equal logits."""
    doc = base_parts(tmp_path, MPT, MPT_ROWS)
    ref = trained(doc, TOK_OF)
    torch.save(openflamingo_checkpoint(ref, "mpt", v1_duplicates=False), tmp_path / "checkpoint.pt")
    model = build_model(load_model_config({**doc, "init_from": {"format": "openflamingo",
                                                                "path": str(tmp_path / "checkpoint.pt")}}), TOK)
    assert model.lang_encoder.get_input_embeddings().weight.shape[0] == MPT_ROWS
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


# ------------------------------------------------------------------------------ Otter's final_weights.pt
@pytest.mark.parametrize("text", ["llama", "mpt"])
def test_otter_final_weights_on_base_lm_and_clip(tmp_path, text):
    doc = base_parts(tmp_path, LLAMA if text == "llama" else MPT, BASE_VOCAB if text == "llama" else MPT_ROWS)
    ref = trained(doc, TOK)
    # Otter's save_final_weights: the state dict, minus every parameter that does not require grad
    final = ref.state_dict()
    for n, p in ref.named_parameters():
        if not p.requires_grad:
            del final[n]
    if text == "llama":
        final = {"model_state_dict": final}  # the wrapper --trained_ckpt also accepts
    torch.save(final, tmp_path / "final_weights.pt")
    model = build_model(load_model_config({**doc, "init_from": {"format": "otter",
                                                                "path": str(tmp_path / "final_weights.pt")}}), TOK)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


# ------------------------------------------------------------------------------ the trainable-only export
def test_trainable_export_round_trip(tmp_path):
    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    ref = trained(doc, TOK)
    path = save_trainable(ref, ref.state_dict(), str(tmp_path / "export"))
    saved = load_file(path)
    assert set(saved) == {n for n, p in ref.named_parameters() if p.requires_grad}  # Otter's final_weights keys
    assert not any(k.startswith("vision_encoder.") or ".decoder_layer." in k for k in saved)
    model = build_model(load_model_config({**doc, "init_from": {"format": "otter", "path": path}}), TOK)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_trainable_export_with_lora_folds_the_adapters(tmp_path):
    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    ref = trained({**doc, "otter": {**FLAMINGO, "lora_config": lora}}, TOK)  # moves lora_B off 0 too
    path = save_trainable(ref, merged_state_dict(ref.state_dict(), ref), str(tmp_path / "export"), lora_merged=True)
    saved = load_file(path)
    assert "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight" in saved
    assert "lang_encoder.model.layers.0.decoder_layer.self_attn.k_proj.weight" not in saved  # not adapted
    assert not any("lora" in k or "base_layer" in k for k in saved)
    model = build_model(load_model_config({**doc, "init_from": {"format": "otter", "path": path}}), TOK)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-4, atol=1e-5)  # the merge rounds


def test_export_writes_the_trainable_file_beside_the_full_weights(tmp_path):
    """train/export.py's call site, with a stand-in for the DeepSpeed engine (stage 0: the module's state dict)."""
    import torch.distributed as dist

    from otterfast.models.otter import OtterForConditionalGeneration
    from otterfast.train.export import export

    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    ref = trained(doc, TOK)

    class Engine:
        module = torch.nn.ModuleDict({"model": ref})

        def zero_optimization_stage(self):
            return 0

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        out = export(Engine(), ref, str(tmp_path / "run"), str(tmp_path / "no-index"), rank=0)
    finally:
        dist.destroy_process_group()
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors", TRAINABLE_FILE]
    full = OtterForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(logits(full), logits(ref), rtol=0, atol=0)
    model = build_model(load_model_config({**doc, "init_from": {"format": "otter",
                                                                "path": os.path.join(out, TRAINABLE_FILE)}}), TOK)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_no_trainable_file_when_everything_trains(tmp_path):
    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    model = build_model(load_model_config({**doc, "otter": {**FLAMINGO, "train_full_model": True}}), TOK)
    assert save_trainable(model, model.state_dict(), str(tmp_path / "export")) is None
    assert not os.path.exists(tmp_path / "export" / TRAINABLE_FILE)


# ------------------------------------------------------------------------------ bad files and keys
@pytest.fixture
def of_file(tmp_path):
    doc = base_parts(tmp_path, LLAMA, BASE_VOCAB)
    ref = trained(doc, TOK_OF, skip=("lm_head",))
    of = openflamingo_checkpoint(ref, "llama", v1_duplicates=False)

    def build(state=None, tok=TOK, **over):
        torch.save(of if state is None else state, tmp_path / "ck.pt")
        return build_model(load_model_config({**doc, **over, "init_from": {"format": "openflamingo",
                                                                          "path": str(tmp_path / "ck.pt")}}), tok)

    return of, build


def test_missing_key_is_named(of_file):
    of, build = of_file
    gone = "lang_encoder.model.layers.3.gated_cross_attn_layer.ff.1.weight"
    with pytest.raises(ValueError, match=re.escape("missing from the file") + ".*"
                       + re.escape("layers.3.gated_cross_attn_layer.feed_forward.1.weight")):
        build({k: v for k, v in of.items() if k != gone})


def test_unexpected_key_is_named(of_file):
    of, build = of_file
    with pytest.raises(ValueError, match=r"the model does not have: perceiver\.media_time_embs"):
        build({**of, "perceiver.media_time_embs": torch.zeros(1, 1, 32)})
    with pytest.raises(ValueError, match=r"visual\.conv1\.weight.*open_clip"):
        build({**of, "vision_encoder.visual.conv1.weight": torch.zeros(1)})


def test_shape_mismatch_is_named(of_file):
    of, build = of_file
    with pytest.raises(ValueError, match=r"shape mismatch.*perceiver\.latents \(3, 32\) \(model \(8, 32\)\)"):
        build({**of, "perceiver.latents": torch.zeros(3, 32)})


def test_disagreeing_duplicate_is_an_error(of_file):
    of, build = of_file
    bad = {**of, "lang_encoder.gated_cross_attn_layers.1.attn_gate": torch.tensor([9.0])}
    with pytest.raises(ValueError, match=r"layers\.1\.gated_cross_attn_layer\.attn_gate and its duplicate"):
        build(bad)


def test_answer_id_inside_openflamingos_table_is_an_error(of_file):
    """A plain LLaMA tokenizer gets <answer> before <PAD> (id 98): OpenFlamingo's row 98 is <PAD>."""
    _, build = of_file
    with pytest.raises(ValueError, match="<answer> has id 98"):
        build(tok={**TOK, "answer_id": 98})
    with pytest.raises(ValueError, match="<image> has id 99, outside"):
        build(tok={**TOK, "media_id": 99})


def test_without_a_base_lm_the_file_must_hold_it(of_file, tmp_path):
    _, build = of_file
    with pytest.raises(ValueError, match=r"missing from the file.*lang_encoder\.model\.layers\.0\.decoder_layer"):
        build(lang_encoder=None, otter={**FLAMINGO, "text_config": {**LLAMA, "vocab_size": 99}})


def test_init_from_key_is_checked():
    with pytest.raises(ValueError, match=r"unknown init_from key\(s\) \['paht'\]; valid: \['format', 'path'\]"):
        load_model_config({"architecture": "otter", "init_from": {"format": "otter", "paht": "x"}})
    with pytest.raises(ValueError, match="init_from.format must be one of openflamingo, otter"):
        load_model_config({"architecture": "otter", "init_from": {"format": "hf", "path": "x"}})
    with pytest.raises(FileNotFoundError, match="nope.pt: file not found"):
        build_model(load_model_config({"architecture": "otter", "otter": dict(FLAMINGO, text_config=LLAMA),
                                       "init_from": {"format": "otter", "path": "nope.pt"}}), TOK)
