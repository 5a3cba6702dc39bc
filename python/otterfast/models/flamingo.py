"""The Flamingo parts of Otter: the Perceiver resampler and the gated cross-attention block.

Module and parameter names are Otter's checkpoint keys (otter-reference 3.6: `perceiver.layers.N.to_q`,
`...feed_forward.1`, `gated_cross_attn_layer.attn.to_kv`, `attn_gate`, `ff_gate`, ...); the computation is
OpenFlamingo's (tests/test_flamingo.py compares both on the same weights). All linear layers are bias-free.

Masking: `text_time[b, t]` is the 1-based index of the media a token attends to (its most recent `<image>`),
0 for none. A token attends only to that media's latents; with 0 its cross-attention output is exactly zero.
`text_time_from_ids` computes it from `<image>` tokens, restarting at every sample of a packed row, so a sample
never sees the previous sample's image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult * dim) -> GELU -> Linear(mult * dim, dim), bias-free (keys 0, 1, 3)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverBlock(nn.Module):
    """Latents attend to [media; latents]; then a feed-forward. Residuals use the un-normalised latents."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.feed_forward = feed_forward(dim, ff_mult)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, N, D) media tokens; latents: (B, T, L, D); token_mask: (B, T, N) False on padding frames
        xn, ln = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(ln)
        k, v = self.to_kv(torch.cat([xn, ln], dim=-2)).chunk(2, dim=-1)
        B, T = q.shape[:2]

        def heads(t):  # (B, T, n, H*d) -> (B, T, H, n, d)
            return t.view(B, T, t.shape[2], self.heads, self.dim_head).transpose(2, 3)

        mask = None
        if token_mask is not None:  # keys: [media tokens (masked on padding frames); latents (always)]
            keep = torch.ones(*token_mask.shape[:2], ln.shape[2], dtype=torch.bool, device=x.device)
            mask = torch.cat([token_mask, keep], dim=-1)[:, :, None, None, :]
        attn = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        out = attn.transpose(2, 3).reshape(B, T, -1, self.heads * self.dim_head)
        latents = self.to_out(out) + latents
        return self.feed_forward(latents) + latents


