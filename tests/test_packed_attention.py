"""Packed attention (models/attention.py, models/packing.py, flamingo.media_runs_attention) against the dense
block-diagonal mask path it replaces: logits and every gradient equal in fp32, on odd lengths, a row holding one
sample, rows of length-1 samples and all-padding rows; for Otter on LLaMA and on MPT (ALiBi), and for OtterHD.
Also: nothing of size T x T is allocated (a 16k-token row trains within a bound the dense path cannot meet)."""

from __future__ import annotations

import copy
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

from otterfast.models import attention
from otterfast.models.flamingo import GatedCrossAttentionBlock, MaskedCrossAttention
from otterfast.models.otter import otter_forward
from otterfast.models.otter_build import _set_attn_implementation
from otterfast.models.otterhd import otterhd_forward
from otterfast.models.packing import PackedLayout, block_causal_mask

from test_otter import IMG, LLAMA, MPT, tiny
from test_otterhd import tiny_fuyu

# (rows of sample lengths, row length T): odd lengths with padding; one sample filling its row; length-1 samples;
# a row of padding only next to a full one
LAYOUTS = [
    ([[5, 3, 1, 7], [1, 1, 1, 1, 1]], 19),
    ([[23]], 23),
    ([[1] * 9], 9),
    ([[11, 2], []], 13),
]
IDS = ["odd", "one-sample", "length-1", "pad-row"]


def segments(rows: list[list[int]], T: int) -> torch.Tensor:
    out = []
    for lens in rows:
        s = [i for i, n in enumerate(lens) for _ in range(n)]
        out.append(s + [-1] * (T - len(s)))
    return torch.tensor(out)


def text_batch(rows, T, vocab: int, seed: int = 0, image_every: int = 2) -> dict:
    """Token ids with an `<image>` (id IMG) opening every `image_every`-th sample, restarting positions, labels on
    all but each sample's first token."""
    g = torch.Generator().manual_seed(seed)
    seg = segments(rows, T)
    ids = torch.randint(5, vocab, seg.shape, generator=g)
    pos = torch.zeros_like(seg)
    labels = torch.full_like(seg, -100)
    n_media = 0
    media_row = []
    for b, lens in enumerate(rows):
        start = 0
        for i, n in enumerate(lens):
            pos[b, start:start + n] = torch.arange(n)
            labels[b, start + 1:start + n] = ids[b, start + 1:start + n]
            if i % image_every == 0:
                ids[b, start] = IMG
                n_media += 1
                media_row.append(b)
            start += n
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "labels": labels,
            "attention_mask": (seg >= 0).long(), "media_row": torch.tensor(media_row, dtype=torch.long),
            "media_frames": torch.ones(n_media, dtype=torch.long)}


def with_fuyu_patches(batch: dict) -> dict:
    """A random 30x30x3 patch at every `<image>` token, in the loaders' layout (image_patches_indices)."""
    is_img = batch["input_ids"] == IMG
    pidx = torch.full_like(batch["input_ids"], -1)
    pidx[is_img] = torch.arange(int(is_img.sum()))
    batch["image_patches_indices"] = pidx
    batch["image_patches"] = torch.randn(int(is_img.sum()), 2700, generator=torch.Generator().manual_seed(2))
    return batch


def loss_and_grads(model, forward, batch):
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)
    logits = out.logits
    lab = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab.flatten(), ignore_index=-100,
                                             reduction="sum")
    # a random projection of the logits too: every logit's gradient path is exercised, pads included
    g = torch.Generator().manual_seed(1)
    (loss + (logits * torch.randn(logits.shape, generator=g)).sum() * 1e-2).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(a, b, atol=2e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ the core
@pytest.mark.parametrize("rows,T", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("alibi", [False, True])
def test_packed_core_equals_dense_mask(rows, T, alibi):
    torch.manual_seed(0)
    seg = segments(rows, T)
    B, H, Hkv, D = seg.shape[0], 4, 2, 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, requires_grad=True)
    bias = (torch.arange(1 - 40, 1).float() * torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None])[:, None] if alibi \
        else None
    out = attention.packed_attention(q, k, v, PackedLayout.from_segment_ids(seg), 0.3, bias=bias)
    mask = block_causal_mask(seg)
    dense_bias = torch.zeros(B, H, T, T).masked_fill(~mask, float("-inf"))
    if alibi:  # the bias by key position within each sample, as MPT's within a sample run alone
        kpos = torch.zeros_like(seg)
        for b, lens in enumerate(rows):
            s = 0
            for n in lens:
                kpos[b, s:s + n] = torch.arange(n)
                s += n
        dense_bias = dense_bias + (kpos[:, None, None, :].float() * torch.tensor([0.5, 0.25, 0.125, 0.0625])[None, :, None, None])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=dense_bias, scale=0.3).transpose(1, 2)
    g = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layout_groups_cover_every_token_once_and_cost_about_the_squared_lengths():
    rows = [[700, 3, 1, 300, 20], [1024]]
    lay = PackedLayout.from_segment_ids(segments(rows, 1024))
    slots = sum(g.index.shape[0] * g.length for g in lay.groups)
    assert sorted(lay.gather.tolist()) == sorted(set(lay.gather.tolist())) and lay.gather.max() < slots
    cost = sum(g.index.shape[0] * g.length ** 2 for g in lay.groups)
    exact = sum(n * n for r in rows for n in r)
    assert exact <= cost <= 1.3 * exact  # GROUP_SLACK
    assert lay.cu_seqlens.tolist()[-1] == 2048 and lay.max_seqlen == 1024


