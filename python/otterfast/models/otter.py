"""Otter: a CLIP vision encoder, a Perceiver resampler and gated cross-attention inserted into a causal LM.

Read top to bottom: the config (Otter's config.json fields), the layer wrapper that puts a gated cross-attention
block before a decoder layer, the model (vision -> perceiver -> conditioned LM), trainable parameters, generation,
and the glue to otterfast's packed loader batches. Module names are Otter's checkpoint keys (otter-reference 3.6):
`vision_encoder.vision_model.*`, `perceiver.*`, `lang_encoder.<decoder layers>.N.decoder_layer.*` and
`...N.gated_cross_attn_layer.*`, so a published Otter checkpoint folder loads with `from_pretrained`.

What differs from Otter, on purpose:
- Media masking in generation: with a KV cache, a generated token attends to the media of its most recent
  `<image>` (counted over the whole sequence), where Otter gives it zero cross-attention (reference 3.7).
  `generate(..., legacy_media_masking=True)` reproduces Otter.
- A token whose `<image>` count exceeds the number of media gets zero cross-attention (Otter spreads it over the
  wrong media, reference 3.4).
- Packed rows: `segment_ids` restart the media count per sample, and the LM gets a block-diagonal causal mask and
  restarting positions; a packed forward equals the per-sample forwards (tests/test_otter.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GenerationMixin
from transformers import PreTrainedConfig, PreTrainedModel

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.x before SubConfigSpec (e.g. 5.17, the GPU image's): the older `sub_configs`
    SubConfigSpec = None
from transformers.modeling_outputs import CausalLMOutputWithPast

from torch.utils.checkpoint import checkpoint

from . import attention
from .flamingo import GatedCrossAttentionBlock, PerceiverResampler, text_time_from_ids
from .lora import inject_lora, merge_lora_
from .packing import PackedLayout, additive_block_causal_mask, current_layout, flatten_rows, use_layout


# ----------------------------------------------------------------------------------------------------------- config
class OtterConfig(PreTrainedConfig):
    """Otter's config.json: the fields of luodian/OTTER-* (reference 3.5) plus the sizes Otter hard-codes.

    The perceiver and cross-attention sizes default to Otter's fixed values (depth 6, 64 latents, 8 heads x 64,
    FF x4); tiny test models shrink them. Unknown keys of published configs (e.g. `only_attend_previous`) are
    kept as attributes and ignored, as Otter does.
    """

    model_type = "otter"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=CLIPVisionConfig),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mpt"),
        }
    else:
        sub_configs = {"vision_config": CLIPVisionConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cross_attn_every_n_layers: int = 4
    only_attend_immediate_media: bool = True
    max_num_frames: int | None = None
    use_media_placement_augmentation: bool = False  # read by Otter, never used for training (reference 3.1)
    media_token_id: int | None = None  # `<image>`; None: 50279+1 style ids must then be given to the model
    eoc_token_id: int | None = None  # `<|endofchunk|>`: generation stops there
    perceiver_depth: int = 6
    perceiver_num_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    # Trainable parameters (Otter's optional keys): default = perceiver, cross-attention, input embeddings and an
    # untied lm_head.
    train_full_model: bool = False
    train_vision_encoder: bool = False
    train_lang_encoder: bool = False
    lora_config: dict | None = None  # {r, lora_alpha, lora_dropout[, target_modules]}: LoRA on the LM
    fused_xattn: bool = False  # the Triton cross-attention kernel (kernels/) when the tensors are on CUDA

    if SubConfigSpec is None:
        def __post_init__(self, **kwargs):
            # what SubConfigSpec does in newer transformers: dicts (or None) become the sub-config classes
            from transformers import CONFIG_MAPPING

            if not isinstance(self.vision_config, PreTrainedConfig):
                self.vision_config = CLIPVisionConfig(**(self.vision_config or {}))
            if not isinstance(self.text_config, PreTrainedConfig):
                text = dict(self.text_config or {})
                self.text_config = CONFIG_MAPPING[text.pop("model_type", "mpt")](**text)
            super().__post_init__(**kwargs)


# ------------------------------------------------------------------------------------------------ decoder wrapper
@dataclass
class Conditioning:
    """What the gated cross-attention blocks read during one LM call; set by the model, shared by every layer."""

    media: torch.Tensor | None = None  # (B, M, L, D) perceiver latents, row-level media order
    text_time: torch.Tensor | None = None  # (B, S): 1-based media index per token, 0 for none
    legacy: bool = False  # generation, Otter's behaviour: cached steps get text_time 0
    last_time: torch.Tensor | None = None  # (B,) text_time of each row's last token so far


class OtterLayer(nn.Module):
    """A decoder layer of the LM, with a gated cross-attention block before it on every n-th layer.

    Called exactly like the decoder layer it wraps (same arguments, same return value), so the LM's own forward
    loop, caches and masks work unchanged. With `checkpointing` (activation checkpointing, training only) the
    block and the layer keep only their input and are recomputed in backward; what they read from the shared
    conditioning and the packed layout is captured here and handed to the recomputation explicitly (both are
    cleared when the forward returns, before backward runs).
    """

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None,
                 conditioning: Conditioning):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self._cond = conditioning  # a plain attribute: shared, not a submodule
        self.checkpointing = False

    def forward(self, hidden_states, *args, **kwargs):
        media = text_time = None
        if self.gated_cross_attn_layer is not None:
            media, text_time = self._cond.media, self._cond.text_time
            B, S = hidden_states.shape[:2]
            if media is None:  # the LM called on text alone: the blocks' feed-forward halves still apply
                media = hidden_states.new_zeros(B, 0, 1, self.gated_cross_attn_layer.attn.to_kv.in_features)
            if text_time is None:
                text_time = torch.zeros(B, S, dtype=torch.long, device=hidden_states.device)
            media = media.to(hidden_states.dtype)
        layout = current_layout()
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # as transformers' own checkpointing: no KV cache (the recomputation would append to it a second time)
            for name in ("cache", "past_key_values", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return checkpoint(self._run, hidden_states, media, text_time, layout, *args, use_reentrant=False,
                              **kwargs)
        return self._run(hidden_states, media, text_time, layout, *args, **kwargs)

    def _run(self, hidden_states, media, text_time, layout: PackedLayout | None, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            hidden_states = self.gated_cross_attn_layer(hidden_states, media, text_time)
        with use_layout(layout):
            return self.decoder_layer(hidden_states, *args, **kwargs)


_KNOWN_LAYER_PATHS = ("model.layers", "transformer.blocks", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers_path(lm: nn.Module) -> str:
    """Where the LM keeps its decoder layers: a known path, else the one ModuleList as long as the layer count."""
    n = lm.config.num_hidden_layers
    for path in _KNOWN_LAYER_PATHS:
        try:
            mod = lm.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return path
    found = [name for name, m in lm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}: ModuleLists of length {n}: {found}")
    return found[0]


# ---------------------------------------------------------------------------------------------------------- model
class OtterPreTrainedModel(PreTrainedModel):
    config_class = OtterConfig
    config: OtterConfig
    base_model_prefix = "otter"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OtterLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Called by transformers only for weights not loaded from a checkpoint (and at random init). The vision
        # encoder and the LM initialise their own modules; these are the Flamingo parts.
        if isinstance(module, PerceiverResampler):
            nn.init.normal_(module.latents)  # OpenFlamingo: randn
            if module.frame_embs is not None:
                nn.init.normal_(module.frame_embs)
        elif isinstance(module, GatedCrossAttentionBlock):
            nn.init.zeros_(module.attn_gate)  # gates at 0: the LM is unchanged at init
            nn.init.zeros_(module.ff_gate)
        elif getattr(module, "_flamingo_part", False) and isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()  # PyTorch's defaults, as OpenFlamingo


class OtterForConditionalGeneration(OtterPreTrainedModel, GenerationMixin):
    """vision_encoder (CLIP, frozen) -> perceiver -> lang_encoder (a causal LM with gated cross-attention)."""

    def __init__(self, config: OtterConfig):
        super().__init__(config)
        self.vision_encoder = CLIPVisionModel(config.vision_config)
        dim_visual = config.vision_config.hidden_size
        self.perceiver = PerceiverResampler(dim=dim_visual, depth=config.perceiver_depth,
                                            dim_head=config.perceiver_dim_head, heads=config.perceiver_heads,
                                            num_latents=config.perceiver_num_latents,
                                            max_num_frames=config.max_num_frames, ff_mult=config.ff_mult)
        self.lang_encoder = AutoModelForCausalLM.from_config(config.text_config)
        self._cond = Conditioning()
        self._insert_cross_attention(dim_visual)
        for part in [self.perceiver] + [m for m in self.modules() if isinstance(m, GatedCrossAttentionBlock)]:
            for m in part.modules():
                m._flamingo_part = True
        lm_params = inspect.signature(self.lang_encoder.forward).parameters
        self._lm_takes_position_ids = "position_ids" in lm_params
        # the LM's name for its KV cache: `cache` in current transformers (`past_key_values` deprecated), before it
        # `past_key_values` (e.g. 5.17)
        self._lm_cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"
        self.post_init()
        self.set_trainable()

    def _insert_cross_attention(self, dim_visual: int) -> None:
        cfg = self.config
        path = decoder_layers_path(self.lang_encoder)
        parent_path, _, name = path.rpartition(".")
        parent = self.lang_encoder.get_submodule(parent_path) if parent_path else self.lang_encoder
        d_lm = self.lang_encoder.config.hidden_size
        n = cfg.cross_attn_every_n_layers
        wrapped = []
        for i, layer in enumerate(getattr(parent, name)):
            xattn = None
            if (i + 1) % n == 0:
                xattn = GatedCrossAttentionBlock(d_lm, dim_visual, cfg.xattn_dim_head, cfg.xattn_heads, cfg.ff_mult,
                                                 only_immediate=cfg.only_attend_immediate_media)
                xattn.attn.fused = cfg.fused_xattn
            wrapped.append(OtterLayer(layer, xattn, self._cond))
        setattr(parent, name, nn.ModuleList(wrapped))
        self.decoder_layers_path = path

    # ------------------------------------------------------------------------------------------ trainable params
    def set_trainable(self) -> None:
        """Otter's selection (reference 3.2), from the config's train_* keys and lora_config."""
        cfg = self.config
        if cfg.lora_config and not getattr(self, "_lora_injected", False):
            self._inject_lora(dict(cfg.lora_config))
        full = cfg.train_full_model
        for name, p in self.named_parameters():
            p.requires_grad_(full or "lora_" in name)
        if full:
            return
        for p in self.perceiver.parameters():
            p.requires_grad_(True)
        for m in self.modules():
            if isinstance(m, GatedCrossAttentionBlock):
                m.requires_grad_(True)
        self.lang_encoder.get_input_embeddings().weight.requires_grad_(True)
        out = self.lang_encoder.get_output_embeddings()
        if out is not None:
            out.weight.requires_grad_(True)  # tied (MPT): the same tensor; untied (LLaMA): Otter trains lm_head too
        if cfg.train_vision_encoder:
            self.vision_encoder.requires_grad_(True)
        if cfg.train_lang_encoder:
            self.lang_encoder.requires_grad_(True)

    def set_activation_checkpointing(self, mode: str) -> None:
        """`none`; `decoder`: every LM layer (with its cross-attention block) keeps only its input and is recomputed
        in backward; `all`: also each perceiver block, and the CLIP encoder's layers when they train (frozen, CLIP
        keeps no activations anyway)."""
        if mode not in ("none", "decoder", "all"):
            raise ValueError(f"activation checkpointing must be none, decoder or all, got {mode!r}")
        for m in self.modules():
            if isinstance(m, OtterLayer):
                m.checkpointing = mode != "none"
        self.perceiver.checkpointing = mode == "all"
        if mode == "all":
            self.vision_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.vision_encoder.gradient_checkpointing_disable()

    def _inject_lora(self, lora: dict) -> None:
        inject_lora(self.lang_encoder, **lora)
        self._lora_injected = True

    def merge_lora(self) -> None:
        """Fold LoRA into the LM's weights and drop the adapters: Otter's key names again, for export."""
        merge_lora_(self.lang_encoder)
        self._lora_injected = False
        self.config.lora_config = None

    # ------------------------------------------------------------------------------------------------- vision
    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, Dv): CLIP patch tokens without CLS, before post-layernorm (as Otter)."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(grad):  # frozen encoder: no activations kept for backward
            dtype = self.vision_encoder.get_input_embeddings().weight.dtype
            return self.vision_encoder(pixel_values=pixel_values.to(dtype)).last_hidden_state[:, 1:, :]

    def encode_vision_x(self, vision_x: torch.Tensor) -> torch.Tensor:
        """Otter's layout (B, T_img, F, 3, H, W) -> media latents (B, T_img, L, D)."""
        B, T, F = vision_x.shape[:3]
        feats = self.encode_frames(vision_x.flatten(0, 2))
        return self.perceiver(feats.view(B, T, F, *feats.shape[1:]))

    def encode_media(self, pixel_values: torch.Tensor, media_frames: torch.Tensor) -> torch.Tensor:
        """otterfast's flat layout: frames (N, 3, H, W) of media with `media_frames` frames each -> (n_media, L, D).

        One CLIP pass over every frame (no padding frames) and one perceiver pass, media with fewer frames than
        the most padded and masked out. Exactly one call of each module per forward, whatever the batch holds:
        under ZeRO-3 every rank must run the same modules the same number of times (each call gathers their
        shards collectively), so a batch without media also runs them, on one blank frame (see otter_inputs).
        """
        n = media_frames.numel()
        if n == 0:
            raise ValueError("encode_media needs at least one media (otter_inputs adds a blank one)")
        feats = self.encode_frames(pixel_values)  # (N, P, Dv)
        F = int(media_frames.max())
        if bool((media_frames == F).all()):
            return self.perceiver(feats.view(n, 1, F, *feats.shape[1:]))[:, 0]
        starts = torch.cumsum(media_frames, 0) - media_frames
        j = torch.arange(F, device=feats.device)
        real = j[None] < media_frames[:, None]  # (n, F)
        idx = torch.where(real, starts[:, None] + j[None], torch.zeros_like(real, dtype=torch.long))
        x = feats[idx] * real[:, :, None, None].to(feats.dtype)  # (n, F, P, Dv), padding frames zero
        return self.perceiver(x[:, None], frame_mask=real[:, None])[:, 0]

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, vision_x: torch.Tensor | None = None, media: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache=None, use_cache: bool | None = None, media_count_before: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Either `vision_x` (B, T_img, F, 3, H, W) or precomputed `media` latents (B, M, L, D).

        Packed rows: give `segment_ids` (B, S) and the loader's restarting `position_ids`; the block-diagonal
        causal mask is built here when `attention_mask` is not already 4-D. A continuation of a cached prefix
        (`cache` / `past_key_values`) gives `media_count_before` (B,): each row's `<image>` count in that prefix, so
        the new tokens keep attending their media.
        """
        if vision_x is not None:
            media = self.encode_vision_x(vision_x)
        if segment_ids is not None and not self.config.only_attend_immediate_media and bool((segment_ids > 0).any()):
            # the `>=` variant would let a packed sample attend to earlier samples' media (counts are per row)
            raise ValueError("packed rows need only_attend_immediate_media (Otter's setting); pack=False otherwise")
        layout = None
        if segment_ids is not None and (attention_mask is None or attention_mask.dim() == 2):
            lm = self.lang_encoder
            cached = cache is not None or kwargs.get("past_key_values") is not None
            if attention.uses_flash(lm.config) and position_ids is not None:
                # flash-attn varlen: transformers reads the samples' boundaries from the restarting position_ids
                attention_mask = None
            elif not cached and (attention.uses_packed(lm.config) or getattr(lm, "_otterfast_mpt_packed", False)):
                # per-sample attention from the layout (models/attention.py): no (T, T) mask. MPT casts the mask
                # it is given to bool before its (patched) attention ignores it: a 1-element placeholder.
                layout = PackedLayout.from_segment_ids(segment_ids)
                attention_mask = (segment_ids.new_zeros(1, 1, 1, 1, dtype=torch.bool)
                                  if getattr(lm, "_otterfast_mpt_packed", False) else None)
            else:
                attention_mask = additive_block_causal_mask(segment_ids, lm.dtype)
        lm_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache,
                         **kwargs)
        if cache is None and "past_key_values" in kwargs:  # the older name, as transformers' generate passes it
            cache = lm_kwargs.pop("past_key_values")
        if cache is not None:
            lm_kwargs[self._lm_cache_kwarg] = cache
        if position_ids is not None and self._lm_takes_position_ids:
            lm_kwargs["position_ids"] = position_ids
        text_time = text_time_from_ids(input_ids, self.media_token_id, segment_ids)
        if media_count_before is not None:
            text_time = text_time + media_count_before.to(text_time.device).view(-1, 1)
        self._condition(media=media, text_time=text_time)
        try:
            with use_layout(layout):
                out = self.lang_encoder(**lm_kwargs)
        finally:
            self._clear()
        return out

    @property
    def media_token_id(self) -> int:
        if self.config.media_token_id is None:
            raise ValueError("config.media_token_id is not set: the id of `<image>` in the tokenizer")
        return self.config.media_token_id

    def _condition(self, **values) -> None:
        for k, v in values.items():
            setattr(self._cond, k, v)

    def _clear(self) -> None:
        for f in fields(Conditioning):
            setattr(self._cond, f.name, f.default)

    # --------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, vision_x: torch.Tensor | None = None,
                 media: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 legacy_media_masking: bool = False, **gen_kwargs):
        """Greedy / beam / sampled decoding with the LM's `generate`; the media are encoded once.

        With a KV cache each step sees only its new token, so the media count of a row is carried from step to
        step (a forward pre-hook on the LM): generated tokens keep attending their media. `<image>` is never
        generated (it would start a media that is not there). Stops at `<|endofchunk|>` (config.eoc_token_id)
        and at the LM's EOS. Returns prompt + new tokens, like transformers.
        """
        if vision_x is not None:
            media = self.encode_vision_x(vision_x)
        eos = [t for t in (self.config.eoc_token_id, self.lang_encoder.config.eos_token_id) if t is not None]
        gen_kwargs.setdefault("eos_token_id", eos or None)
        bad = list(gen_kwargs.pop("bad_words_ids", None) or []) + [[self.media_token_id]]
        hook = self.lang_encoder.register_forward_pre_hook(self._generation_hook, with_kwargs=True)
        self._condition(media=media, legacy=legacy_media_masking)
        try:
            return self.lang_encoder.generate(input_ids=input_ids, attention_mask=attention_mask,
                                              bad_words_ids=bad, **gen_kwargs)
        finally:
            hook.remove()
            self._clear()

    def _generation_hook(self, module, args, kwargs):
        """Before each LM call of `generate`: the text_time of the tokens passed in, continuing each row's count."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        cached = cache is not None and cache.get_seq_length() > 0
        c = self._cond
        if c.media is not None and c.media.shape[0] != ids.shape[0]:  # beams: rows repeated per input
            c.media = c.media.repeat_interleave(ids.shape[0] // c.media.shape[0], dim=0)
        t = (ids == self.media_token_id).long().cumsum(1)
        if cached:
            t = torch.zeros_like(t) if c.legacy else t + c.last_time[:, None]
        c.text_time = t
        # Rows keep their count across steps; beams reorder rows, but rows of one input share their count
        # because `<image>` is never generated, so the reorder cannot mix counts.
        c.last_time = t[:, -1] if not (cached and c.legacy) else c.last_time
        return args, kwargs


# ----------------------------------------------------------------------------------------- loader batches glue
def dense_latents(latents: torch.Tensor, media_row: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n_media, L, D) in row order -> (B, M, L, D), each row's media first, zero-padded."""
    n, L, D = latents.shape
    counts = torch.bincount(media_row, minlength=batch_size) if n else media_row.new_zeros(batch_size)
    M = int(counts.max()) if n else 0
    if n and not bool((media_row[1:] >= media_row[:-1]).all()):
        raise ValueError("media_row must be sorted (the loaders emit media row by row)")
    out = latents.new_zeros(batch_size, M, L, D)
    if n:
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=latents.device) - first[media_row]
        out[media_row, slot] = latents
    return out


