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
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GenerationMixin
from transformers import PreTrainedConfig, PreTrainedModel

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.x before SubConfigSpec (e.g. 5.17, the GPU image's): the older `sub_configs`
    SubConfigSpec = None
from transformers.modeling_outputs import CausalLMOutputWithPast

from .flamingo import GatedCrossAttentionBlock, PerceiverResampler, text_time_from_ids
from .lora import inject_lora, merge_lora_
from .model_yaml import ModelYaml, from_yaml_dict
from .otterhd import flatten_rows
from .packing import additive_block_causal_mask


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
    loop, caches and masks work unchanged.
    """

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None,
                 conditioning: Conditioning):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self._cond = conditioning  # a plain attribute: shared, not a submodule

    def forward(self, hidden_states, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            media, text_time = self._cond.media, self._cond.text_time
            B, S = hidden_states.shape[:2]
            if media is None:  # the LM called on text alone: the blocks' feed-forward halves still apply
                media = hidden_states.new_zeros(B, 0, 1, self.gated_cross_attn_layer.attn.to_kv.in_features)
            if text_time is None:
                text_time = torch.zeros(B, S, dtype=torch.long, device=hidden_states.device)
            hidden_states = self.gated_cross_attn_layer(hidden_states, media.to(hidden_states.dtype), text_time)
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
        if segment_ids is not None and (attention_mask is None or attention_mask.dim() == 2):
            if _uses_flash(self.lang_encoder) and position_ids is not None:
                # flash-attn varlen: transformers reads the samples' boundaries from the restarting position_ids
                attention_mask = None
            else:
                attention_mask = additive_block_causal_mask(segment_ids, self.lang_encoder.dtype)
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


# ------------------------------------------------------------------------------------- otterfast model config
@dataclass
class OtterModelConfig(ModelYaml):
    """A model YAML of configs/models/ (architecture: otter).

    `checkpoint`: a local Otter checkpoint folder (config.json + safetensors, e.g. a downloaded
    luodian/OTTER-MPT7B-Init). Else a new Otter: `lang_encoder` (a local transformers causal-LM folder, or a
    `.gguf` file) and `vision_encoder` (a local CLIP or CLIP-vision folder) give pretrained parts, as Otter's
    -Init checkpoints were made; what is not given is randomly initialised from `otter`'s `text_config` /
    `vision_config`; the Flamingo parts are always new (gates at 0). `otter`: OtterConfig fields.
    `media_token_id` / `eoc_token_id` and the vocabulary come from the prepared index's tokenizer.
    """

    architecture: str = "otter"
    checkpoint: str | None = None
    lang_encoder: str | None = None
    vision_encoder: str | None = None
    otter: dict = field(default_factory=dict)
    dtype: str = "float32"
    # the LM's self-attention: "sdpa" (block-diagonal mask on packed rows), "flash_attention_2" (varlen; needs
    # flash-attn, CUDA and an LM transformers runs with it, e.g. LLaMA), "eager", or "auto": flash-attn when it
    # imports, CUDA is present and the LM supports it, else the LM's default
    attn_implementation: str = "auto"

    @classmethod
    def from_dict(cls, doc: dict, where: str = "model config") -> "OtterModelConfig":
        cfg = from_yaml_dict(cls, doc, where, "otter")
        known = set(OtterConfig.__annotations__)
        bad = sorted(set(cfg.otter) - known)
        if bad:
            raise ValueError(f"{where}: unknown otter key(s) {bad}; valid: {sorted(known)}")
        return cfg


def build_otter(cfg: OtterModelConfig, tok: dict) -> OtterForConditionalGeneration:
    """From the local checkpoint or random init; the vocabulary grown to the tokenizer's when it is larger."""
    import os

    dtype = getattr(torch, cfg.dtype)
    doc = dict(cfg.otter)
    # LoRA goes in after the pretrained weights are loaded: injected first, it would move each adapted weight to
    # `<name>.base_layer.weight`, where the checkpoint's tensor does not land (left randomly initialised).
    lora = doc.pop("lora_config", None)
    if cfg.checkpoint:
        if not os.path.isdir(cfg.checkpoint):
            raise FileNotFoundError(f"Otter checkpoint folder not found: {cfg.checkpoint} (a local copy is needed)")
        if lora:
            doc["lora_config"] = None
        model = OtterForConditionalGeneration.from_pretrained(cfg.checkpoint, local_files_only=True, dtype=dtype,
                                                              **doc)
    else:
        text = dict(doc.pop("text_config", {}) or {})
        vision = dict(doc.pop("vision_config", {}) or {})
        lm = clip = None
        if cfg.lang_encoder:
            lm = _load_pretrained_lm(cfg.lang_encoder, dtype)
            text = {**lm.config.to_dict(), **text}
        else:
            text.setdefault("vocab_size", tok["vocab_size"])
        if cfg.vision_encoder:
            clip = CLIPVisionModel.from_pretrained(_local_dir(cfg.vision_encoder), local_files_only=True, dtype=dtype)
            vision = {**clip.config.to_dict(), **vision}
        conf = OtterConfig(text_config=text, vision_config=vision, **doc)
        model = OtterForConditionalGeneration(conf).to(dtype)
        if lm is not None:
            load_lm_weights(model, lm.state_dict())
        if clip is not None:
            model.vision_encoder.load_state_dict(clip.state_dict())
    _set_attn_implementation(model.lang_encoder, cfg.attn_implementation)
    if model.config.media_token_id is None:
        model.config.media_token_id = tok["media_id"]
    if model.config.eoc_token_id is None:
        model.config.eoc_token_id = tok.get("eoc_id")
    if tok["vocab_size"] > model.lang_encoder.get_input_embeddings().weight.shape[0]:
        model.lang_encoder.resize_token_embeddings(tok["vocab_size"])
    if lora:
        model.config.lora_config = dict(lora)
    model.set_trainable()
    return model


def _uses_flash(lm: nn.Module) -> bool:
    return str(getattr(lm.config, "_attn_implementation", "")).startswith("flash")


def _set_attn_implementation(lm: nn.Module, requested: str) -> None:
    from .otterhd import attn_implementation

    if requested == "auto":
        if attn_implementation("auto") != "flash_attention_2" or not getattr(lm, "_supports_flash_attn", False):
            return  # keep the LM's default
        requested = "flash_attention_2"
    lm.set_attn_implementation(requested)


def _local_dir(path: str) -> str:
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (a local copy is needed; nothing is downloaded)")
    return path


def _load_pretrained_lm(path: str, dtype):
    """A transformers causal LM from a local folder, or from a .gguf file (dequantised by transformers)."""
    import os

    _local_dir(path)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                                    local_files_only=True, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def load_lm_weights(model: OtterForConditionalGeneration, state: dict) -> None:
    """A plain LM's state dict into the wrapped LM: `<layers>.N.X` -> `<layers>.N.decoder_layer.X`; strict."""
    prefix = model.decoder_layers_path + "."
    mapped = {}
    for k, v in state.items():
        if k.startswith(prefix):
            n, _, rest = k[len(prefix):].partition(".")
            k = f"{prefix}{n}.decoder_layer.{rest}"
        mapped[k] = v
    missing, unexpected = model.lang_encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if "gated_cross_attn_layer" not in k and "lora_" not in k]
    if missing or unexpected:
        raise ValueError(f"the pretrained LM does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.lang_encoder.tie_weights()


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
    if flatten if flatten is not None else _uses_flash(model.lang_encoder):
        # flash-attn varlen: the B rows as one row (see otterhd.flatten_rows); media in row order, so the
        # row-level media count continues across the joined rows
        flat = flatten_rows(batch, ("input_ids", "position_ids"))
        return {"input_ids": flat["input_ids"], "media": latents[None], "position_ids": flat["position_ids"],
                "segment_ids": flat["segment_ids"]}
    return {"input_ids": batch["input_ids"], "media": dense_latents(latents, rows, B),
            "position_ids": batch["position_ids"], "segment_ids": batch["segment_ids"]}


def otter_forward(model: OtterForConditionalGeneration, batch: dict,
                  flatten: bool | None = None) -> CausalLMOutputWithPast:
    """Packed forward of an Otter model on a loader batch; returns the LM's output, logits (B, T, vocab)."""
    out = model(**otter_inputs(model, batch, flatten))
    out.logits = out.logits.view(*batch["input_ids"].shape, -1)
    return out


def flops_per_token(model: OtterForConditionalGeneration, seq_len: int, media_per_token: float = 0.0) -> float:
    """Training FLOPs per text token (forward + backward), for MFU.

    LM and cross-attention: 6 FLOPs per trainable weight, 4 per frozen one (forward + the input gradient; no
    weight gradient), plus 12 * layers * d * seq_len for self-attention scores and values (PaLM appendix B) and
    12 * xattn_layers * inner * latents for cross-attention. Media (`media_per_token` images per text token):
    the frozen CLIP forward 2 * N_clip * patches and the perceiver 6 * N_perceiver * latents per image. The input
    embedding table is not counted (a lookup) unless it is tied to the output projection (MPT).
    """
    cfg = model.config
    lm = model.lang_encoder
    emb = lm.get_input_embeddings().weight
    out_emb = lm.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    n_train = n_frozen = 0
    for name, p in lm.named_parameters():
        if p is emb and not tied:  # a lookup; tied (MPT), the same tensor is the output projection: counted
            continue
        if p.requires_grad:
            n_train += p.numel()
        else:
            n_frozen += p.numel()
    layers = lm.config.num_hidden_layers
    n_xattn = sum(1 for m in model.modules() if isinstance(m, GatedCrossAttentionBlock))
    L = cfg.perceiver_num_latents
    per_token = 6.0 * n_train + 4.0 * n_frozen + 12.0 * layers * lm.config.hidden_size * seq_len
    per_token += 12.0 * n_xattn * cfg.xattn_heads * cfg.xattn_dim_head * L
    if media_per_token:
        v = cfg.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        n_clip = sum(p.numel() for p in model.vision_encoder.parameters())
        n_perc = sum(p.numel() for p in model.perceiver.parameters())
        per_token += media_per_token * (2.0 * n_clip * (patches + 1) + 6.0 * n_perc * L)
    return per_token


AutoConfig.register("otter", OtterConfig, exist_ok=True)
