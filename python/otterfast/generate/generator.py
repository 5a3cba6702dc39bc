"""Load an Otter or OtterHD model folder once; generate replies and score options for images + a question.

    g = Generator("runs/demo/export")                                    # otterfast export or a published copy
    g.generate("What is in the picture?", [img])                         # the reply: new tokens only
    g.generate("And here?", [img_a, img_b, query_img], examples=[("What is it?", "a cat"), ("...", "...")])
    g.option_logliks("Which animal? Answer:", [img], [" cat", " dog"])   # sum of log p over each option's tokens

A model folder holds config.json (model_type `otter` or `fuyu`), safetensors weights, a tokenizer (in the folder
or in its `tokenizer/` subfolder) and, when written by `otterfast train`, `otterfast.json` naming the prompt format
it was trained with: that format's template is the default.

Otter media: one media per `<image>`, in order (examples first), each image a 1-frame media; `video=True` makes
all images the frames of one media. Generation stops at `<|endofchunk|>` or EOS and never emits `<image>`; the
KV cache keeps generated tokens attending their media (`legacy=True`: Otter's zeroing, otter-reference 3.7).
OtterHD: each image's patch tokens (rows of placeholders, each row closed by a newline token) come before BOS;
`resolution` scales the short edge first (None: the image's own size, shrunk to 1080x1920 when larger).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from ..config import check_keys
from ..data import images as imgs
from ..data.prompts import EOU, IMAGE
from ..data.tokenizer import load_tokenizer
from .templates import FROM_TRAINING_FORMAT, TEMPLATES, render

# Decoding defaults by model (eval-reference 2.2): Otter's benchmarks / demos, and OtterHD's benchmark.
OTTER_DECODE = {"max_new_tokens": 512, "num_beams": 3, "no_repeat_ngram_size": 3, "do_sample": False}
OTTERHD_DECODE = {"max_new_tokens": 256, "num_beams": 1, "do_sample": False}


def _find_tokenizer(path: str) -> str:
    for cand in (path, os.path.join(path, "tokenizer")):
        if os.path.exists(os.path.join(cand, "tokenizer.json")) or os.path.exists(os.path.join(cand, "tokenizer_config.json")):
            return cand
    raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json) in the folder or in its tokenizer/ subfolder; "
                            "pass tokenizer=...")


class Generator:
    def __init__(self, path: str, tokenizer: str | None = None, device: str = "cpu", dtype: str | None = None,
                 image_transform: str | None = None, template: str | None = None):
        conf_path = os.path.join(path, "config.json")
        if not os.path.exists(conf_path):
            raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
        with open(conf_path) as f:
            model_type = json.load(f).get("model_type")
        meta_path = os.path.join(path, "otterfast.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        torch_dtype = getattr(torch, dtype) if dtype else None
        if model_type == "otter":
            from ..models.otter import OtterForConditionalGeneration

            self.kind = "otter"
            self.model = OtterForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
            fmt = meta.get("format", "simple")
        elif model_type == "fuyu":
            from transformers import FuyuForCausalLM

            self.kind = "otterhd"
            self.model = FuyuForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
            fmt = "fuyu"
        else:
            raise ValueError(f"{conf_path}: model_type {model_type!r} is neither otter nor fuyu")
        self.model.to(device).eval()
        # Argument names that changed within transformers 5: Fuyu's patches (`pixel_values`, before `image_patches`)
        # and the KV cache (`cache`, before `past_key_values`; Otter's forward takes `cache`).
        params = inspect.signature(self.model.forward).parameters
        self._patches_kwarg = "pixel_values" if "pixel_values" in params else "image_patches"
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.device = device
        self.tok, self.info = load_tokenizer(tokenizer or _find_tokenizer(path), fmt)
        vocab = self.model.get_input_embeddings().weight.shape[0] if self.kind == "otterhd" else \
            self.model.lang_encoder.get_input_embeddings().weight.shape[0]
        if len(self.tok) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tok)} tokens but the model's embeddings {vocab}: "
                             "wrong tokenizer for this checkpoint?")
        if self.kind == "otter":
            self.model.config.media_token_id = self.info.media_id
            self.model.config.eoc_token_id = self.info.eoc_id
        if "format" in meta:
            default = FROM_TRAINING_FORMAT[meta["format"]]
        else:
            default = "otter-image" if self.kind == "otter" else "otterhd"
        self.template = template or default
        self._check_template(self.template)
        # pixels as in training: the transform otterfast trained with, else CLIP's (Otter's benchmarks)
        eou = self.tok.convert_tokens_to_ids(EOU) if EOU in self.tok.get_vocab() else None
        self._eou_id = eou if self.info.format == "idefics" else None
        self.image_transform = imgs.IMAGE_TRANSFORMS[image_transform or meta.get("image_transform", "clip")]
        self.name = f"{self.kind}:{os.path.basename(os.path.normpath(path))}"

    def _check_template(self, template: str) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
        family = TEMPLATES[template].family
        if family is not None and family != ("otter" if self.kind == "otter" else "fuyu"):
            raise ValueError(f"template {template!r} is for {family} models, this is {self.kind}")

    # ------------------------------------------------------------------------------------------------ inputs
    def prompt(self, query: str, examples=(), n_images: int = 1, template: str | None = None) -> str:
        template = template or self.template
        self._check_template(template)
        return render(template, query, list(examples), with_image=n_images > 0)

    def inputs(self, text: str, images=(), video: bool = False, resolution: int | None = None) -> dict:
        """Token ids and media of one prompt (batch of 1) on the model's device."""
        for im in images:  # the loaders' size rule, before any transform allocates (data/images.py)
            imgs.check_size(*im.size)
        images = [im.convert("RGB") for im in images]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = [self.info.bos_id] if self.info.bos_id is not None else []
        if self.kind == "otter":
            n_img = sum(1 for t in ids if t == self.info.media_id)
            expect = (1 if images else 0) if video else len(images)
            if n_img != expect:
                raise ValueError(f"the prompt has {n_img} {IMAGE} for {len(images)} image(s)"
                                 + (" (video: one media)" if video else " (one media per <image>)"))
            out = {"input_ids": torch.tensor([bos + ids])}
            if images:
                size = self.model.config.vision_config.image_size
                px = torch.from_numpy(np.stack([self.image_transform(im, size) for im in images]))
                out["vision_x"] = px[None, None] if video else px[None, :, None]  # (1, T_img, F, 3, H, W)
            return {k: v.to(self.device) for k, v in out.items()}
        patch_ids, patches = [], []
        for im in images:
            if resolution and resolution > 0:  # -1 or None: the image's own size (Otter's `resolution=-1`)
                s = resolution / min(im.size)
                size = (math.ceil(im.width * s), math.ceil(im.height * s))
                imgs.check_resized(f"--resolution {resolution}", im.size, size, imgs.DEFAULT_MAX_IMAGE_PIXELS)
                im = im.resize(size, imgs.Image.LANCZOS)
            p, rows, cols = imgs.fuyu_patches(im)
            t, _ = imgs.fuyu_image_tokens(rows, cols, self.info.fuyu_placeholder_id, self.info.fuyu_newline_id)
            patch_ids += t.tolist()
            patches.append(p)
        out = {"input_ids": torch.tensor([patch_ids + bos + ids])}
        if patches:
            out[self._patches_kwarg] = torch.from_numpy(np.concatenate(patches))[None]
        return {k: v.to(self.device) for k, v in out.items()}

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, query: str, images=(), examples=(), template: str | None = None, video: bool = False,
                 resolution: int | None = None, stream: bool = False, legacy: bool = False, **decode) -> str:
        """The reply to `query` about `images` (examples' images first), decoded from the new tokens only."""
        text = self.prompt(query, examples, len(images), template)
        return self.generate_text(text, images, video=video, resolution=resolution, stream=stream, legacy=legacy,
                                  **decode)

    @torch.no_grad()
    def generate_text(self, text: str, images=(), video: bool = False, resolution: int | None = None,
                      stream: bool = False, legacy: bool = False, on_text=None, should_stop=None, **decode) -> str:
        """As `generate`, for an already templated prompt.

        Streaming (one beam): `stream` prints the text as it comes; `on_text(piece)` receives it instead (the
        pieces join to the reply before stripping). `should_stop()` is asked after every token; True ends the
        generation there (otterfast serve: a client that went away). `last_new_tokens` then holds how many
        tokens the reply has and `last_hit_stop_token` whether it ended at <|endofchunk|> / EOS."""
        inputs = self.inputs(text, images, video, resolution)
        settings = {**(OTTER_DECODE if self.kind == "otter" else OTTERHD_DECODE), **decode}
        settings.setdefault("pad_token_id", self.info.pad_id)
        if stream or on_text is not None:
            settings["num_beams"] = 1  # transformers streams a single beam only
            settings["streamer"] = (_TextCallback(self.tok, on_text) if on_text is not None else
                                    TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True))
        if should_stop is not None:
            settings["stopping_criteria"] = StoppingCriteriaList([_StopWhen(should_stop)])
        n = inputs["input_ids"].shape[1]
        if self.kind == "otter":
            if self._eou_id is not None:  # idefics-format models close a turn with <end_of_utterance>
                settings.setdefault("eos_token_id", [t for t in (self.info.eoc_id, self.info.eos_id, self._eou_id)
                                                     if t is not None])
            out = self.model.generate(legacy_media_masking=legacy, **inputs, **settings)
        else:
            settings.setdefault("eos_token_id", self.info.eos_id)
            out = self.model.generate(**inputs, **settings)
        new = out[0, n:].tolist()
        stops = {t for t in (self.info.eoc_id, self.info.eos_id, self._eou_id) if t is not None}
        self.last_hit_stop_token = False
        for i, t in enumerate(new):
            if t in stops:
                new = new[:i]
                self.last_hit_stop_token = True
                break
        self.last_new_tokens = len(new)
        if stream:
            sys.stdout.flush()
        return self.tok.decode(new, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------- option likelihood
    @torch.no_grad()
    def option_logliks(self, text: str, images, options: list[str], video: bool = False,
                       resolution: int | None = None) -> list[float]:
        """For each option: sum of log p(option token | prompt, earlier option tokens), over the option's tokens only.

        `text` is an already templated prompt; each option is tokenized on its own and appended (so the prompt's
        tokens are the same for every option).
        """
        base = self.inputs(text, images, video, resolution)
        ids = base["input_ids"]
        # The prompt (images included) runs once; each option then continues its KV cache, which is cropped back
        # to the prompt afterwards: one long forward plus N short ones instead of N long ones (the prompt is
        # hundreds to thousands of tokens with images; options a few). Same scores as N full forwards (tested).
        if self.kind == "otter":
            media = self.model.encode_vision_x(base["vision_x"]) if "vision_x" in base else None
            first = dict(media=media)
            cont = dict(media=media, media_count_before=(ids == self.model.media_token_id).sum(1))
        else:
            first = {self._patches_kwarg: base[self._patches_kwarg]} if self._patches_kwarg in base else {}
            cont = {}
        out = self.model(input_ids=ids, use_cache=True, **first)
        cache = out.past_key_values
        last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = []
        for opt in options:
            o = self.tok(opt, add_special_tokens=False)["input_ids"]
            if not o:
                raise ValueError(f"option {opt!r} has no tokens")
            score = float(last[o[0]])
            if len(o) > 1:  # the option's later tokens, given the prompt and its earlier tokens
                step = self.model(input_ids=torch.tensor([o[:-1]], device=ids.device), use_cache=True,
                                  **{self._cache_kwarg: cache}, **cont)
                logp = torch.log_softmax(step.logits[0].float(), dim=-1)
                score += float(logp.gather(1, torch.tensor(o[1:], device=ids.device)[:, None]).sum())
                try:
                    cache.crop(-(len(o) - 1))  # back to the prompt alone (a negative count: what to drop)
                except (RuntimeError, ValueError):  # e.g. a sliding-window layer that kept no past: recompute
                    cache = self.model(input_ids=ids, use_cache=True, **first).past_key_values
            scores.append(score)
        return scores


class _TextCallback(TextStreamer):
    """transformers' TextStreamer (whole words, prompt skipped, special tokens dropped), handing each piece to a
    callback instead of printing it."""

    def __init__(self, tok, on_text):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class _StopWhen(StoppingCriteria):
    """Ends every row when `should_stop()` says so (asked once per generated token)."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def load_eval_model(spec: dict) -> Generator:
    """An eval runner's model spec {kind: otter|otterhd, path, tokenizer?, device?, dtype?, template?, ...}."""
    check_keys(spec, sorted({"kind", "path", "tokenizer", "device", "dtype", "template", "image_transform", "name"}),
               "model spec")
    g = Generator(spec["path"], tokenizer=spec.get("tokenizer"), device=spec.get("device", "cpu"),
                  dtype=spec.get("dtype"), image_transform=spec.get("image_transform"),
                  template=spec.get("template"))
    if spec.get("kind") and spec["kind"] != g.kind:
        raise ValueError(f"model spec says kind {spec['kind']!r} but {spec['path']} holds an {g.kind} model")
    if spec.get("name"):
        g.name = spec["name"]
    return g
