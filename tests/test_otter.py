"""The Otter model: Otter's checkpoint keys, trainable parameters, packed == per-sample, cached generation, LoRA."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.loader import as_torch
from otterfast.models.build import batch_loss, build_model, load_model_config
from otterfast.models.flamingo import GatedCrossAttentionBlock
from otterfast.models.otter_build import flops_per_token
from otterfast.models.otter import (OtterConfig, OtterForConditionalGeneration, dense_latents,
                                    otter_forward)

ROOT = os.path.dirname(os.path.dirname(__file__))
IMG, EOC = 3, 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
              patch_size=16)
LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# Otter-MPT7B's text_config keys (reference 3.5), shrunk
MPT = dict(architectures=["MPTForCausalLM"], model_type="mpt", vocab_size=100, d_model=32, n_heads=4, n_layers=4,
           expansion_ratio=4, max_seq_len=128, no_bias=True, norm_type="low_precision_layernorm",
           attn_config={"alibi": True, "attn_impl": "torch", "attn_pdrop": 0, "softmax_scale": None},
           tie_word_embeddings=True, use_cache=False, tokenizer_name="EleutherAI/gpt-neox-20b")
SMALL = dict(cross_attn_every_n_layers=2, perceiver_depth=2, perceiver_num_latents=5, perceiver_heads=2,
             perceiver_dim_head=8, xattn_heads=2, xattn_dim_head=8, media_token_id=IMG, eoc_token_id=EOC)


def tiny(text=LLAMA, seed=0, gates=0.5, **kw) -> OtterForConditionalGeneration:
    torch.manual_seed(seed)
    model = OtterForConditionalGeneration(OtterConfig(vision_config=VISION, text_config=text, **{**SMALL, **kw}))
    with torch.no_grad():  # open the gates, else the media change nothing
        for m in model.modules():
            if isinstance(m, GatedCrossAttentionBlock):
                m.attn_gate.fill_(gates)
                m.ff_gate.fill_(-gates)
    return model.eval()


# ------------------------------------------------------------------------------------------ checkpoint layout
def otter_checkpoint_keys(text: str, n_layers: int, every: int, depth: int) -> dict[str, tuple]:
    """Otter's published key layout (otter-reference 3.6), written out by hand, with shapes from the sizes."""
    d, dv, lat, inner, ff = 32, 32, 5, 16, 4
    keys = {"perceiver.latents": (lat, dv), "perceiver.norm.weight": (dv,), "perceiver.norm.bias": (dv,)}
    for i in range(depth):
        p = f"perceiver.layers.{i}."
        keys.update({p + "norm_media.weight": (dv,), p + "norm_media.bias": (dv,), p + "norm_latents.weight": (dv,),
                     p + "norm_latents.bias": (dv,), p + "to_q.weight": (inner, dv), p + "to_kv.weight": (2 * inner, dv),
                     p + "to_out.weight": (dv, inner), p + "feed_forward.0.weight": (dv,),
                     p + "feed_forward.0.bias": (dv,), p + "feed_forward.1.weight": (ff * dv, dv),
                     p + "feed_forward.3.weight": (dv, ff * dv)})
    if text == "mpt":
        keys["lang_encoder.transformer.wte.weight"] = (100, d)
        keys["lang_encoder.transformer.norm_f.weight"] = (d,)
        blocks = "lang_encoder.transformer.blocks"
        layer = {"norm_1.weight": (d,), "attn.Wqkv.weight": (3 * d, d), "attn.out_proj.weight": (d, d),
                 "norm_2.weight": (d,), "ffn.up_proj.weight": (4 * d, d), "ffn.down_proj.weight": (d, 4 * d)}
    else:
        keys["lang_encoder.model.embed_tokens.weight"] = (100, d)
        keys["lang_encoder.model.norm.weight"] = (d,)
        keys["lang_encoder.lm_head.weight"] = (100, d)
        blocks = "lang_encoder.model.layers"
        layer = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d // 2, d),
                 "self_attn.v_proj.weight": (d // 2, d), "self_attn.o_proj.weight": (d, d),
                 "mlp.gate_proj.weight": (64, d), "mlp.up_proj.weight": (64, d), "mlp.down_proj.weight": (d, 64),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    for i in range(n_layers):
        for k, shape in layer.items():
            keys[f"{blocks}.{i}.decoder_layer.{k}"] = shape
        if (i + 1) % every == 0:
            g = f"{blocks}.{i}.gated_cross_attn_layer."
            keys.update({g + "attn.norm.weight": (d,), g + "attn.norm.bias": (d,), g + "attn.to_q.weight": (inner, d),
                         g + "attn.to_kv.weight": (2 * inner, dv), g + "attn.to_out.weight": (d, inner),
                         g + "attn_gate": (1,), g + "feed_forward.0.weight": (d,), g + "feed_forward.0.bias": (d,),
                         g + "feed_forward.1.weight": (ff * d, d), g + "feed_forward.3.weight": (d, ff * d),
                         g + "ff_gate": (1,)})
    return keys


def clip_keys() -> dict[str, tuple]:
    """The HF CLIP vision keys under Otter's prefix `vision_encoder.vision_model.` (transformers' own names)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    sd = CLIPVisionModel(CLIPVisionConfig(**VISION)).state_dict()
    return {"vision_encoder.vision_model." + k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("text", ["mpt", "llama"])
def test_otter_checkpoint_layout_loads_without_missing_or_unexpected_keys(tmp_path, text):
    keys = {**otter_checkpoint_keys(text, n_layers=4, every=2, depth=2), **clip_keys()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in keys.items()}
    conf = {"model_type": "otter", "architectures": ["OtterForConditionalGeneration"],
            "vision_config": VISION, "text_config": MPT if text == "mpt" else LLAMA,
            "only_attend_previous": True, "use_media_placement_augmentation": True,  # published keys, ignored
            **SMALL}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = OtterForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = model.state_dict()
    blocks = "lang_encoder.transformer.blocks" if text == "mpt" else "lang_encoder.model.layers"
    for k in ["perceiver.layers.1.to_q.weight", "perceiver.layers.0.feed_forward.3.weight",
              f"{blocks}.1.gated_cross_attn_layer.attn.to_kv.weight", f"{blocks}.3.gated_cross_attn_layer.ff_gate",
              f"{blocks}.2.decoder_layer." + ("attn.Wqkv.weight" if text == "mpt" else "self_attn.q_proj.weight")]:
        torch.testing.assert_close(ours[k], state[k], rtol=0, atol=0)
    torch.testing.assert_close(ours["vision_encoder.encoder.layers.1.mlp.fc1.weight"],
                               state["vision_encoder.vision_model.encoder.layers.1.mlp.fc1.weight"], rtol=0, atol=0)
    # cross-attention before layers 1 and 3 ((i + 1) % 2 == 0), none elsewhere
    layers = model.lang_encoder.get_submodule(model.decoder_layers_path)
    assert [l.gated_cross_attn_layer is not None for l in layers] == [False, True, False, True]


def test_save_and_load_roundtrip(tmp_path):
    model = tiny()
    ids = torch.tensor([[1, IMG, 5, 6, IMG, 8, 9]])
    vx = torch.randn(1, 2, 1, 3, 64, 64)
    model.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors")
    again = OtterForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, vision_x=vx).logits, model(ids, vision_x=vx).logits, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("text", [LLAMA, MPT], ids=["llama", "mpt"])
def test_closed_gates_leave_the_lm_unchanged(text):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny(text, gates=0.0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).eval()
    sd = {k.replace(".decoder_layer.", "."): v for k, v in model.lang_encoder.state_dict().items()
          if "gated_cross_attn_layer" not in k}
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    ids = torch.tensor([[1, IMG, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, vision_x=torch.randn(1, 1, 1, 3, 64, 64)).logits, plain(ids).logits)


def test_text_before_the_first_image_ignores_the_media():
    model = tiny()
    ids = torch.tensor([[1, 5, 6, IMG, 7, 8]])
    with torch.no_grad():
        a = model(ids, vision_x=torch.randn(1, 1, 1, 3, 64, 64)).logits
        b = model(ids, vision_x=torch.randn(1, 1, 1, 3, 64, 64)).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)  # before <image>: identical
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4  # after: the image matters


def test_trainable_parameters_are_otters_selection():
    for text, untied in [(LLAMA, True), (MPT, False)]:
        model = tiny(text)
        train = {n for n, p in model.named_parameters() if p.requires_grad}
        expect = {n for n, _ in model.named_parameters()
                  if n.startswith("perceiver.") or "gated_cross_attn_layer" in n}
        emb = "lang_encoder.model.embed_tokens.weight" if text is LLAMA else "lang_encoder.transformer.wte.weight"
        expect.add(emb)
        if untied:
            expect.add("lang_encoder.lm_head.weight")
        assert train == expect
    full = tiny(LLAMA, train_full_model=True)
    assert all(p.requires_grad for p in full.parameters())
    vis = tiny(LLAMA, train_vision_encoder=True)
    assert all(p.requires_grad for p in vis.vision_encoder.parameters())


def test_lora_trains_adapters_and_merges_back_to_otter_keys(tmp_path):
    model = tiny(LLAMA, lora_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    train = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in train) and any("q_proj" in n and "lora" in n for n in train)
    assert not any("base_layer" in n for n in train)
    with torch.no_grad():  # LoRA B starts at 0: make the adapters do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[1, IMG, 5, 6, 7]])
    vx = torch.randn(1, 1, 1, 3, 64, 64)
    from otterfast.models.lora import merged_state_dict

    offline = merged_state_dict(model.state_dict(), model)  # the export's path: on a gathered state dict
    with torch.no_grad():
        before = model(ids, vision_x=vx).logits
        model.merge_lora()
        after = model(ids, vision_x=vx).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    live = model.state_dict()
    assert set(offline) == set(live)
    for k, v in live.items():
        torch.testing.assert_close(offline[k], v, atol=1e-6, rtol=1e-6)
    keys = set(model.state_dict())
    assert "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight" in keys
    assert not any("lora" in k or "base_layer" in k for k in keys)


def test_dense_latents_places_media_by_row():
    lat = torch.arange(5.0)[:, None, None].expand(5, 2, 3)
    out = dense_latents(lat, torch.tensor([0, 0, 2, 2, 2]), 3)
    assert out.shape == (3, 3, 2, 3)
    assert out[:, :, 0, 0].tolist() == [[0, 1, 0], [0, 0, 0], [2, 3, 4]]
    assert dense_latents(lat[:0], torch.tensor([], dtype=torch.long), 2).shape == (2, 0, 2, 3)


# ------------------------------------------------------------------------------------------- packed batches
def otter_for_index(idx: PreparedIndex, text: dict, seed=0) -> OtterForConditionalGeneration:
    vision = {**VISION, "image_size": 224, "patch_size": 32}
    torch.manual_seed(seed)
    model = OtterForConditionalGeneration(OtterConfig(
        vision_config=vision, text_config={**text, "vocab_size": idx.tok["vocab_size"],
                                           **({"max_seq_len": 4096} if text["model_type"] == "mpt" else {})},
        **{**SMALL, "media_token_id": idx.tok["media_id"], "eoc_token_id": idx.tok["eoc_id"]}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedCrossAttentionBlock):
                m.attn_gate.fill_(0.8)
                m.ff_gate.fill_(0.3)
    return model.eval()


@pytest.mark.parametrize("text", [LLAMA, MPT], ids=["llama", "mpt"])
def test_packed_forward_equals_per_sample_forward(demo_index, text):
    idx = PreparedIndex(demo_index)
    model = otter_for_index(idx, text)
    loader = NativeLoader(idx, batch_size=2, pack=True, capacity=1024, seed=3)
    # a batch where several samples share a row and there are media (a few demo samples are text-only)
    batch = next(b for b in map(as_torch, loader)
                 if (b["segment_ids"].max(dim=1).values >= 1).any() and len(b["media_row"]) >= 2)
    with torch.no_grad():
        logits = otter_forward(model, batch).logits
    # per sample, in Otter's own layout: vision_x (1, T_img, F, 3, H, W)
    starts = torch.cumsum(batch["media_frames"], 0) - batch["media_frames"]
    checked = 0
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for k in range(int(seg.max()) + 1):
            pos = (seg == k).nonzero().flatten()
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            mine = ((batch["media_row"] == b) & (batch["media_pos"] >= lo) & (batch["media_pos"] < hi)).nonzero()
            mine = mine.flatten().tolist()
            frames = {int(batch["media_frames"][m]) for m in mine}
            assert len(frames) <= 1
            vx = None
            if mine:
                f = frames.pop()
                vx = torch.stack([batch["pixel_values"][int(starts[m]):int(starts[m]) + f] for m in mine])[None]
            ids = batch["input_ids"][b, lo:hi][None]
            with torch.no_grad():
                ref = model(ids, vision_x=vx).logits if vx is not None else model(ids).logits
            torch.testing.assert_close(logits[b, lo:hi], ref[0], atol=3e-5, rtol=1e-4)
            checked += 1
    assert checked >= 3


def test_model_yaml_build_and_loss_backward(demo_index):
    idx = PreparedIndex(demo_index)
    cfg = load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml"))
    model = build_model(cfg, idx.tok).train()
    assert model.config.media_token_id == idx.tok["media_id"]
    batch = as_torch(next(iter(NativeLoader(idx, batch_size=2, pack=True, capacity=1024, seed=0))))
    loss, n = batch_loss(model, batch)
    assert n > 0 and torch.isfinite(loss)
    (loss / n).backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert any(g.startswith("perceiver.") for g in grads) and any("gated_cross_attn_layer" in g for g in grads)
    assert not any(g.startswith("vision_encoder.") for g in grads)
    assert flops_per_token(model, 1024) > 0


def test_flops_per_token_counts_frozen_weights_at_four():
    model = tiny()
    frozen = flops_per_token(model, 128)
    for p in model.lang_encoder.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.lang_encoder.parameters()) - model.lang_encoder.get_input_embeddings().weight.numel()
    n_before = n - sum(p.numel() for name, p in model.lang_encoder.named_parameters()
                       if ("gated_cross_attn_layer" in name or "lm_head" in name))
    assert flops_per_token(model, 128) - frozen == pytest.approx(2.0 * n_before)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("text", [LLAMA, MPT], ids=["llama", "mpt"])
def test_cached_and_uncached_generation_agree(text):
    model = tiny(text, gates=1.0)
    ids = torch.tensor([[1, IMG, 5, 6, IMG, 7], [2, 2, 1, IMG, 9, 8]])  # row 2 left-padded
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    vx = torch.randn(2, 2, 1, 3, 64, 64)
    kw = dict(vision_x=vx, attention_mask=att, max_new_tokens=6, do_sample=False, pad_token_id=2,
              output_scores=True, return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not (cached.sequences[:, ids.shape[1]:] == IMG).any()  # <image> is never generated
    # Otter's legacy behaviour zeroes the generated tokens' cross-attention: different scores after step 1
    legacy = model.generate(ids, use_cache=True, legacy_media_masking=True, **kw)
    torch.testing.assert_close(legacy.scores[0], cached.scores[0])
    finite = [(a - b)[torch.isfinite(a) & torch.isfinite(b)] for a, b in zip(legacy.scores[1:], cached.scores[1:])]
    assert max(float(d.abs().max()) for d in finite) > 1e-3


def test_beam_search_cached_equals_uncached():
    model = tiny(LLAMA, gates=1.0)
    ids = torch.tensor([[1, IMG, 5, 6, 7]])
    vx = torch.randn(1, 1, 1, 3, 64, 64)
    kw = dict(vision_x=vx, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=2)
    assert model.generate(ids, use_cache=True, **kw).tolist() == model.generate(ids, use_cache=False, **kw).tolist()


def test_every_model_config_loads():
    folder = os.path.join(ROOT, "configs", "models")
    names = sorted(os.listdir(folder))
    assert {"otter-tiny.yaml", "otter-mpt7b.yaml", "otter-llama7b.yaml", "otterhd-tiny.yaml", "otterhd-8b.yaml"} <= set(names)
    for name in names:
        cfg = load_model_config(os.path.join(folder, name))
        assert cfg.architecture in ("otter", "otterhd")
    with pytest.raises(ValueError, match="unknown otter key"):
        load_model_config({"architecture": "otter", "otter": {"cross_attn_every_n_layer": 4}})
    with pytest.raises(FileNotFoundError, match="local copy"):
        build_model(load_model_config(os.path.join(folder, "otter-mpt7b.yaml")), {"vocab_size": 10, "media_id": 3})


def test_new_otter_from_pretrained_parts(tmp_path):
    """Otter's -Init recipe: a pretrained LM and CLIP, new Flamingo parts with closed gates -> the LM's outputs."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)).eval()
    lm.save_pretrained(str(tmp_path / "lm"))
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    clip.save_pretrained(str(tmp_path / "clip"))
    cfg = load_model_config({"architecture": "otter", "lang_encoder": str(tmp_path / "lm"),
                             "vision_encoder": str(tmp_path / "clip"), "otter": {**SMALL}})
    model = build_model(cfg, {"vocab_size": 100, "media_id": IMG, "eoc_id": EOC}).eval()
    ids = torch.tensor([[1, IMG, 5, 6, 7, 8]])
    vx = torch.randn(1, 1, 1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, vision_x=vx).logits, lm(ids).logits)
        torch.testing.assert_close(model.encode_frames(vx[0, 0]), clip(pixel_values=vx[0, 0]).last_hidden_state[:, 1:])
    with pytest.raises(FileNotFoundError, match="local copy"):
        build_model(load_model_config({"architecture": "otter", "lang_encoder": str(tmp_path / "nope")}), {})


