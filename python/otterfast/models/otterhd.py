"""OtterHD: Fuyu (transformers' FuyuForCausalLM, Persimmon decoder) on otterfast's packed batches.

Fuyu has no vision encoder: 30x30x3 pixel patches are projected by one linear layer and scattered into the
token embeddings at the image-placeholder tokens (transformers 5 places them by `config.image_token_id`, in
order, which is the loaders' layout order). A packed row is made exact by two inputs: `position_ids` that
restart at every sample and a block-diagonal causal mask, so a packed forward equals each sample's own
forward (tests/test_otterhd.py). The causal shift of the loss never crosses samples with a loss: the first
token of every sample (an image token or BOS) is unlabelled.
"""

from __future__ import annotations

import torch

from .packing import block_causal_mask


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
