"""OtterHD: Fuyu (transformers' FuyuForCausalLM, Persimmon decoder) on otterfast's packed batches.

Fuyu has no vision encoder: 30x30x3 pixel patches are projected by one linear layer and scattered into the
token embeddings at the image-placeholder tokens (transformers 5 places them by `config.image_token_id`, in
order, which is the loaders' layout order). A packed row is made exact by two inputs: `position_ids` that
restart at every sample and attention within each sample only (models/attention.py's packed attention from the
row's layout; the dense block-diagonal causal mask with `attn_implementation: sdpa`), so a packed forward equals
each sample's own forward (tests/test_otterhd.py, tests/test_packed_attention.py). The causal shift of the loss never crosses samples with a loss: the first
token of every sample (an image token or BOS) is unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import attention
from .model_yaml import ModelYaml, from_yaml_dict, local_checkpoint
from .packing import PackedLayout, additive_block_causal_mask, flatten_rows, use_layout


@dataclass
class OtterHDConfig(ModelYaml):
    """A model YAML of configs/models/ (architecture: otterhd)."""

    architecture: str = "otterhd"
    checkpoint: str | None = None  # a local Fuyu checkpoint folder; None: random init from text_config
    vocab_size: int | None = None  # random init: default from the tokenizer
    image_token_id: int | None = None  # random init: default from the tokenizer's |SPEAKER| id
    text_config: dict | None = field(default_factory=dict)
    train: str = "full"  # "full": every parameter (as Otter trains Fuyu); "lora": adapters only (+ lm_head's)
    lora: dict | None = None  # {r, lora_alpha, lora_dropout, target_modules}; default Otter's: r 64, alpha 32, ...
    dtype: str = "float32"
    # "auto" / "packed": per-sample attention, never T x T (flash-attn varlen when installed and on CUDA, else SDPA
    # over groups of samples; models/attention.py); "sdpa": the dense block-diagonal mask (the reference);
    # "flash_attention_2": transformers' own varlen path from the restarting position_ids; "eager".
    attn_implementation: str = "auto"

    @classmethod
    def from_dict(cls, doc: dict, where: str = "model config") -> "OtterHDConfig":
        cfg = from_yaml_dict(cls, doc, where, "otterhd")
        if cfg.train not in ("full", "lora"):
            raise ValueError(f"{where}: train must be 'full' or 'lora', got {cfg.train!r}")
        if cfg.attn_implementation not in attention.IMPLEMENTATIONS:
            raise ValueError(f"{where}: attn_implementation must be one of {', '.join(attention.IMPLEMENTATIONS)}")
        return cfg


# Otter's LoRA for Fuyu (otter-reference 4.3): r 64, alpha 32, dropout 0.05, on attention, MLP and lm_head
OTTER_FUYU_LORA = {"r": 64, "lora_alpha": 32, "lora_dropout": 0.05,
                   "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"]}


def build_otterhd(cfg: OtterHDConfig, vocab_size: int | None = None, image_token_id: int | None = None):
    """A FuyuForCausalLM: from the local checkpoint, or randomly initialised from `text_config`."""
    from transformers import FuyuConfig, FuyuForCausalLM

    impl = attention.resolve(cfg.attn_implementation)
    dtype = getattr(torch, cfg.dtype)
    if cfg.checkpoint:
        model = FuyuForCausalLM.from_pretrained(local_checkpoint(cfg.checkpoint, "OtterHD"), local_files_only=True,
                                                dtype=dtype,
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
        # transformers < 5.2x sizes the patch projection by FuyuConfig's own `hidden_size` (default 4096), not
        # text_config's: keep the two equal (found on transformers 5.17, the GPU image's version).
        fuyu.hidden_size = fuyu.text_config.hidden_size
        fuyu._attn_implementation = impl
        model = FuyuForCausalLM(fuyu).to(dtype)
    finish_otterhd(model, cfg)
    return model


def finish_otterhd(model, cfg: OtterHDConfig) -> None:
    """What follows the weights, however they were loaded: LoRA adapters and the trainable flags."""
    if cfg.train == "lora":
        from .lora import inject_lora

        inject_lora(model, **{**OTTER_FUYU_LORA, **(cfg.lora or {})})
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU: 6 * N (+ 4 per frozen weight) + 12 * L * d * T.

    N counts every parameter a token's compute touches (all but the input embedding table; the patch
    projection is included, slightly over-counting text tokens), L the layers, d the hidden size, T the
    (packed) sequence length: the PaLM appendix-B estimate, attention scores and values included.
    """
    text = model.config.text_config
    emb = model.get_input_embeddings().weight
    # 6 FLOPs per trained weight, 4 per frozen one (LoRA's base weights: forward and input gradient only)
    n = sum((6.0 if p.requires_grad else 4.0) * p.numel() for p in model.parameters() if p is not emb)
    return n + 12.0 * text.num_hidden_layers * text.hidden_size * seq_len