def test_attention_implementations_agree_on_packed_rows(demo_index):
    idx = PreparedIndex(demo_index)
    doc = load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml"))
    batch = as_torch(next(iter(NativeLoader(idx, batch_size=2, pack=True, capacity=1024, seed=5))))
    out = {}
    for impl in ("sdpa", "eager"):
        doc.attn_implementation = impl
        torch.manual_seed(0)
        model = build_model(doc, idx.tok).eval()
        assert model.lang_encoder.config._attn_implementation == impl
        with torch.no_grad():
            out[impl] = otter_forward(model, batch).logits
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=3e-5, rtol=1e-4)


def test_media_with_different_frame_counts_in_one_perceiver_call():
    model = tiny(LLAMA, max_num_frames=4)
    calls = []
    model.perceiver.register_forward_hook(lambda *a: calls.append(1))
    frames = torch.randn(1 + 3 + 2, 3, 64, 64)
    counts = torch.tensor([1, 3, 2])
    with torch.no_grad():
        got = model.encode_media(frames, counts)
        assert len(calls) == 1  # one call whatever the mix (ZeRO-3 needs the same calls on every rank)
        starts = [0, 1, 4]
        for m, (s0, f) in enumerate(zip(starts, counts.tolist())):
            want = model.encode_vision_x(frames[s0:s0 + f][None, None])[0, 0]
            torch.testing.assert_close(got[m], want, atol=2e-5, rtol=1e-4)


