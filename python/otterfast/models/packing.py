"""Packed rows: where each sample starts and ends, in the forms the attention paths need.

A packed row holds several samples (the loaders' `segment_ids`: 0, 1, ... per sample, -1 on padding); each
sample attends causally to itself only, and a padding token to itself only (pads carry no loss; a query with
nothing to attend to would give NaN).

- `PackedLayout` (the fast paths): the samples of a batch as segments of the flattened B*T tokens: `cu_seqlens`
  for flash-attn's varlen kernels, and groups of similar-length segments gathered into (n, L) blocks for SDPA, so
  attention costs about the sum of the squared sample lengths and nothing of size T x T is built.
- `block_causal_mask` / `additive_block_causal_mask` (the reference): the same rule as a dense (B, 1, T, T) mask.
  Every fast path is tested against it (tests/test_packed_attention.py).
- `flatten_rows`: B rows as one row of B*T tokens, the layout transformers' own flash_attention_2 path reads.
- `use_layout` / `current_layout`: the layout of the forward in progress, for attention code that transformers
  calls without our keyword arguments (MPT's attention, the mask builder).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np
import torch


# ------------------------------------------------------------------------------------------- reference masks
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


# ------------------------------------------------------------------------------------------------ the layout
# Segments are grouped for SDPA while padding every segment of a group to the group's longest costs at most this
# much more than the segments alone (in squared lengths); 1.0 is one SDPA call per distinct length. Measured
# (2 CPU threads, 8 heads x 64, fp32, forward + backward, log-normal sample lengths, medians of 4): of 1.0, 1.15,
# 1.3, 1.6 and 2.0, 1.3 was fastest at 2k tokens (87 ms vs 95 ms for 1.0, 117 ms for 2.0) and at 8k (463 ms vs 551
# and 605), with 7 SDPA calls instead of 21 at 8k.
GROUP_SLACK = 1.3


@dataclass
class SegmentGroup:
    """Segments of one SDPA call: `index` (n, L) token positions into the flattened B*T tokens, each segment
    padded on the right to L (with position 0: a causal query never reads a key after itself, so the padding
    keys are never attended by a real query and the padding queries' outputs are dropped)."""

    index: torch.Tensor
    length: int


@dataclass
class PackedLayout:
    """The segments of one batch of B rows of T tokens (flattened to N = B*T, row-major).

    Every token is in exactly one segment: a sample's tokens (contiguous in its row), or a padding token alone.
    `gather` maps each token to its slot in the concatenated group outputs (the inverse of the groups' gathers).
    """

    batch: int
    seq_len: int
    cu_seqlens: torch.Tensor  # (n_segments + 1,) int32: flash-attn's varlen boundaries
    max_seqlen: int
    groups: list[SegmentGroup]
    gather: torch.Tensor  # (N,) int64

    @staticmethod
    def from_segment_ids(segment_ids: torch.Tensor, slack: float = GROUP_SLACK) -> "PackedLayout":
        B, T = segment_ids.shape
        seg = segment_ids.detach().to("cpu", torch.long).numpy().reshape(-1)
        N = seg.size
        start = np.ones(N, dtype=bool)
        if N:
            start[1:] = seg[1:] != seg[:-1]
            start[::T] = True  # a row never continues the previous row's last sample
            start |= seg < 0  # a padding token is its own segment
        starts = np.flatnonzero(start)
        lengths = np.diff(np.append(starts, N))
        # the loaders keep each sample contiguous; the dense mask would join two runs of one id, this would not
        real = seg[starts] >= 0
        keys = (starts[real] // max(T, 1)) * (int(seg.max(initial=0)) + 1) + seg[starts[real]]
        if np.unique(keys).size != keys.size:
            raise ValueError("segment_ids: a sample's tokens must be contiguous within its row")
        cu = np.zeros(len(starts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        groups, gather = _group(starts, lengths, N, slack)
        dev = segment_ids.device
        return PackedLayout(B, T, torch.from_numpy(cu).to(dev), int(lengths.max(initial=0)),
                            [SegmentGroup(torch.from_numpy(ix).to(dev), L) for ix, L in groups],
                            torch.from_numpy(gather).to(dev))


def _group(starts: np.ndarray, lengths: np.ndarray, n_tokens: int, slack: float):
    """Greedy, longest first: a group takes the next (shorter) segment while n * L_max^2 <= slack * sum(L^2)."""
    order = np.argsort(-lengths, kind="stable")
    groups: list[tuple[np.ndarray, int]] = []
    gather = np.zeros(n_tokens, dtype=np.int64)
    offset, i = 0, 0
    while i < len(order):
        L = int(lengths[order[i]])
        j, sq = i + 1, L * L
        while j < len(order):
            l = int(lengths[order[j]])
            if (j - i + 1) * L * L > slack * (sq + l * l):
                break
            sq += l * l
            j += 1
        members = order[i:j]
        col = np.arange(L)
        index = starts[members][:, None] + col[None, :]
        valid = col[None, :] < lengths[members][:, None]
        slots = offset + np.arange(len(members))[:, None] * L + col[None, :]
        gather[index[valid]] = slots[valid]
        groups.append((np.where(valid, index, 0), L))
        offset += len(members) * L
        i = j
    return groups, gather


# --------------------------------------------------------------------------------- the forward's current layout
_CURRENT: contextvars.ContextVar[PackedLayout | None] = contextvars.ContextVar("otterfast_packed_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: PackedLayout | None):
    token = _CURRENT.set(layout)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_layout() -> PackedLayout | None:
    return _CURRENT.get()


# ----------------------------------------------------------------------------------------------- flat rows
def flatten_rows(batch: dict, keys: tuple[str, ...]) -> dict:
    """A batch of B packed rows as one row of B*T tokens: flash-attn's varlen path (which transformers takes only
    for a batch of one row, reading sample boundaries from the restarting position_ids). Segment ids are made
    unique across rows, so masks and media counts never join the last sample of a row to the next row's first."""
    out = dict(batch)
    B, T = batch["input_ids"].shape
    for k in keys:
        out[k] = batch[k].reshape(1, B * T)
    seg = batch["segment_ids"].long()
    offset = torch.arange(B, device=seg.device)[:, None] * T
    out["segment_ids"] = torch.where(seg >= 0, seg + offset, seg).reshape(1, B * T)
    return out