def otter_inputs(model: OtterForConditionalGeneration, batch: dict, flatten: bool | None = None) -> dict:
    """A loader batch (torch tensors) -> forward() keyword arguments (media encoded here).

    `flatten` (default: when the LM uses flash-attn) joins the rows into one, the layout of flash-attn's varlen
    path, which transformers takes only for a single row."""
    B = batch["input_ids"].shape[0]
    frames, counts, rows = batch["pixel_values"], batch["media_frames"], batch["media_row"]
    if counts.numel() == 0:
        # No media in the batch: encode one blank frame as a media no token names (its cross-attention output is
        # exactly zero), so that every rank runs CLIP, the perceiver and the cross-attention projections
        # (ZeRO-3 gathers each module's shards collectively: a rank skipping them would hang the others).
        size = model.config.vision_config.image_size
        frames = torch.zeros(1, 3, size, size, device=batch["input_ids"].device)
        counts = torch.ones(1, dtype=torch.long, device=frames.device)
        rows = torch.zeros(1, dtype=torch.long, device=frames.device)
    latents = model.encode_media(frames, counts)
    if flatten if flatten is not None else attention.uses_flash(model.lang_encoder.config):
        # flash-attn varlen: the B rows as one row (see otterhd.flatten_rows); media in row order, so the
        # row-level media count continues across the joined rows
        flat = flatten_rows(batch, ("input_ids", "position_ids"))
        return {"input_ids": flat["input_ids"], "media": latents[None], "position_ids": flat["position_ids"],
                "segment_ids": flat["segment_ids"], "use_cache": False}
    # use_cache False: a packed batch is never continued, and the LM would otherwise keep every layer's keys and
    # values in a KV cache for nothing
    return {"input_ids": batch["input_ids"], "media": dense_latents(latents, rows, B),
            "position_ids": batch["position_ids"], "segment_ids": batch["segment_ids"], "use_cache": False}


def otter_forward(model: OtterForConditionalGeneration, batch: dict,
                  flatten: bool | None = None) -> CausalLMOutputWithPast:
    """Packed forward of an Otter model on a loader batch; returns the LM's output, logits (B, T, vocab)."""
    out = model(**otter_inputs(model, batch, flatten))
    out.logits = out.logits.view(*batch["input_ids"].shape, -1)
    return out



AutoConfig.register("otter", OtterConfig, exist_ok=True)