def test_batch_without_media_runs_every_module_and_changes_nothing(demo_index):
    from otterfast.models.otter import otter_inputs

    idx = PreparedIndex(demo_index)
    model = build_model(load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml")), idx.tok).train()
    batch = next(b for b in map(as_torch, NativeLoader(idx, batch_size=1, pack=True, capacity=1024, seed=0))
                 if len(b["media_row"]) > 0)
    keep = batch["media_pos"].min()  # cut the row before its first image: text only
    batch = {**batch, "input_ids": batch["input_ids"][:, :keep], "labels": batch["labels"][:, :keep],
             "position_ids": batch["position_ids"][:, :keep], "segment_ids": batch["segment_ids"][:, :keep],
             "pixel_values": batch["pixel_values"][:0], "media_frames": batch["media_frames"][:0],
             "media_row": batch["media_row"][:0], "media_pos": batch["media_pos"][:0]}
    loss, n = batch_loss(model, batch)
    (loss / max(n, 1)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        plain = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]).logits
        blank = model(**otter_inputs(model, batch)).logits
    torch.testing.assert_close(blank, plain, rtol=0, atol=0)


def test_flattened_rows_equal_separate_rows(demo_index):
    """flash-attn's layout (rows joined, media counts continuing) gives the same logits as separate rows."""
    idx = PreparedIndex(demo_index)
    model = otter_for_index(idx, LLAMA)
    batch = next(b for b in map(as_torch, NativeLoader(idx, batch_size=3, pack=True, capacity=512, seed=1))
                 if b["input_ids"].shape[0] == 3 and len(b["media_row"]) >= 3)
    with torch.no_grad():
        rows = otter_forward(model, batch, flatten=False).logits
        flat = otter_forward(model, batch, flatten=True).logits
    torch.testing.assert_close(flat, rows, atol=3e-5, rtol=1e-4)