def test_layout_refuses_a_sample_split_in_two():
    with pytest.raises(ValueError, match="contiguous"):
        PackedLayout.from_segment_ids(torch.tensor([[0, 0, 1, 0]]))


@pytest.mark.parametrize("rows,T", LAYOUTS, ids=IDS)
def test_media_runs_attention_equals_the_dense_mask(rows, T):
    torch.manual_seed(0)
    block = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=8, heads=2)
    batch = text_batch(rows, T, vocab=50, image_every=1)
    from otterfast.models.flamingo import text_time_from_ids

    tt = text_time_from_ids(batch["input_ids"], IMG, batch["segment_ids"])
    M = int(tt.max()) if tt.numel() else 0
    tt[0, -1] = M + 3  # a token naming a media that is not there: exactly zero on both paths
    x = torch.randn(*tt.shape, 16, requires_grad=True)
    media = torch.randn(tt.shape[0], max(M, 1), 5, 12, requires_grad=True)
    dense = copy.deepcopy(block)
    dense.dense_reference = True
    out, ref = block(x, media, tt), dense(x, media, tt)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [x, media, *block.parameters()], g, allow_unused=True)
    gb = torch.autograd.grad(ref, [x, media, *dense.parameters()], g, allow_unused=True)
    for a, b in zip(ga, gb):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- whole models
def otter_pair(text):
    packed = tiny(text).train()
    _set_attn_implementation(packed.lang_encoder, "packed")
    dense = copy.deepcopy(packed)
    _set_attn_implementation(dense.lang_encoder, "sdpa" if text is LLAMA else "eager")
    for m in dense.modules():
        if isinstance(m, MaskedCrossAttention):
            m.dense_reference = True
    return packed, dense


@pytest.mark.parametrize("rows,T", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("text", [LLAMA, MPT], ids=["llama", "mpt"])
def test_otter_packed_equals_dense_logits_and_gradients(rows, T, text):
    packed, dense = otter_pair(text)
    assert attention.uses_packed(packed.lang_encoder.config) or packed.lang_encoder._otterfast_mpt_packed
    batch = text_batch(rows, T, vocab=100)
    n = batch["media_frames"].numel()
    batch["pixel_values"] = torch.randn(max(n, 0), 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert_same(loss_and_grads(packed, otter_forward, batch), loss_and_grads(dense, otter_forward, batch))


@pytest.mark.parametrize("rows,T", LAYOUTS, ids=IDS)
def test_otterhd_packed_equals_dense_logits_and_gradients(rows, T):
    dense = tiny_fuyu(vocab_size=100, image_token_id=IMG).train()
    packed = copy.deepcopy(dense)
    packed.set_attn_implementation(attention.resolve("packed"))
    batch = with_fuyu_patches(text_batch(rows, T, vocab=100))

    def fwd(m, b):
        return otterhd_forward(m, b, with_loss=False)

    assert_same(loss_and_grads(packed, fwd, batch), loss_and_grads(dense, fwd, batch))


def test_generation_without_a_layout_is_plain_sdpa():
    """The packed implementation without a layout (generation, left-padded prompts) is transformers' SDPA."""
    packed, dense = otter_pair(LLAMA)
    packed.eval(), dense.eval()
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    a = packed.lang_encoder(input_ids=ids, attention_mask=mask).logits
    b = dense.lang_encoder(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- memory bound
LONG_ROW = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from otterfast.models.otterhd import otterhd_forward
    from otterfast.models import attention
    from test_otterhd import tiny_fuyu
    torch.manual_seed(0)
    T = 16384
    model = tiny_fuyu(vocab_size=100, image_token_id=3).train()
    if {impl!r} == "packed":
        model.set_attn_implementation(attention.resolve("packed"))
    lens = [37, 512, 901, 1500, 7, 2048] * 10
    seg, pos, s = torch.full((1, T), -1), torch.zeros(1, T, dtype=torch.long), 0
    for i, n in enumerate(lens):
        n = min(n, T - s)
        if n <= 0:
            break
        seg[0, s:s + n] = i
        pos[0, s:s + n] = torch.arange(n)
        s += n
    ids = torch.randint(5, 100, (1, T))
    batch = {{"input_ids": ids, "position_ids": pos, "segment_ids": seg, "labels": ids,
             "image_patches": torch.zeros(0, 2700), "image_patches_indices": torch.full((1, T), -1)}}
    out = otterhd_forward(model, batch)
    out.loss.backward()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_a_16k_token_row_trains_without_any_t_by_t_allocation(tmp_path):
    """A 16,384-token row of a tiny OtterHD trains (forward + backward) with the packed attention under a 2 GiB
    data-segment limit (RLIMIT_DATA: every heap and anonymous mapping). The dense path needs its (1, 1, T, T) fp32 mask alone (1 GiB), a bool mask and the
    (1, 4, T, T) attention weights kept for backward (4 GiB): it cannot run under that limit."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    limit = 2 << 30

    def run(impl):
        code = LONG_ROW.format(tests=tests, impl=impl)
        pre = f"import resource; resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))\n"
        return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=600)

    p = run("packed")
    assert p.returncode == 0, p.stderr[-2000:]
    d = run("sdpa")
    assert d.returncode != 0 and ("memory" in d.stderr.lower() or "alloc" in d.stderr.lower()), d.stderr[-2000:]
