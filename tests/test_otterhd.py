"""OtterHD (Fuyu): the packed forward equals the plain transformers forward of each sample on the same weights."""

import inspect
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.loader import as_torch
from otterfast.models.otterhd import otterhd_forward
from otterfast.models.packing import block_causal_mask


def tiny_fuyu(vocab_size: int, image_token_id: int):
    from transformers import FuyuConfig, FuyuForCausalLM

    cfg = FuyuConfig(
        text_config={"model_type": "persimmon", "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 4096,
                     "partial_rotary_factor": 0.5, "qk_layernorm": True, "hidden_act": "relu2"},
        image_token_id=image_token_id, patch_size=30, num_channels=3,
        hidden_size=64,  # transformers < 5.2x sizes the patch projection by this, not text_config's
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return FuyuForCausalLM(cfg).eval()


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                 [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_packed_forward_equals_per_sample_forward(demo_index_fuyu):
    idx = PreparedIndex(demo_index_fuyu)
    model = tiny_fuyu(idx.tok["vocab_size"], idx.tok["fuyu_placeholder_id"])
    loader = NativeLoader(idx, batch_size=2, pack=True, capacity=2048, seed=4)
    batch = as_torch(next(iter(loader)))
    assert (batch["segment_ids"].max(dim=1).values >= 1).any()  # several samples share a row
    with torch.no_grad():
        out = otterhd_forward(model, batch)
    logits = out.logits
    B, T = batch["input_ids"].shape
    total_nll, total_n, n_samples = 0.0, 0, 0
    for b in range(B):
        seg = batch["segment_ids"][b]
        for k in range(int(seg.max()) + 1):
            pos = (seg == k).nonzero().flatten()
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            ids = batch["input_ids"][b, lo:hi][None]
            pidx = batch["image_patches_indices"][b, lo:hi]
            patches = batch["image_patches"][pidx[pidx >= 0]]
            labels = batch["labels"][b, lo:hi][None]
            with torch.no_grad():
                # transformers' own Fuyu takes the patches as `pixel_values` (5.2x) or `image_patches` (5.17)
                name = "pixel_values" if "pixel_values" in inspect.signature(model.forward).parameters \
                    else "image_patches"
                ref = model(input_ids=ids, labels=labels, **{name: patches[None] if len(patches) else None})
            torch.testing.assert_close(logits[b, lo:hi], ref.logits[0], atol=2e-5, rtol=1e-4)
            shift = F.cross_entropy(ref.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
            total_nll += float(shift)
            total_n += int((labels[0, 1:] != -100).sum())
            n_samples += 1
    assert n_samples >= 3
    # the packed loss is the token mean over every sample's labelled tokens
    assert abs(float(out.loss) - total_nll / total_n) < 1e-5
    assert torch.isfinite(logits).all()  # pad rows attend to themselves: no NaN


def test_packed_backward_is_finite(demo_index_fuyu):
    idx = PreparedIndex(demo_index_fuyu)
    model = tiny_fuyu(idx.tok["vocab_size"], idx.tok["fuyu_placeholder_id"]).train()
    batch = next(b for b in map(as_torch, NativeLoader(idx, batch_size=1, pack=True, capacity=2048, seed=1))
                 if b["image_patches"].shape[0] > 0)
    loss = otterhd_forward(model, batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.vision_embed_tokens.weight.grad.abs().sum() > 0


def test_model_configs_load_and_tiny_builds(demo_index_fuyu):
    import glob
    import os

    from otterfast.models.otterhd import OtterHDConfig, build_otterhd, flops_per_token

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "models")
    paths = sorted(glob.glob(os.path.join(root, "otterhd-*.yaml")))
    assert len(paths) >= 2
    for p in paths:
        cfg = OtterHDConfig.load(p)
        if cfg.checkpoint:
            with pytest.raises(FileNotFoundError, match="local copy"):
                build_otterhd(cfg)
    idx = PreparedIndex(demo_index_fuyu)
    model = build_otterhd(OtterHDConfig.load(os.path.join(root, "otterhd-tiny.yaml")), idx.tok["vocab_size"],
                          idx.tok["fuyu_placeholder_id"])
    assert model.config.image_token_id == idx.tok["fuyu_placeholder_id"]
    n_params = sum(p.numel() for p in model.parameters())
    f = flops_per_token(model, 2048)
    assert 6 * (n_params - model.get_input_embeddings().weight.numel()) < f < 6 * n_params + 12 * 2 * 64 * 2048 + 1


def test_unknown_model_config_key(tmp_path):
    from otterfast.models.otterhd import OtterHDConfig

    p = tmp_path / "m.yaml"
    p.write_text("architecture: otterhd\ncheckpoint: null\nhidden: 3\n")
    with pytest.raises(ValueError, match="unknown key"):
        OtterHDConfig.load(str(p))


def test_otterhd_yaml_lora_and_validation(demo_index_fuyu, tmp_path):
    import os

    from otterfast.models.build import batch_loss, build_model, load_model_config
    from otterfast.models.lora import merge_lora_

    root = os.path.dirname(os.path.dirname(__file__))
    doc = yaml_load(os.path.join(root, "configs/models/otterhd-tiny.yaml"))
    idx = PreparedIndex(demo_index_fuyu)
    full = build_model(load_model_config(doc), idx.tok)
    assert all(p.requires_grad for p in full.parameters())
    torch.manual_seed(0)
    lora = build_model(load_model_config({**doc, "train": "lora", "lora": {"r": 4}}), idx.tok)
    train = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert train and all("lora_" in n for n in train)
    assert any("lm_head" in n for n in train) and any("query_key_value" in n for n in train)  # Otter's targets
    batch = as_torch(next(iter(NativeLoader(idx, batch_size=2, pack=True, capacity=2048, seed=1))))
    loss, n = batch_loss(lora, batch)
    (loss / n).backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        before = otterhd_forward(lora.eval(), batch).logits
        merge_lora_(lora)
        after = otterhd_forward(lora, batch).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in lora.state_dict())
    for bad, msg in [({"trian": "full"}, "unknown key"), ({"train": "half"}, "train must be")]:
        with pytest.raises(ValueError, match=msg):
            load_model_config({**doc, **bad})


def yaml_load(path):
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def test_batch_without_images_still_calls_the_patch_projection(demo_index_fuyu):
    """ZeRO-3 needs every rank to call every module: a text-only batch runs the projection on a blank patch."""
    from otterfast.models.build import batch_loss

    idx = PreparedIndex(demo_index_fuyu)
    model = tiny_fuyu(idx.tok["vocab_size"], idx.tok["fuyu_placeholder_id"]).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(6)[None],
             "segment_ids": torch.zeros(1, 6, dtype=torch.int32), "image_patches": torch.zeros(0, 2700),
             "image_patches_indices": torch.full((1, 6), -1)}
    loss, n = batch_loss(model, batch)
    loss.backward()
    assert model.model.vision_embed_tokens.weight.grad is not None
    assert float(model.model.vision_embed_tokens.weight.grad.abs().sum()) == 0.0


def test_flattened_rows_and_every_attention_implementation_agree(demo_index_fuyu):
    """The flash-attn layout (B rows as one row, boundaries from positions) and eager attention give the same
    logits as the block-diagonal SDPA path (flash itself needs a GPU; its input layout is checked here)."""
    idx = PreparedIndex(demo_index_fuyu)
    model = tiny_fuyu(idx.tok["vocab_size"], idx.tok["fuyu_placeholder_id"])
    batch = next(b for b in map(as_torch, NativeLoader(idx, batch_size=3, pack=True, capacity=2048, seed=2))
                 if b["image_patches"].shape[0] > 0 and b["input_ids"].shape[0] == 3)
    with torch.no_grad():
        ref = otterhd_forward(model, batch, flatten=False)
        flat = otterhd_forward(model, batch, flatten=True)
        model.set_attn_implementation("eager")
        eager = otterhd_forward(model, batch, flatten=False)
    assert flat.logits.shape == ref.logits.shape
    torch.testing.assert_close(flat.logits, ref.logits, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(eager.logits, ref.logits, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(flat.loss, ref.loss, atol=1e-5, rtol=1e-5)


def module_call_order(model, batch) -> list[str]:
    from otterfast.models.build import batch_loss

    names, hooks = [], []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: names.append(n)))
    try:
        batch_loss(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return names


def test_same_module_calls_with_and_without_images(demo_index_fuyu):
    """ZeRO-3 gathers each module's shards when it is called, collectively: every rank must call the same modules
    in the same order, whether its batch has images or not."""
    idx = PreparedIndex(demo_index_fuyu)
    model = tiny_fuyu(idx.tok["vocab_size"], idx.tok["fuyu_placeholder_id"]).train()
    batch = next(b for b in map(as_torch, NativeLoader(idx, batch_size=1, pack=True, capacity=2048, seed=1))
                 if b["image_patches"].shape[0] > 0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    text = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(6)[None],
            "segment_ids": torch.zeros(1, 6, dtype=torch.int32), "image_patches": torch.zeros(0, 2700),
            "image_patches_indices": torch.full((1, 6), -1)}
    assert module_call_order(model, batch) == module_call_order(model, text)
