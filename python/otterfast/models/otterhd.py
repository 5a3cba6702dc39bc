"""OtterHD: Fuyu (transformers' FuyuForCausalLM, Persimmon decoder) on otterfast's packed batches.

Fuyu has no vision encoder: 30x30x3 pixel patches are projected by one linear layer and scattered into the
token embeddings at the image-placeholder tokens (transformers 5 places them by `config.image_token_id`, in
order, which is the loaders' layout order). A packed row is made exact by two inputs: `position_ids` that
restart at every sample and a block-diagonal causal mask, so a packed forward equals each sample's own
forward (tests/test_otterhd.py). The causal shift of the loss never crosses samples with a loss: the first
token of every sample (an image token or BOS) is unlabelled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import yaml

from .model_yaml import from_yaml_dict
from .packing import block_causal_mask


@dataclass
class OtterHDConfig:
    """A model YAML of configs/models/ (architecture: otterhd)."""

    architecture: str = "otterhd"
    checkpoint: str | None = None  # a local Fuyu checkpoint folder; None: random init from text_config
    vocab_size: int | None = None  # random init: default from the tokenizer
    image_token_id: int | None = None  # random init: default from the tokenizer's |SPEAKER| id
    text_config: dict | None = field(default_factory=dict)
    train: str = "full"  # "full": every parameter (as Otter trains Fuyu); "lora": adapters only (+ lm_head's)
    lora: dict | None = None  # {r, lora_alpha, lora_dropout, target_modules}; default Otter's: r 64, alpha 32, ...
    dtype: str = "float32"
    # "sdpa" (block-diagonal mask), "flash_attention_2" (varlen from the restarting position_ids; needs flash-attn
    # and CUDA), "eager", or "auto": flash-attn when it is installed and CUDA is present, else sdpa.
    attn_implementation: str = "auto"

    @classmethod
    def load(cls, path: str) -> "OtterHDConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, path)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "model config") -> "OtterHDConfig":
        cfg = from_yaml_dict(cls, doc, where, "otterhd")
        if cfg.train not in ("full", "lora"):
            raise ValueError(f"{where}: train must be 'full' or 'lora', got {cfg.train!r}")
        if cfg.attn_implementation not in ("auto", "sdpa", "flash_attention_2", "eager"):
            raise ValueError(f"{where}: attn_implementation must be auto, sdpa, flash_attention_2 or eager")
        return cfg


# Otter's LoRA for Fuyu (otter-reference 4.3): r 64, alpha 32, dropout 0.05, on attention, MLP and lm_head
OTTER_FUYU_LORA = {"r": 64, "lora_alpha": 32, "lora_dropout": 0.05,
                   "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"]}


def attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn imports and CUDA is present, else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_otterhd(cfg: OtterHDConfig, vocab_size: int | None = None, image_token_id: int | None = None):
    """A FuyuForCausalLM: from the local checkpoint, or randomly initialised from `text_config`."""
    from transformers import FuyuConfig, FuyuForCausalLM

    impl = attn_implementation(cfg.attn_implementation)
    dtype = getattr(torch, cfg.dtype)
    if cfg.checkpoint:
        if not os.path.isdir(cfg.checkpoint):
            raise FileNotFoundError(f"OtterHD checkpoint folder not found: {cfg.checkpoint} (a local copy is needed)")
        model = FuyuForCausalLM.from_pretrained(cfg.checkpoint, local_files_only=True, dtype=dtype,
                                                attn_implementation=impl)
        if vocab_size and vocab_size > model.config.text_config.vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        vocab = cfg.vocab_size or vocab_size
        image_token = cfg.image_token_id if cfg.image_token_id is not None else image_token_id
        if vocab is None or image_token is None:
            raise ValueError("random init needs vocab_size and image_token_id (from the config or the tokenizer)")
        fuyu = FuyuConfig(text_config={"model_type": "persimmon", "vocab_size": vocab, **(cfg.text_config or {})},
                          image_token_id=image_token, patch_size=30, num_channels=3)
        fuyu._attn_implementation = impl
        model = FuyuForCausalLM(fuyu).to(dtype)
    if cfg.train == "lora":
        from .lora import inject_lora

        inject_lora(model, **{**OTTER_FUYU_LORA, **(cfg.lora or {})})
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU: 6 * N + 12 * L * d * T.

    N counts every parameter a token's compute touches (all but the input embedding table; the patch
    projection is included, slightly over-counting text tokens), L the layers, d the hidden size, T the
    (packed) sequence length: the PaLM appendix-B estimate, attention scores and values included.
    """
    text = model.config.text_config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6.0 * n + 12.0 * text.num_hidden_layers * text.hidden_size * seq_len


def otterhd_inputs(batch: dict, model=None) -> dict:
    """A loader batch (torch tensors) -> FuyuForCausalLM keyword arguments.

    With flash-attn (`model` using flash_attention_2) no mask is built: transformers reads the packed samples'
    boundaries from the restarting `position_ids` and calls the varlen kernel (pads, all at position 0, become
    one-token sequences with no loss). Not exercised here: flash-attn cannot be built on the CPU machines.
    """
    patches = batch["image_patches"]
    flash = model is not None and str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
    return {
        "input_ids": batch["input_ids"],
        "pixel_values": patches[None] if patches.shape[0] else None,  # (1, P, 2700): scattered in order
        "position_ids": batch["position_ids"],
        "attention_mask": None if flash else block_causal_mask(batch["segment_ids"]),
        "labels": batch["labels"],
    }


def otterhd_forward(model, batch: dict):
    """Packed forward of a FuyuForCausalLM on a loader batch; returns the transformers output (loss, logits)."""
    return model(**otterhd_inputs(batch, model))
