"""Activation checkpointing (models/build.py set_activation_checkpointing): the same loss and gradients as
without it, for Otter (LLaMA and MPT) and OtterHD, on packed rows; and the activations kept for backward shrink
(counted exactly: the bytes of every tensor autograd saves, through saved_tensors_hooks)."""

from __future__ import annotations

import copy

import pytest
import torch

from otterfast.models.build import set_activation_checkpointing
from otterfast.models.otter import otter_forward
from otterfast.models.otter_build import _set_attn_implementation
from otterfast.models.otterhd import otterhd_forward

from test_otter import IMG, LLAMA, MPT, tiny
from test_otterhd import tiny_fuyu
from test_packed_attention import text_batch, with_fuyu_patches

ROWS, T = [[37, 5, 61, 1, 20], [90, 33]], 128


def saved_bytes_and_grads(model, forward, batch):
    """(bytes of the tensors saved for backward, loss, gradients) of one training step."""
    model.zero_grad(set_to_none=True)
    seen: dict[int, int] = {}
    alive = []  # every saved tensor held until the count is done: a freed storage's address cannot be reused

    def pack(t):
        alive.append(t)
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storages counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = forward(model, batch).logits
        lab = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(seen.values()), loss.detach(), grads


def otter_batch():
    b = text_batch(ROWS, T, vocab=100)
    b["pixel_values"] = torch.randn(b["media_frames"].numel(), 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return b


def fuyu_batch():
    return with_fuyu_patches(text_batch(ROWS, T, vocab=100))


def otter_model(text):
    m = tiny(text).train()
    _set_attn_implementation(m.lang_encoder, "packed")
    m.requires_grad_(True)  # everything trains: every layer's gradient is compared (CLIP included, for `all`)
    return m


CASES = {
    "otter-llama": (lambda: otter_model(LLAMA), otter_forward, otter_batch),
    "otter-mpt": (lambda: otter_model(MPT), otter_forward, otter_batch),
    "otterhd": (lambda: tiny_fuyu(100, IMG).train(), lambda m, b: otterhd_forward(m, b, with_loss=False), fuyu_batch),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(case):
    make, forward, batch_fn = CASES[case]
    base = make()
    if case == "otterhd":
        from otterfast.models import attention

        base.set_attn_implementation(attention.resolve("packed"))
    batch = batch_fn()
    ref_bytes, ref_loss, ref_grads = saved_bytes_and_grads(base, forward, batch)
    saved = {}
    for mode in ("decoder", "all"):
        m = copy.deepcopy(base)
        set_activation_checkpointing(m, mode)
        saved[mode], loss, grads = saved_bytes_and_grads(m, forward, batch)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=lambda s: f"{mode} {n}: {s}")
    # what stays is each layer's input (and the loss head's): at least 40% less on these tiny models
    assert saved["decoder"] < 0.6 * ref_bytes, (saved, ref_bytes)
    assert saved["all"] <= saved["decoder"]
    set_activation_checkpointing(base, "none")
    assert saved_bytes_and_grads(base, forward, batch)[0] == ref_bytes


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="none, decoder"):
        set_activation_checkpointing(tiny(LLAMA), "layers")
