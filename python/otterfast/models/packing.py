"""Attention over packed rows: each sample attends causally to itself only.

A packed row holds several samples (the loaders' `segment_ids`: 0, 1, ... per sample, -1 on padding). With
SDPA (or any backend taking a mask) the mask is block-diagonal causal. Padding rows attend to themselves
only: a query with nothing to attend to gives NaN in SDPA, and pads carry no loss anyway.
"""

from __future__ import annotations

import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool mask, True where a query may attend to a key."""
    B, T = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    pad = segment_ids < 0
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    mask = torch.where(pad[:, :, None], eye, same & causal & ~pad[:, None, :])
    return mask[:, None]


def additive_block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same mask as an additive float (B, 1, T, T): 0 where allowed, the dtype's minimum elsewhere.

    One format every transformers attention path reads right when handed a prepared 4-D mask: SDPA and eager
    add it to the scores, and MPT (which masks where `mask.bool()` is True) sees exactly the blocked entries.
    """
    allowed = block_causal_mask(segment_ids)
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
