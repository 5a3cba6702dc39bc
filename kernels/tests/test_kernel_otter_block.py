"""Model level: Otter's gated cross-attention block on the fused path equals the same block on the eager path.

Runs from a bare source tree too (the GPU check): otterfast's model code needs only torch, so `python/` is put
on the path when otterfast is not installed.
"""

import os
import sys

import pytest
import torch

try:
    import otterfast.models.flamingo  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "python"))

from otterfast.models.flamingo import GatedCrossAttentionBlock  # noqa: E402
from otterfast_kernels import fused_available  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_equals_eager_block(device, dtype):
    if not fused_available(device):
        pytest.skip(f"the Triton path cannot run on {device} here (no CUDA and no TRITON_INTERPRET)")
    if dtype == torch.bfloat16 and device != "cuda":
        pytest.skip("bf16 arithmetic is wrong in Triton's CPU interpreter: GPU only")
    torch.manual_seed(0)
    D, Dv, B, S, M, L = 64, 32, 2, 37, 3, 13
    block = GatedCrossAttentionBlock(D, Dv, dim_head=16, heads=2).to(device, dtype)
    with torch.no_grad():
        block.attn_gate.fill_(0.6)
        block.ff_gate.fill_(-0.3)
    x = torch.randn(B, S, D, device=device, dtype=dtype)
    media = torch.randn(B, M, L, Dv, device=device, dtype=dtype)
    # text before the first image, three images, a row that names a media that is not there (4 > M)
    text_time = torch.tensor([[0] * 5 + [1] * 10 + [2] * 10 + [3] * 12,
                              [0] * 20 + [1] * 7 + [4] * 10], device=device)

    def run(fused: bool):
        block.attn.fused = fused
        block.zero_grad()
        xx, mm = x.clone().requires_grad_(True), media.clone().requires_grad_(True)
        out = block(xx, mm, text_time)
        (out.float() * torch.linspace(-1, 1, D, device=device)).sum().backward()
        grads = [xx.grad, mm.grad] + [p.grad for p in block.parameters()]
        return out, grads

    want, gw = run(False)
    got, gg = run(True)
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, **tol)
    # before the first image (and naming a missing media) the attention half adds exactly nothing
    from otterfast_kernels import gated_residual_linear

    with torch.no_grad():
        block.attn.fused = True
        h = gated_residual_linear(x, block.attn.attend(x, media, text_time), block.attn.to_out.weight, block.attn_gate)
    assert torch.equal(h[0, :5], x[0, :5]) and torch.equal(h[1, :20], x[1, :20]) and torch.equal(h[1, 27:], x[1, 27:])


def test_media_beyond_the_kernels_limits_take_the_reference_path(device):
    """129 latents per media (the kernel's limit is 128): the fused block still runs, on the SDPA attention path
    (the gated projection stays fused), and equals the eager block."""
    if not fused_available(device):
        pytest.skip(f"the Triton path cannot run on {device} here (no CUDA and no TRITON_INTERPRET)")
    torch.manual_seed(1)
    D, Dv, B, S, M, L = 32, 16, 1, 9, 2, 129
    block = GatedCrossAttentionBlock(D, Dv, dim_head=16, heads=2).to(device)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
    x, media = torch.randn(B, S, D, device=device), torch.randn(B, M, L, Dv, device=device)
    text_time = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2, 2]], device=device)
    outs = []
    for fused in (False, True):
        block.attn.fused = fused
        outs.append(block(x, media, text_time))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-4, rtol=1e-3)