def test_lora_on_a_pretrained_checkpoint_keeps_its_weights(tmp_path):
    model = tiny(LLAMA)
    model.save_pretrained(str(tmp_path))
    cfg = load_model_config({"architecture": "otter", "checkpoint": str(tmp_path),
                             "otter": {"lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}})
    lora = build_model(cfg, {"vocab_size": 100, "media_id": IMG, "eoc_id": EOC})
    sd = lora.state_dict()
    q = "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj"
    torch.testing.assert_close(sd[q + ".base_layer.weight"], model.state_dict()[q + ".weight"], rtol=0, atol=0)
    assert any("lora_A" in n for n, p in lora.named_parameters() if p.requires_grad)
    ids = torch.tensor([[1, IMG, 5, 6]])
    vx = torch.randn(1, 1, 1, 3, 64, 64)
    with torch.no_grad():  # LoRA B starts at zero: the adapted model is the checkpoint's
        torch.testing.assert_close(lora.eval()(ids, vision_x=vx).logits, model(ids, vision_x=vx).logits)


def test_packing_refuses_the_all_previous_media_variant():
    model = tiny(LLAMA, only_attend_immediate_media=False)
    with pytest.raises(ValueError, match="only_attend_immediate_media"):
        model(torch.tensor([[1, IMG, 5, 1, 6]]), media=torch.zeros(1, 1, 5, 32),
              segment_ids=torch.tensor([[0, 0, 0, 1, 1]]))


def test_same_module_calls_with_and_without_media(demo_index):
    """ZeRO-3: every rank calls the same modules in the same order, with or without images in its batch."""
    from test_otterhd import module_call_order

    idx = PreparedIndex(demo_index)
    model = build_model(load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml")), idx.tok).train()
    batches = list(map(as_torch, NativeLoader(idx, batch_size=1, pack=True, capacity=256, seed=0)))
    with_media = next(b for b in batches if len(b["media_row"]) > 0 and len(set(b["media_frames"].tolist())) == 1)
    without = next(b for b in batches if len(b["media_row"]) == 0)
    assert module_call_order(model, with_media) == module_call_order(model, without)