class PerceiverResampler(nn.Module):
    """(B, T, F, N, D) media tokens -> (B, T, num_latents, D): frames and patches pooled into fixed latents."""

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64,
                 max_num_frames: int | None = None, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.layers = nn.ModuleList([PerceiverBlock(dim, dim_head, heads, ff_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = False  # activation checkpointing per block (training only)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`frame_mask` (B, T, F): False on padding frames (media with fewer frames than F), which are ignored."""
        B, T, F, N, D = x.shape
        if self.frame_embs is not None:
            x = x + self.frame_embs[:F][None, None, :, None, :]
        x = x.reshape(B, T, F * N, D)
        token_mask = None if frame_mask is None else frame_mask.repeat_interleave(N, dim=-1)
        latents = self.latents.expand(B, T, *self.latents.shape)
        ckpt = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if ckpt:
                latents = checkpoint(block, x, latents, token_mask, use_reentrant=False)
            else:
                latents = block(x, latents, token_mask)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of the one media their `text_time` names (0: none, output zero)."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, only_immediate: bool = True):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.only_immediate = only_immediate  # False: OpenFlamingo's variant, every media up to text_time
        self.fused = False  # set by the Otter model (config.fused_xattn): the Triton kernel on CUDA tensors
        # True: the (B, S, M*L) mask over every media of the row (the reference the runs path is tested against)
        self.dense_reference = False
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attend(x, media, text_time))

    def attend(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """The attention output before `to_out`: (B, S, heads * dim_head)."""
        # x: (B, S, D); media: (B, M, L, Dv); text_time: (B, S) in 0..M
        B, S, _ = x.shape
        M, L = media.shape[1], media.shape[2]
        if M == 0 or L == 0:  # no media in the batch: every token gets exactly zero
            return x.new_zeros(B, S, self.heads * self.dim_head)
        q = self.to_q(self.norm(x)).view(B, S, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(media.reshape(B, M * L, -1)).chunk(2, dim=-1)
        k = k.view(B, M * L, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(B, M * L, self.heads, self.dim_head).transpose(1, 2)
        fused = self.fused and self.only_immediate and _fused_ok(x.device)
        if fused and _fused_shape_ok(L, self.dim_head, B * self.heads):
            out = _fused_media_attention(q, k, v, text_time, M, L)
            return out.transpose(1, 2).reshape(B, S, -1)
        if self.only_immediate and not self.dense_reference:
            return media_runs_attention(q, k, v, text_time, M, L)
        media_of_key = torch.arange(M * L, device=x.device) // L + 1  # 1-based media index of each key
        if self.only_immediate:
            allowed = text_time[:, :, None] == media_of_key[None, None, :]  # (B, S, M*L)
        else:
            allowed = text_time[:, :, None] >= media_of_key[None, None, :]
        # A token before any media (0), or naming a media that is not there (> M), gets exactly zero: OpenFlamingo
        # would spread it uniformly over the wrong media in the second case (otter-reference 3.4).
        has_media = (text_time > 0) & ((text_time <= M) | (not self.only_immediate))
        # Rows without media would be all-masked (NaN in SDPA): let them attend anywhere, then zero them.
        allowed = allowed | ~has_media[:, :, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return out.transpose(1, 2).reshape(B, S, -1) * has_media[:, :, None].to(out.dtype)


def media_runs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor, M: int,
                         L: int) -> torch.Tensor:
    """Each token attends to the L latents of the one media its text_time names, computed per media: no mask and no
    score tensor over all the row's media (the dense path's (B, S, M*L) grows with the row length squared, since
    a longer packed row holds more media).

    q (B, H, S, d), k / v (B, H, M*L, d) -> (B, S, H*d). The tokens naming one media (a run: contiguous in the
    loaders' rows, but any order works) are cut into chunks of C queries; every chunk attends to its media's L
    keys in one batched SDPA call. Tokens naming no media (0, or beyond M) get exactly zero, as in the dense path.
    """
    B, H, S, d = q.shape
    dv = v.shape[-1]
    tt = text_time.reshape(-1)
    tok = ((tt > 0) & (tt <= M)).nonzero().squeeze(1)
    out = q.new_zeros(B * S, H, dv)
    if tok.numel() == 0:
        # no token names a media: zero, still a function of q, k and v, so every projection gets a (zero) gradient
        # as on the dense path (ZeRO and the trainer expect a gradient for every trainable tensor, every step)
        return (out + 0.0 * (q.sum() + k.sum() + v.sum())).view(B, S, H * dv)
    C = max(16, min(128, L))  # chunk of queries per media read: about as many queries as keys
    media = (tok // S) * M + tt[tok] - 1  # media slot in 0..B*M-1
    media, order = torch.sort(media, stable=True)
    tok = tok[order]
    n = tok.numel()
    new = torch.ones(n, dtype=torch.bool, device=q.device)
    new[1:] = media[1:] != media[:-1]
    run_start = new.nonzero().squeeze(1)
    run = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(n, device=q.device) - run_start[run]
    run_len = torch.diff(torch.cat([run_start, run_start.new_tensor([n])]))
    per_run = (run_len + C - 1) // C
    chunk = (torch.cumsum(per_run, 0) - per_run)[run] + pos // C
    slot = pos % C
    chunk_media = media[run_start].repeat_interleave(per_run)
    qf = q.transpose(1, 2).reshape(B * S, H, d)
    qc = q.new_zeros(int(per_run.sum()), C, H, d).index_put((chunk, slot), qf[tok])
    kc = k.view(B, H, M, L, d).transpose(1, 2).reshape(B * M, H, L, d)[chunk_media]
    vc = v.view(B, H, M, L, dv).transpose(1, 2).reshape(B * M, H, L, dv)[chunk_media]
    o = torch.nn.functional.scaled_dot_product_attention(qc.transpose(1, 2), kc, vc)  # (chunks, H, C, dv)
    out = out.index_put((tok,), o.transpose(1, 2)[chunk, slot])
    return out.view(B, S, H * dv)


def _fused_ok(device: torch.device) -> bool:
    """The Triton kernels (kernels/, package otterfast_kernels) run here: CUDA, or the interpreter in tests."""
    try:
        from otterfast_kernels import fused_available
    except ImportError:
        return False
    return fused_available(device)


def _fused_shape_ok(latents: int, dim_head: int, batch_heads: int) -> bool:
    """The kernel's own limits (one media per block, batch x heads per grid axis); beyond them the SDPA path
    below, same semantics."""
    from otterfast_kernels import media_attention_supports

    return media_attention_supports(latents, dim_head, batch_heads)


def _fused_media_attention(q, k, v, text_time, M: int, L: int):
    """The Triton attention core: same semantics, no mask or score tensor, only each row's own media read."""
    from otterfast_kernels import masked_media_attention

    B, H, _, d = k.shape
    return masked_media_attention(q, k.view(B, H, M, L, d), v.view(B, H, M, L, d), text_time)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(x); then x + tanh(ff_gate) * FF(x). Gates start at 0: the LM is unchanged."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4,
                 only_immediate: bool = True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads, only_immediate)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.feed_forward = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        if self.attn.fused and _fused_ok(x.device):
            # output projection, tanh gate and residual in one kernel (kernels/otterfast_kernels/gated_residual.py)
            from otterfast_kernels import gated_residual_linear

            x = gated_residual_linear(x, self.attn.attend(x, media, text_time), self.attn.to_out.weight,
                                      self.attn_gate)
        else:
            x = self.attn(x, media, text_time) * self.attn_gate.tanh() + x
        return self.feed_forward(x) * self.ff_gate.tanh() + x


def text_time_from_ids(input_ids: torch.Tensor, media_token_id: int,
                       segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) -> (B, S): 1-based index (within the row) of each token's most recent `<image>`, 0 for none.

    With `segment_ids` (packed rows), a token before its own sample's first `<image>` gets 0, not the previous
    sample's media.
    """
    is_media = (input_ids == media_token_id).long()
    t = is_media.cumsum(dim=1)
    if segment_ids is None:
        return t
    # media seen in the row before each token's sample started
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    before = torch.where(start, t - is_media, torch.zeros_like(t))
    before = torch.cummax(before, dim=1).values  # carry each sample's base forward (bases never decrease)
    return torch.where(t > before, t, torch.zeros_like(t))
