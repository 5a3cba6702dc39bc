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
from dataclasses import dataclass, field, fields

import torch
import yaml

from .packing import block_causal_mask


@dataclass
class OtterHDConfig:
    """A model YAML of configs/models/ (architecture: otterhd)."""

    architecture: str = "otterhd"
    checkpoint: str | None = None  # a local Fuyu checkpoint folder; None: random init from text_config
    vocab_size: int | None = None  # random init: default from the tokenizer
    image_token_id: int | None = None  # random init: default from the tokenizer's |SPEAKER| id
    text_config: dict | None = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "OtterHDConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, path)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "model config") -> "OtterHDConfig":
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - valid)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(valid)}")
        cfg = cls(**doc)
        if cfg.architecture != "otterhd":
            raise ValueError(f"{where}: architecture {cfg.architecture!r} is not otterhd")
        return cfg


def build_otterhd(cfg: OtterHDConfig, vocab_size: int | None = None, image_token_id: int | None = None):
    """A FuyuForCausalLM: from the local checkpoint, or randomly initialised from `text_config`."""
    from transformers import FuyuConfig, FuyuForCausalLM

    if cfg.checkpoint:
        if not os.path.isdir(cfg.checkpoint):
            raise FileNotFoundError(f"OtterHD checkpoint folder not found: {cfg.checkpoint} (a local copy is needed)")
        model = FuyuForCausalLM.from_pretrained(cfg.checkpoint, local_files_only=True)
        if vocab_size and vocab_size > model.config.text_config.vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    vocab = cfg.vocab_size or vocab_size
    image_token = cfg.image_token_id if cfg.image_token_id is not None else image_token_id
    if vocab is None or image_token is None:
        raise ValueError("random init needs vocab_size and image_token_id (from the config or the tokenizer)")
    fuyu = FuyuConfig(text_config={"model_type": "persimmon", "vocab_size": vocab, **(cfg.text_config or {})},
                      image_token_id=image_token, patch_size=30, num_channels=3)
    return FuyuForCausalLM(fuyu)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU: 6 * N + 12 * L * d * T.

    N counts every parameter a token's compute touches (all but the input embedding table; the patch
    projection is included, slightly over-counting text tokens), L the layers, d the hidden size, T the
    (packed) sequence length: the PaLM appendix-B estimate, attention scores and values included.
    """
    text = model.config.text_config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6.0 * n + 12.0 * text.num_hidden_layers * text.hidden_size * seq_len


def otterhd_inputs(batch: dict) -> dict:
    """A loader batch (torch tensors) -> FuyuForCausalLM keyword arguments."""
    patches = batch["image_patches"]
    return {
        "input_ids": batch["input_ids"],
        "pixel_values": patches[None] if patches.shape[0] else None,  # (1, P, 2700): scattered in order
        "position_ids": batch["position_ids"],
        "attention_mask": block_causal_mask(batch["segment_ids"]),
        "labels": batch["labels"],
    }


def otterhd_forward(model, batch: dict):
    """Packed forward of a FuyuForCausalLM on a loader batch; returns the transformers output (loss, logits)."""
    return model(**otterhd_inputs(batch))
