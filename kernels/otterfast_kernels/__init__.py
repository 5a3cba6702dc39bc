"""otterfast-kernels: Triton kernels for Flamingo/Otter-style gated cross-attention, with eager references.

Public API:
    masked_media_attention(q, k, v, text_time, scale=None)   fused attention core, forward + backward
    gated_residual_linear(x, a, weight, gate)                 x + tanh(gate) * (a @ weight.T), fused
    fused_available(device)                                  whether the Triton path can run on `device`
    media_attention_supports(latents, head_dim)              whether masked_media_attention takes that shape
    reference.masked_media_attention_ref / reference.gated_residual_linear_ref   eager ground truth
"""

from . import reference
from ._common import fused_available
from .gated_residual import GatedResidualLinear, gated_residual_linear
from .media_attention import MaskedMediaAttention, masked_media_attention
from .media_attention import supports as media_attention_supports
from .reference import gated_residual_linear_ref, masked_media_attention_ref

__all__ = [
    "masked_media_attention", "gated_residual_linear", "fused_available", "media_attention_supports",
    "MaskedMediaAttention", "GatedResidualLinear",
    "masked_media_attention_ref", "gated_residual_linear_ref", "reference",
]
__version__ = "0.1.0"
