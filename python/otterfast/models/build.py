"""One door to the models for the trainer, the generator and the benchmarks.

    cfg = load_model_config("configs/models/otterhd-tiny.yaml")     # or a dict with the same keys
    model = build_model(cfg, tok)            # tok: the prepared index's tokenizer facts (meta["tokenizer"])
    set_activation_checkpointing(model, "decoder")                  # none | decoder | all
    loss_sum, n = batch_loss(model, batch)   # a loader batch as torch tensors; summed loss over n labelled tokens
    flops = flops_per_token(model, seq_len)  # training FLOPs per token, for MFU
    u = unloaded(cfg, tok)                   # a checkpoint's model split at the weight load (ZeRO-3), or None

`architecture` in the YAML picks the model: `otterhd` (Fuyu) or `otter` (Flamingo), through one table from kind
to its functions (`KINDS`). Trainable parameters are chosen by the builder from the config's `train` key
(Otter's defaults unless told otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from . import attention, otter, otter_build, otterhd
from .model_yaml import local_checkpoint

CHECKPOINTING = ("none", "decoder", "all")


@dataclass(frozen=True)
class Unloaded:
    """A checkpoint's model as `build` makes it, split at the weight load: for ZeRO-3 construction, which builds
    the modules partitioned (deepspeed.zero.Init) and streams the weights in itself (train/zero3_init.py)."""

    checkpoint: str  # the local folder: config.json + *.safetensors
    construct: Callable[[], torch.nn.Module]  # the architecture from the checkpoint's config, no weight read
    finish: Callable[[torch.nn.Module], None]  # what `build` does after the load (LoRA, trainable flags, token ids)


@dataclass(frozen=True)
class ModelKind:
    config: type  # the model YAML's dataclass
    model: type  # the torch module class it builds
    build: Callable  # (cfg, tok) -> model
    forward: Callable  # (model, batch) -> transformers output with logits (B, T, vocab)
    flops_per_token: Callable  # (model, seq_len) -> float
    checkpointing: Callable  # (model, mode) -> None
    unloaded: Callable | None = None  # (cfg, tok) -> Unloaded, or None when cfg loads no checkpoint


def _otterhd_model_class():
    from transformers import FuyuForCausalLM

    return FuyuForCausalLM


def _from_config(cls, conf, folder: str, **kw):
    """`cls` from `conf` as from_pretrained(folder) builds it, without reading or initialising weights (the
    caller's context decides what an empty tensor is) and with the folder's generation config."""
    from transformers import GenerationConfig

    conf.name_or_path = folder
    model = cls._from_config(conf, **kw)
    if model.can_generate() and os.path.exists(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


# The Unloaded halves of build_otterhd / build_otter (their `checkpoint` branch): the vocabulary is grown in the
# config before construction instead of by resize_token_embeddings after the load (the loader fills the new rows).
def _otterhd_unloaded(cfg, tok) -> Unloaded | None:
    if not cfg.checkpoint:
        return None
    from transformers import FuyuConfig, FuyuForCausalLM

    folder = local_checkpoint(cfg.checkpoint, "OtterHD")

    def construct():
        conf = FuyuConfig.from_pretrained(folder, local_files_only=True)
        text = conf.get_text_config()
        text.vocab_size = max(text.vocab_size, tok["vocab_size"])
        return _from_config(FuyuForCausalLM, conf, folder, dtype=getattr(torch, cfg.dtype),
                            attn_implementation=attention.resolve(cfg.attn_implementation))

    return Unloaded(folder, construct, lambda model: otterhd.finish_otterhd(model, cfg))


def _otter_unloaded(cfg, tok) -> Unloaded | None:
    if not cfg.checkpoint or cfg.init_from:  # init_from loads into whole modules: built whole, then partitioned
        return None
    folder = local_checkpoint(cfg.checkpoint, "Otter")
    doc = dict(cfg.otter)
    lora = doc.pop("lora_config", None)
    if lora:
        doc["lora_config"] = None

    def construct():
        conf = otter.OtterConfig.from_pretrained(folder, local_files_only=True, **doc)
        conf.text_config.vocab_size = max(conf.text_config.vocab_size, tok["vocab_size"])
        return _from_config(otter.OtterForConditionalGeneration, conf, folder, dtype=getattr(torch, cfg.dtype))

    return Unloaded(folder, construct, lambda model: otter_build.finish_otter(model, cfg, tok, lora))


KINDS: dict[str, ModelKind] = {
    "otterhd": ModelKind(
        config=otterhd.OtterHDConfig, model=_otterhd_model_class(),
        build=lambda cfg, tok: otterhd.build_otterhd(cfg, vocab_size=tok["vocab_size"],
                                                     image_token_id=tok["fuyu_placeholder_id"]),
        # the loss is batch_loss's (summed): logits only
        forward=lambda model, batch: otterhd.otterhd_forward(model, batch, with_loss=False),
        flops_per_token=otterhd.flops_per_token, checkpointing=otterhd.set_activation_checkpointing,
        unloaded=_otterhd_unloaded),
    "otter": ModelKind(
        config=otter_build.OtterModelConfig, model=otter.OtterForConditionalGeneration,
        build=otter_build.build_otter, forward=otter.otter_forward, flops_per_token=otter_build.flops_per_token,
        checkpointing=lambda model, mode: model.set_activation_checkpointing(mode), unloaded=_otter_unloaded),
}


def kind_of(model: torch.nn.Module) -> ModelKind:
    for kind in KINDS.values():
        if isinstance(model, kind.model):
            return kind
    raise TypeError(f"not an otterfast model: {type(model).__name__}")


def load_model_config(src):
    """A model YAML path (or an already-loaded dict) -> its config dataclass; unknown keys are errors."""
    if isinstance(src, str):
        with open(src) as f:
            doc = yaml.safe_load(f) or {}
        where = src
    else:
        doc, where = dict(src), "model config"
    arch = doc.get("architecture")
    if arch not in KINDS:
        raise ValueError(f"{where}: architecture must be one of {', '.join(KINDS)}, got {arch!r}")
    return KINDS[arch].config.from_dict(doc, where)


def build_model(cfg, tok: dict) -> torch.nn.Module:
    """The model of `cfg`, its vocabulary fitted to the prepared index's tokenizer facts `tok`."""
    return KINDS[cfg.architecture].build(cfg, tok)


def unloaded(cfg, tok: dict) -> Unloaded | None:
    """`build_model(cfg, tok)` split at its weight load, or None when the model loads no checkpoint."""
    hook = KINDS[cfg.architecture].unloaded
    return hook(cfg, tok) if hook is not None else None


def model_outputs(model, batch: dict):
    """Packed forward of either model on a loader batch (torch tensors) -> transformers output with logits."""
    return kind_of(model).forward(model, batch)


def batch_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count) of one packed batch; with a
    `loss_weight` (B, T) in the batch, each token's loss is multiplied by the weight of its (target) position.

    A sum, so that the trainer can divide by the number of labelled tokens of the whole optimizer step (over
    accumulation micro-steps and ranks) and every token weighs the same. The shift never crosses samples with
    a loss: each sample's first token is unlabelled.
    """
    logits = model_outputs(model, batch).logits
    labels = batch["labels"][:, 1:]
    n = int((labels != -100).sum())
    if batch.get("loss_weight") is None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum")
        return loss, n
    # per-token loss multipliers (a pretraining source's loss_weight, data/shards.py token_loss_weights)
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                reduction="none")
    return (per_token * batch["loss_weight"][:, 1:].flatten().float()).sum(), n


def flops_per_token(model, seq_len: int) -> float:
    return kind_of(model).flops_per_token(model, seq_len)


def set_activation_checkpointing(model, mode: str) -> None:
    """`none`, `decoder` (each decoder layer, with Otter's cross-attention block) or `all` (also Otter's
    perceiver blocks, and CLIP's layers when they train): recomputed in backward instead of kept."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    kind_of(model).checkpointing(model, mode)
