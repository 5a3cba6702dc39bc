"""Eager references with OpenFlamingo's semantics: the ground truth for tests and the baseline for benchmarks.

These are deliberately written the way OpenFlamingo / Otter write them (einsum over every latent of every media,
a dense text-to-media mask, softmax, then zeroing the rows without media), so that they are both the numerical
ground truth and the "what the model does today" baseline in `benches/xattn.py`.
"""

from __future__ import annotations

import math

import torch


def masked_media_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, d); k, v (B, H, M, L, d); text_time (B, T) -> (B, H, T, d).

    Row t of sample b attends to the L latents of media `text_time[b, t]` (1-based) only. A row with text_time 0
    (no media yet) or > M (a media that is not there) gets exactly 0, with exactly zero gradients.
    """
    B, H, T, d = q.shape
    M, L = k.shape[2], k.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if M * L == 0:
        # No latents at all: every row is "no media". Multiplying keeps q in the graph (zero gradient).
        return q * 0.0
    kf = k.reshape(B, H, M * L, d)
    vf = v.reshape(B, H, M * L, d)
    sim = torch.einsum("bhid,bhjd->bhij", q * scale, kf)  # (B, H, T, M*L): the tensor the fused kernel avoids
    media_of_key = torch.arange(M, device=q.device).repeat_interleave(L) + 1
    allowed = text_time[:, None, :, None] == media_of_key[None, None, None, :]  # (B, 1, T, M*L)
    # OpenFlamingo's finite fill: a row with no allowed key becomes a uniform softmax, zeroed below.
    sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    has_media = (text_time >= 1) & (text_time <= M)
    attn = attn.masked_fill(~has_media[:, None, :, None], 0.0)
    return torch.einsum("bhij,bhjd->bhid", attn, vf)


def gated_residual_linear_ref(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                              gate: torch.Tensor) -> torch.Tensor:
    """x + tanh(gate) * (a @ weight.T): Otter's `attn(x) * attn_gate.tanh() + x` with attn's bias-free to_out."""
    return x + gate.tanh() * torch.nn.functional.linear(a, weight)
