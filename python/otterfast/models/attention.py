"""Self-attention over packed rows, and which implementation a model gets.

`packed` (otterfast's own transformers attention implementation, registered here) computes each sample's causal
attention on its own, from the forward's `PackedLayout`, and never builds a T x T tensor:
- CUDA with flash-attn installed: `flash_attn_varlen_func` over the samples' `cu_seqlens`;
- otherwise (CUDA without flash-attn, the CPU): SDPA with `is_causal` over groups of similar-length samples,
  gathered into (n, L) blocks (models/packing.py). Measured on the CPU against one SDPA call per sample and the
  dense block-diagonal mask: benches/packed_attention.py, docs/train.md.
Without a layout (generation, a plain forward) it is exactly transformers' SDPA path, mask included.

The dense-mask path (`sdpa` with `additive_block_causal_mask`) stays as the reference the tests compare with.
MPT (transformers' MptAttention computes its scores itself, with ALiBi) gets the same treatment by
`patch_mpt_attention`: ALiBi's bias depends only on the key position, so within a sample it equals the bias of
the sample run alone (up to a per-query constant, which softmax ignores).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from .packing import PackedLayout, current_layout

PACKED = "otterfast_packed"
IMPLEMENTATIONS = ("auto", "packed", "sdpa", "flash_attention_2", "eager")


def flash_attn_available(device: torch.device | None = None) -> bool:
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return on_cuda and importlib.util.find_spec("flash_attn") is not None


def resolve(requested: str) -> str:
    """A config's `attn_implementation` -> the transformers name. `auto` and `packed` -> otterfast's packed
    attention (flash-attn varlen inside it when present); `sdpa` is the dense-mask reference."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {requested!r}")
    register()
    return PACKED if requested in ("auto", "packed") else requested


def uses_flash(config) -> bool:
    """transformers' own flash_attention_2 (rows flattened into one, boundaries from position_ids)."""
    return str(getattr(config, "_attn_implementation", "")).startswith("flash")


def uses_packed(config) -> bool:
    return getattr(config, "_attn_implementation", None) == PACKED


# ------------------------------------------------------------------------------------------- the computation
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float,
                     dropout: float = 0.0, bias: torch.Tensor | None = None,
                     use_flash: bool | None = None) -> torch.Tensor:
    """q (B, H, T, D), k / v (B, Hkv, T, D) -> (B, T, H, D): causal attention within each segment of `layout`.

    `bias` (H, 1, S) (MPT's ALiBi: a function of the key position only) is added to the scores, its last L
    columns for a segment of length L. `use_flash` (default: when available, fp16/bf16, no bias): flash-attn's
    varlen kernel instead of the SDPA groups."""
    B, H, T, D = q.shape

    def flat(x):  # (B, h, T, d) -> (B*T, h, d)
        return x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[-1])

    if use_flash is None:
        use_flash = bias is None and flash_attn_available(q.device) and q.dtype in (torch.float16, torch.bfloat16)
    if use_flash:  # grouped-query attention natively: keys and values keep their own head count
        from flash_attn import flash_attn_varlen_func

        m = layout.max_seqlen
        out = flash_attn_varlen_func(flat(q), flat(k), flat(v), layout.cu_seqlens, layout.cu_seqlens, m, m,
                                     dropout_p=dropout, softmax_scale=scale, causal=True)
        return out.view(B, T, H, v.shape[-1])
    if k.shape[1] != H:  # grouped-query attention
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    if bias is not None and layout.max_seqlen > bias.shape[-1]:
        raise ValueError(f"a packed sample of {layout.max_seqlen} tokens is longer than the position bias "
                         f"({bias.shape[-1]}: the model's max_seq_len)")
    qf, kf, vf = flat(q), flat(k), flat(v)
    outs = []
    for g in layout.groups:
        idx = g.index  # (n, L)
        qg, kg, vg = (x[idx].permute(0, 2, 1, 3) for x in (qf, kf, vf))  # (n, H, L, D)
        if bias is None:
            o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, is_causal=True, scale=scale)
        else:
            L = g.length
            causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            mask = bias[:, :, bias.shape[-1] - L:].to(q.dtype).masked_fill(~causal, float("-inf"))  # (H, L, L)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask[None], dropout_p=dropout, scale=scale)
        outs.append(o.permute(0, 2, 1, 3).reshape(-1, H, o.shape[-1]))  # (n*L, H, D)
    out = torch.cat(outs)[layout.gather] if outs else qf.new_zeros(0, H, v.shape[-1])
    return out.view(B, T, H, v.shape[-1])


# ------------------------------------------------------------------------------------- transformers' interface
def _packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              **kwargs):
    """transformers' attention-function signature. The layout comes in `packed_layout` (OtterHD passes it
    through the model's keyword arguments, which survive activation checkpointing) or from `use_layout`."""
    layout = kwargs.pop("packed_layout", None) or current_layout()
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layout.batch * layout.seq_len != query.shape[0] * query.shape[2]:
        raise ValueError(f"packed layout of {layout.batch}x{layout.seq_len} tokens for a query of "
                         f"{query.shape[0]}x{query.shape[2]} (a KV cache cannot be combined with packed rows)")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = packed_attention(query, key, value, layout, scale, dropout if module.training else 0.0)
    return out, None


def _packed_mask(*args, **kwargs):
    """The mask builder of the packed implementation: none while a packed forward runs (the layout is the mask),
    SDPA's otherwise (generation with padding)."""
    if current_layout() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED, _packed_attention_forward)
    AttentionMaskInterface.register(PACKED, _packed_mask)
    _registered = True


# ------------------------------------------------------------------------------------------------------ MPT
def patch_mpt_attention(lm: torch.nn.Module) -> int:
    """Give every MptAttention of `lm` the packed path (used while a layout is set; else MPT's own code).
    Returns how many modules were patched."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    n = 0
    for m in lm.modules():
        if isinstance(m, MptAttention) and not getattr(m, "_otterfast_packed", False):
            m._otterfast_eager_forward = m.forward
            m.forward = _mpt_forward.__get__(m)
            m._otterfast_packed = True
            n += 1
    return n


def _mpt_forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    layout = current_layout()
    if layout is None or cache is not None:
        return self._otterfast_eager_forward(hidden_states, position_bias, cache=cache, attention_mask=attention_mask,
                                             **kwargs)
    B, T = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    p = self.attn_dropout_p if self.training else 0.0
    out = packed_attention(q, k, v, layout, self.softmax_scale, p, bias=position_bias)
    return self.out_proj(out.reshape(B, T, -1)), None