def set_activation_checkpointing(model, mode: str) -> None:
    """`none`; `decoder` or `all` (the same here: the patch projection is one linear layer): every decoder layer
    keeps only its input and is recomputed in backward (transformers' checkpointing, non-reentrant; the packed
    layout travels in the layer's keyword arguments, so the recomputation sees it)."""
    if mode not in ("none", "decoder", "all"):
        raise ValueError(f"activation checkpointing must be none, decoder or all, got {mode!r}")
    if mode == "none":
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def otterhd_inputs(batch: dict, model, flatten: bool | None = None) -> dict:
    """A loader batch (torch tensors) -> FuyuForCausalLM keyword arguments, with the embeddings built here.

    Token embeddings, then the patch projection (on one blank patch when the batch has no image), scattered at
    the loader's patch indices: every rank calls the same modules in the same order whatever its batch holds,
    which ZeRO-3 needs (each call gathers the module's shards collectively; a rank skipping the projection, or
    calling it later, pairs its all-gathers with another module's). Attention: with the packed implementation
    (the default) a `packed_layout` and no mask; with sdpa / eager the additive block-diagonal causal mask; with
    transformers' flash_attention_2 (`flatten`, default: when the model uses it) the rows become one and no mask
    is built: transformers reads the samples' boundaries
    from the restarting `position_ids` and calls the varlen kernel (pads, at position 0, become one-token
    sequences with no loss). The flash path is not exercised here: flash-attn cannot be built on the CPU machines.
    """
    flash = attention.uses_flash(model.config)
    flatten = flash if flatten is None else flatten
    if flatten:
        batch = flatten_rows(batch, ("input_ids", "position_ids", "labels", "image_patches_indices"))
    ids, pidx = batch["input_ids"], batch["image_patches_indices"]
    emb = model.get_input_embeddings()(ids)
    proj = model.get_submodule("model.vision_embed_tokens")
    patches = batch["image_patches"]
    if patches.shape[0]:
        sel = pidx >= 0
        if int(sel.sum()) != patches.shape[0] or int(pidx.max()) != patches.shape[0] - 1:
            raise ValueError(f"{int(sel.sum())} patch positions for {patches.shape[0]} patches")
        feats = proj(patches.to(proj.weight.dtype)).to(emb.dtype)
        emb = emb.index_put(sel.nonzero(as_tuple=True), feats[pidx[sel]])
    else:
        emb = emb + 0.0 * proj(emb.new_zeros(1, proj.in_features, dtype=proj.weight.dtype)).sum().to(emb.dtype)
    inputs = {"inputs_embeds": emb, "position_ids": batch["position_ids"], "attention_mask": None,
              "labels": batch["labels"], "use_cache": False}  # a packed batch is never continued: no KV cache
    if attention.uses_packed(model.config):  # per-sample attention from the layout: no (T, T) mask
        inputs["packed_layout"] = PackedLayout.from_segment_ids(batch["segment_ids"])
    elif not flash:
        inputs["attention_mask"] = additive_block_causal_mask(batch["segment_ids"], emb.dtype)
    return inputs


def otterhd_forward(model, batch: dict, flatten: bool | None = None, with_loss: bool = True):
    """Packed forward of a FuyuForCausalLM on a loader batch; returns the transformers output (loss, logits),
    logits shaped (B, T, vocab) as the batch. `with_loss=False`: logits only."""
    inputs = otterhd_inputs(batch, model, flatten)
    if not with_loss:
        inputs.pop("labels")
    with use_layout(inputs.get("packed_layout")):  # for the mask builder: no mask while packed
        out = model(**inputs)
    out.logits = out.logits.view(*batch["input_ids"].shape, -1)
    return out
