"""One door to the models for the trainer, the generator and the benchmarks.

    cfg = load_model_config("configs/models/otterhd-tiny.yaml")     # or a dict with the same keys
    model = build_model(cfg, tok)            # tok: the prepared index's tokenizer facts (meta["tokenizer"])
    loss_sum, n = batch_loss(model, batch)   # a loader batch as torch tensors; summed loss over n labelled tokens
    flops = flops_per_token(model, seq_len)  # training FLOPs per token, for MFU

`architecture` in the YAML picks the model: `otterhd` (Fuyu) or `otter` (Flamingo). Trainable parameters are
chosen by the builder from the config's `train` key (Otter's defaults unless told otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

from . import otterhd


def load_model_config(src):
    """A model YAML path (or an already-loaded dict) -> its config dataclass; unknown keys are errors."""
    if isinstance(src, str):
        with open(src) as f:
            doc = yaml.safe_load(f) or {}
        where = src
    else:
        doc, where = dict(src), "model config"
    arch = doc.get("architecture")
    if arch == "otterhd":
        return otterhd.OtterHDConfig.from_dict(doc, where)
    if arch == "otter":
        from . import otter

        return otter.OtterModelConfig.from_dict(doc, where)
    raise ValueError(f"{where}: architecture must be 'otter' or 'otterhd', got {arch!r}")


def build_model(cfg, tok: dict) -> torch.nn.Module:
    """The model of `cfg`, its vocabulary fitted to the prepared index's tokenizer facts `tok`."""
    if isinstance(cfg, otterhd.OtterHDConfig):
        return otterhd.build_otterhd(cfg, vocab_size=tok["vocab_size"], image_token_id=tok["fuyu_placeholder_id"])
    from . import otter

    return otter.build_otter(cfg, tok)


def model_outputs(model, batch: dict):
    """Packed forward of either model on a loader batch (torch tensors) -> transformers output with logits."""
    if model.__class__.__name__ == "FuyuForCausalLM":
        return otterhd.otterhd_forward(model, batch, with_loss=False)  # the loss is batch_loss's (summed)
    from . import otter

    return otter.otter_forward(model, batch)


def batch_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count) of one packed batch.

    A sum, so that the trainer can divide by the number of labelled tokens of the whole optimizer step (over
    accumulation micro-steps and ranks) and every token weighs the same. The shift never crosses samples with
    a loss: each sample's first token is unlabelled.
    """
    logits = model_outputs(model, batch).logits
    labels = batch["labels"][:, 1:]
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, n


def flops_per_token(model, seq_len: int) -> float:
    if model.__class__.__name__ == "FuyuForCausalLM":
        return otterhd.flops_per_token(model, seq_len)
    from . import otter

    return otter.flops_per_token(model, seq_len)
