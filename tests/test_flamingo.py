"""Our Perceiver resampler and gated cross-attention block against OpenFlamingo's, on the same weights."""

import importlib.util
import os

import pytest
import torch

from otterfast.models.flamingo import GatedCrossAttentionBlock, PerceiverResampler, text_time_from_ids


def openflamingo_helpers():
    """open_flamingo/src/helpers.py, loaded by path: the package's __init__ imports open_clip, which we lack."""
    pytest.importorskip("einops_exts", reason="OpenFlamingo's helpers need einops-exts (./dev installs it)")
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        pytest.skip("open-flamingo is not installed (./dev installs it with --no-deps)")
    path = os.path.join(spec.submodule_search_locations[0], "src", "helpers.py")
    mod_spec = importlib.util.spec_from_file_location("openflamingo_helpers", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def perceiver_key(k: str) -> str:
    """OpenFlamingo -> Otter names: layers.N.0.* -> layers.N.*, layers.N.1.* -> layers.N.feed_forward.*"""
    parts = k.split(".")
    if parts[0] == "layers":
        if parts[2] == "0":
            return ".".join(parts[:2] + parts[3:])
        return ".".join(parts[:2] + ["feed_forward"] + parts[3:])
    return k


@pytest.mark.parametrize("frames", [None, 3])
def test_perceiver_matches_openflamingo(frames):
    of = openflamingo_helpers()
    torch.manual_seed(0)
    ref = of.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, max_num_frames=frames)
    ours = PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, max_num_frames=frames)
    missing, unexpected = ours.load_state_dict({perceiver_key(k): v for k, v in ref.state_dict().items()})
    assert not missing and not unexpected
    x = torch.randn(2, 3, frames or 1, 7, 32, requires_grad=True)
    want, got = ref(x), ours(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    gw, = torch.autograd.grad(want.square().sum(), x)
    gg, = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(gg, gw, atol=2e-5, rtol=1e-4)
    assert "layers.0.to_q.weight" in dict(ours.named_parameters())  # Otter's checkpoint key layout
    assert "layers.1.feed_forward.3.weight" in dict(ours.named_parameters())


def test_gated_cross_attention_matches_openflamingo():
    of = openflamingo_helpers()
    torch.manual_seed(1)
    ref = of.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    ours = GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    with torch.no_grad():
        ref.attn_gate.fill_(0.7)
        ref.ff_gate.fill_(-0.4)
    state = {k.replace("ff.", "feed_forward.") if k.startswith("ff.") else k: v for k, v in ref.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state)
    assert not missing and not unexpected
    B, S, M = 2, 37, 3
    x = torch.randn(B, S, 32, requires_grad=True)
    media = torch.randn(B, M, 5, 24, requires_grad=True)
    loc = torch.zeros(B, S, dtype=torch.bool)
    loc[0, [4, 15, 30]] = True  # text before the first image at 0..3
    loc[1, [0, 9, 20]] = True
    want = ref(x, media, media_locations=loc)
    got = ours(x, media, loc.long().cumsum(1))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    gw = torch.autograd.grad(want.square().sum(), (x, media))
    gg = torch.autograd.grad(got.square().sum(), (x, media))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_no_media_gives_exactly_zero_cross_attention_and_finite_grads():
    torch.manual_seed(2)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=16, dim_head=8, heads=2)
    x = torch.randn(1, 6, 16, requires_grad=True)
    media = torch.randn(1, 2, 4, 16, requires_grad=True)
    text_time = torch.tensor([[0, 0, 1, 1, 3, 0]])  # 3 names a media that is not there
    out = block.attn(x, media, text_time)
    assert (out[0, [0, 1, 4, 5]] == 0).all() and out[0, 2:4].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(media.grad).all()
    # a batch with no media at all
    out = block.attn(x, media[:, :0], torch.zeros(1, 6, dtype=torch.long))
    assert (out == 0).all()


def test_text_time_restarts_per_packed_sample():
    IMG = 9
    ids = torch.tensor([[1, IMG, 5, 5, 1, 5, IMG, 5, 1, IMG, 5, 0]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1]])
    assert text_time_from_ids(ids, IMG).tolist() == [[0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]
    # sample 1's text before its own image must not see sample 0's image
    assert text_time_from_ids(ids, IMG, seg).tolist() == [[0, 1, 1, 1, 0, 0, 2, 2, 0, 3, 3, 0]]
