"""AdamW parameter groups and the learning-rate schedule (counted in optimizer steps).

Weight decay goes to the weight matrices of Linear and Conv layers that train (requires_grad), and to nothing
else: not biases, norms, Flamingo's tanh gates, the perceiver's learned latents, or embedding tables
(token embeddings; a weight shared between an embedding and a Linear, as in tied LM heads, counts as an
embedding). `decay_embeddings: true` adds the embedding tables and other non-Linear matrices. This departs
from Otter, which decays only `gated_cross_attn_layer` weights and so never decays Fuyu at all (reference 8.2).

Schedule (multiplier of the peak lr; s = optimizer step, 0-based, W warmup steps, S total steps):
    warmup   s < W:  (s + 1) / W           (the first step already moves; reaches 1 at s = W - 1)
    cosine          min + (1 - min) * (1 + cos(pi * p)) / 2,  p = (s - W) / max(1, S - 1 - W) in [0, 1]
    linear          min + (1 - min) * (1 - p)
    constant        1
so the last step (s = S - 1) runs at lr * min_lr_ratio. The scheduler is stepped once per optimizer step
(DeepSpeed steps it at each gradient-accumulation boundary), never per micro-batch as Otter does.
"""

from __future__ import annotations

import math

import torch


def _numel(p: torch.Tensor) -> int:
    """Elements of the full parameter, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def _ndim(p: torch.Tensor) -> int:
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> tuple[list, dict]:
    """[{params, weight_decay}, {params, weight_decay: 0}] over requires_grad params, and a report. Counts and
    shapes are the full parameters', also under ZeRO-3 partitioning (ds_numel, ds_shape)."""
    linear_weights, embedding_weights = set(), set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            embedding_weights.add(id(w))
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            linear_weights.add(id(w))
    decay, no_decay = [], []
    names = {"decay": [], "no_decay": []}
    n_frozen = 0
    for name, p in model.named_parameters():  # shared parameters appear once
        if not p.requires_grad:
            n_frozen += _numel(p)
            continue
        if id(p) in embedding_weights:
            d = decay_embeddings
        elif id(p) in linear_weights:
            d = True
        else:
            d = decay_embeddings and _ndim(p) >= 2  # learned queries (perceiver latents) and the like
        (decay if d else no_decay).append(p)
        names["decay" if d else "no_decay"].append(name)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad)")
    report = {"trainable": sum(_numel(p) for g in groups for p in g["params"]), "frozen": n_frozen,
              "decay": sum(_numel(p) for p in decay), "no_decay": sum(_numel(p) for p in no_decay),
              "decay_names": names["decay"], "no_decay_names": names["no_decay"]}
    return groups, report


def warmup_steps(total: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    w = round(warmup_ratio * total) if warmup_ratio is not None else warmup_steps
    return max(0, min(w, total))


def lr_multiplier(step: int, total: int, warmup: int, name: str, min_ratio: float = 0.0) -> float:
    """The schedule above, at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if name == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    raise ValueError(f"unknown schedule {name!r}")


def make_scheduler(optimizer, total: int, warmup: int, name: str, min_ratio: float):
    """A LambdaLR: picklable state (last_epoch), stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, warmup, name, min_ratio))
