"""Building an Otter model from a model YAML, and its training FLOPs per token.

`OtterModelConfig` is the YAML (configs/models/, architecture: otter); `build_otter` makes the model from a local
Otter checkpoint, or new from pretrained parts (a local LM folder or .gguf, a local CLIP) and random init, with the
vocabulary fitted to the prepared index's tokenizer; `flops_per_token` is the MFU estimate. The model itself is
models/otter.py; models/build.py is the one door the trainer uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel

from . import attention, weights_io
from .flamingo import GatedCrossAttentionBlock
from .model_yaml import ModelYaml, from_yaml_dict, local_checkpoint
from .otter import OtterConfig, OtterForConditionalGeneration

# ------------------------------------------------------------------------------------- otterfast model config
@dataclass
class OtterModelConfig(ModelYaml):
    """A model YAML of configs/models/ (architecture: otter).

    `checkpoint`: a local Otter checkpoint folder (config.json + safetensors, e.g. a downloaded
    luodian/OTTER-MPT7B-Init). Else a new Otter: `lang_encoder` (a local transformers causal-LM folder, or a
    `.gguf` file) and `vision_encoder` (a local CLIP or CLIP-vision folder) give pretrained parts, as Otter's
    -Init checkpoints were made; what is not given is randomly initialised from `otter`'s `text_config` /
    `vision_config`; the Flamingo parts are always new (gates at 0). `otter`: OtterConfig fields.
    `media_token_id` / `eoc_token_id` and the vocabulary come from the prepared index's tokenizer.
    `init_from: {format: openflamingo | otter, path: FILE}`: trained weights loaded on top of that model
    (OpenFlamingo's checkpoint.pt, Otter's final_weights.pt, otterfast's trainable.safetensors; weights_io.py).
    """

    architecture: str = "otter"
    checkpoint: str | None = None
    lang_encoder: str | None = None
    vision_encoder: str | None = None
    otter: dict = field(default_factory=dict)
    dtype: str = "float32"
    # the LM's self-attention on packed rows: "auto" / "packed" (per sample, never T x T: flash-attn varlen when
    # it is installed and on CUDA, else SDPA over groups of samples; models/attention.py), "sdpa" (the dense
    # block-diagonal mask: the reference), "flash_attention_2" (transformers' own; needs flash-attn, CUDA and an
    # LM it supports, e.g. LLaMA), "eager"
    attn_implementation: str = "auto"
    init_from: dict | None = None

    @classmethod
    def from_dict(cls, doc: dict, where: str = "model config") -> "OtterModelConfig":
        cfg = from_yaml_dict(cls, doc, where, "otter")
        if cfg.attn_implementation not in attention.IMPLEMENTATIONS:
            raise ValueError(f"{where}: attn_implementation must be one of {', '.join(attention.IMPLEMENTATIONS)}")
        known = set(OtterConfig.__annotations__)
        bad = sorted(set(cfg.otter) - known)
        if bad:
            raise ValueError(f"{where}: unknown otter key(s) {bad}; valid: {sorted(known)}")
        if cfg.init_from is not None:
            weights_io.check_init_from(cfg.init_from, where)
        return cfg


def build_otter(cfg: OtterModelConfig, tok: dict) -> OtterForConditionalGeneration:
    """From the local checkpoint or random init; the vocabulary grown to the tokenizer's when it is larger."""
    dtype = getattr(torch, cfg.dtype)
    doc = dict(cfg.otter)
    # LoRA goes in after the pretrained weights are loaded: injected first, it would move each adapted weight to
    # `<name>.base_layer.weight`, where the checkpoint's tensor does not land (left randomly initialised).
    lora = doc.pop("lora_config", None)
    if cfg.checkpoint:
        if lora:
            doc["lora_config"] = None
        model = OtterForConditionalGeneration.from_pretrained(local_checkpoint(cfg.checkpoint, "Otter"),
                                                              local_files_only=True, dtype=dtype, **doc)
    else:
        text = dict(doc.pop("text_config", {}) or {})
        vision = dict(doc.pop("vision_config", {}) or {})
        lm = clip = None
        if cfg.lang_encoder:
            lm = _load_pretrained_lm(cfg.lang_encoder, dtype)
            text = {**lm.config.to_dict(), **text}
        else:
            text.setdefault("vocab_size", tok["vocab_size"])
        if cfg.vision_encoder:
            clip = CLIPVisionModel.from_pretrained(_local_dir(cfg.vision_encoder), local_files_only=True, dtype=dtype)
            vision = {**clip.config.to_dict(), **vision}
        conf = OtterConfig(text_config=text, vision_config=vision, **doc)
        model = OtterForConditionalGeneration(conf).to(dtype)
        if lm is not None:
            load_lm_weights(model, lm.state_dict())
        if clip is not None:
            model.vision_encoder.load_state_dict(clip.state_dict())
    if cfg.init_from:  # before the vocabulary is grown: new rows (OpenFlamingo's <answer>) come after the load
        weights_io.load_init_weights(model, cfg.init_from, tok, has_lm=bool(cfg.checkpoint or cfg.lang_encoder),
                                     has_clip=bool(cfg.checkpoint or cfg.vision_encoder))
    if tok["vocab_size"] > model.lang_encoder.get_input_embeddings().weight.shape[0]:
        model.lang_encoder.resize_token_embeddings(tok["vocab_size"])
    finish_otter(model, cfg, tok, lora)
    return model


def finish_otter(model: OtterForConditionalGeneration, cfg: OtterModelConfig, tok: dict, lora: dict | None) -> None:
    """What follows the weights, however they were loaded: the LM's attention, the tokenizer's `<image>` and
    `<|endofchunk|>` ids when the config has none, LoRA (after the load: see build_otter) and the trainable flags."""
    _set_attn_implementation(model.lang_encoder, cfg.attn_implementation)
    if model.config.media_token_id is None:
        model.config.media_token_id = tok["media_id"]
    if model.config.eoc_token_id is None:
        model.config.eoc_token_id = tok.get("eoc_id")
    if lora:
        model.config.lora_config = dict(lora)
    model.set_trainable()


def _set_attn_implementation(lm: nn.Module, requested: str) -> None:
    """The LM's self-attention. MPT computes its attention itself (no transformers attention interface): the packed
    choice patches its attention modules instead (models/attention.py); the other choices keep MPT's own."""
    impl = attention.resolve(requested)
    if lm.config.model_type == "mpt":
        if impl == "flash_attention_2":
            raise ValueError("MPT has no flash_attention_2 in transformers: use attn_implementation auto (packed)")
        if impl == attention.PACKED:
            attention.patch_mpt_attention(lm)
        lm._otterfast_mpt_packed = impl == attention.PACKED  # read by the Otter forward: build a layout or a mask
        return
    lm.set_attn_implementation(impl)


def _local_dir(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (a local copy is needed; nothing is downloaded)")
    return path


def _load_pretrained_lm(path: str, dtype):
    """A transformers causal LM from a local folder, or from a .gguf file (dequantised by transformers)."""
    _local_dir(path)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                                    local_files_only=True, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def load_lm_weights(model: OtterForConditionalGeneration, state: dict) -> None:
    """A plain LM's state dict into the wrapped LM: `<layers>.N.X` -> `<layers>.N.decoder_layer.X`; strict."""
    prefix = model.decoder_layers_path + "."
    mapped = {}
    for k, v in state.items():
        if k.startswith(prefix):
            n, _, rest = k[len(prefix):].partition(".")
            k = f"{prefix}{n}.decoder_layer.{rest}"
        mapped[k] = v
    missing, unexpected = model.lang_encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if "gated_cross_attn_layer" not in k and "lora_" not in k]
    if missing or unexpected:
        raise ValueError(f"the pretrained LM does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.lang_encoder.tie_weights()



def flops_per_token(model: OtterForConditionalGeneration, seq_len: int, media_per_token: float = 0.0) -> float:
    """Training FLOPs per text token (forward + backward), for MFU.

    LM and cross-attention: 6 FLOPs per trainable weight, 4 per frozen one (forward + the input gradient; no
    weight gradient), plus 12 * layers * d * seq_len for self-attention scores and values (PaLM appendix B) and
    12 * xattn_layers * inner * latents for cross-attention. Media (`media_per_token` images per text token):
    the frozen CLIP forward 2 * N_clip * patches and the perceiver 6 * N_perceiver * latents per image. The input
    embedding table is not counted (a lookup) unless it is tied to the output projection (MPT).
    """
    cfg = model.config
    lm = model.lang_encoder
    emb = lm.get_input_embeddings().weight
    out_emb = lm.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    n_train = n_frozen = 0
    for name, p in lm.named_parameters():
        if p is emb and not tied:  # a lookup; tied (MPT), the same tensor is the output projection: counted
            continue
        if p.requires_grad:
            n_train += p.numel()
        else:
            n_frozen += p.numel()
    layers = lm.config.num_hidden_layers
    n_xattn = sum(1 for m in model.modules() if isinstance(m, GatedCrossAttentionBlock))
    L = cfg.perceiver_num_latents
    per_token = 6.0 * n_train + 4.0 * n_frozen + 12.0 * layers * lm.config.hidden_size * seq_len
    per_token += 12.0 * n_xattn * cfg.xattn_heads * cfg.xattn_dim_head * L
    if media_per_token:
        v = cfg.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        n_clip = sum(p.numel() for p in model.vision_encoder.parameters())
        n_perc = sum(p.numel() for p in model.perceiver.parameters())
        per_token += media_per_token * (2.0 * n_clip * (patches + 1) + 6.0 * n_perc * L)
    return per_token

