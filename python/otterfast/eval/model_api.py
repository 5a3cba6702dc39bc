"""The protocol a model must implement to be evaluated, and how a runner config's model entry becomes one.

Contract (docs/eval.md has the full text):

- `render(question, n_images) -> str` (optional): the templated prompt for one query. The Otter/OtterHD adapter
  has it (the checkpoint's own template); a model without it gets eval/templates.py's `template` attribute.
- `images`: RGB PIL images in prompt order; an Otter prompt from eval/templates.py has one "<image>" per image
  ([] for text-only rows); the Otter adapter (GeneratorModel) instead gives a row's images as one video media.
- `generate(prompt, images, **decode) -> str`: the reply to an already templated prompt: new tokens only, stopped
  at <|endofchunk|> or EOS, stripped. `decode` holds transformers-style keys (max_new_tokens, num_beams,
  no_repeat_ngram_size, do_sample, temperature, top_p, top_k, length_penalty, ...).
- `option_logliks(prompt, images, options) -> list[float]`: per option, the SUM over the option's tokens only of
  the natural-log probability of each token given the prompt, the images and the option's earlier tokens; prompt
  tokens never enter the sum. NaN marks an option that could not be scored (the row then parses as `other`).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from ..config import ConfigError

MODEL_KINDS = ("otter", "otterhd", "replay", "external")

# Otter's benchmark settings (eval-reference 1.0, 2.2): Otter beams 3 with no_repeat_ngram_size 3; OtterHD greedy.
DEFAULT_DECODE: dict[str, dict[str, Any]] = {
    "otter": {"max_new_tokens": 512, "num_beams": 3, "no_repeat_ngram_size": 3},
    "otterhd": {"max_new_tokens": 256, "num_beams": 1, "do_sample": False},
}
GENERATOR_KEYS = ("tokenizer", "device", "dtype", "image_transform")  # `options` keys otterfast.generate takes


@runtime_checkable
class EvalModel(Protocol):
    name: str
    template: str

    def generate(self, prompt: str, images: list, **decode: Any) -> str: ...

    def option_logliks(self, prompt: str, images: list, options: list[str]) -> list[float]: ...


class ReplayModel:
    """Replies read back from earlier predictions files, looked up by dataset name and parquet row."""

    template = "otter-image"

    def __init__(self, name: str, predictions: dict[str, str] | str, template: str | None = None):
        self.name = name
        self.predictions = predictions
        if template:
            self.template = template
        self._cache: dict[str, dict[int, dict]] = {}

    def path_for(self, dataset: str) -> str:
        if isinstance(self.predictions, dict):
            if dataset not in self.predictions:
                raise ConfigError(f"replay model {self.name!r}: no predictions file for dataset {dataset!r}; "
                               f"it has {sorted(self.predictions)}")
            return self.predictions[dataset]
        for cand in (os.path.join(self.predictions, dataset, "predictions.jsonl"),
                     os.path.join(self.predictions, f"{dataset}.jsonl")):
            if os.path.exists(cand):
                return cand
        raise FileNotFoundError(f"replay model {self.name!r}: no {dataset}/predictions.jsonl or {dataset}.jsonl "
                                f"under {self.predictions}")

    def lines(self, dataset: str) -> dict[int, dict]:
        if dataset not in self._cache:
            from .predictions import read_predictions

            self._cache[dataset] = read_predictions(self.path_for(dataset))
        return self._cache[dataset]

    def lookup(self, dataset: str, row: int) -> dict | None:
        return self.lines(dataset).get(row)

    def generate(self, prompt: str, images: list, **decode: Any) -> str:  # pragma: no cover - runner uses lookup
        raise TypeError("ReplayModel replies by row: the runner calls lookup(dataset, row)")

    def option_logliks(self, prompt: str, images: list, options: list[str]) -> list[float]:  # pragma: no cover
        raise TypeError("ReplayModel replies by row: the runner calls lookup(dataset, row)")


def load_eval_model(spec: dict) -> EvalModel | ReplayModel:
    """A runner config's model entry -> a model. otter/otterhd load lazily through otterfast.generate."""
    kind = spec.get("kind")
    if kind == "replay":
        if not spec.get("predictions"):
            raise ValueError(f"model {spec.get('name')!r}: kind replay needs `predictions` (a folder, or a mapping "
                             "dataset name -> predictions.jsonl)")
        return ReplayModel(spec["name"], spec["predictions"], spec.get("template"))
    if kind in ("otter", "otterhd"):
        try:
            from otterfast.generate import load_eval_model as impl  # heavy (torch); imported only when needed
        except ImportError as e:
            raise NotImplementedError(
                f"model {spec.get('name')!r} (kind {kind}): otterfast.generate.load_eval_model is not available "
                f"({e}); the Otter/OtterHD eval adapters live in python/otterfast/generate/") from e
        gspec = {"kind": kind, "path": spec["path"], "name": spec.get("name")}
        if spec.get("template"):
            gspec["template"] = spec["template"]
        gspec.update(spec.get("options") or {})
        return GeneratorModel(impl(gspec), spec.get("name"))
    if kind == "external":
        raise ValueError(f"model {spec.get('name')!r}: kind external is supplied programmatically "
                         "(run_config(..., models={name: obj}))")
    raise ValueError(f"model {spec.get('name')!r}: unknown kind {kind!r}; valid: {list(MODEL_KINDS)}")


class GeneratorModel:
    """EvalModel over otterfast.generate's Generator: its template renders the prompt, then generate_text /
    option_logliks take the templated text."""

    def __init__(self, gen: Any, name: str | None = None):
        self.gen = gen
        self.name = name or getattr(gen, "name", "model")
        self.template = gen.template

    def render(self, question: str, n_images: int) -> str:
        # Otter: a row's several images (SEED-Bench video frames, multi-image questions) are the frames of one
        # media behind one <image> (eval-reference 2.1, Otter's video layout). As separate back-to-back media,
        # the question would attend to the last one only (only_attend_immediate_media).
        return self.gen.prompt(question, n_images=n_images)

    def _video(self, images: list) -> dict:
        return {"video": True} if getattr(self.gen, "kind", None) == "otter" and len(images) > 1 else {}

    def generate(self, prompt: str, images: list, **decode: Any) -> str:
        return self.gen.generate_text(prompt, images, **self._video(images), **decode)

    def option_logliks(self, prompt: str, images: list, options: list[str]) -> list[float]:
        return self.gen.option_logliks(prompt, images, options, **self._video(images))


def describe(model: Any) -> dict:
    return {"name": getattr(model, "name", "?"), "template": getattr(model, "template", None),
            "class": type(model).__name__}


__all__ = ["EvalModel", "GeneratorModel", "ReplayModel", "load_eval_model", "DEFAULT_DECODE", "MODEL_KINDS", "describe"]
