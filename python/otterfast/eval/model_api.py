"""The protocol a model must implement to be evaluated, and how a runner config's model entry becomes one.

An adapter (otterfast.generate, written separately) implements `EvalModel` for Otter and OtterHD checkpoints.
Contract, in short (docs/eval.md has the full text):

- `template` names the prompt wrapping the runner applies before calling the model ("otter", "otterhd" or "raw",
  see eval/templates.py). The runner passes the fully wrapped prompt; the adapter adds nothing textual except what
  its model needs outside the text (OtterHD: image patch tokens before, the \\x04 boa token after).
- `images` is a list of RGB PIL images in prompt order; for the otter template there is one "<image>" per image at
  the start of the prompt. An empty list means a text-only row.
- `generate(prompt, images, **decode)` returns only the newly generated text (no prompt, no <|endofchunk|>, no
  EOS), stripped. `decode` holds transformers-style keys: max_new_tokens, num_beams, no_repeat_ngram_size,
  do_sample, temperature, top_p, top_k, length_penalty.
- `option_logliks(prompt, images, options)` returns, for each option string, the SUM of log p(token) over the
  option's tokens only, each conditioned on the prompt (and images) and the option's earlier tokens. Prompt tokens
  never enter the sum. The option is appended verbatim to the prompt (after the boa token for OtterHD); tokenize
  prompt + option together and score the tokens past the prompt's length, so merges at the boundary are handled
  the way the model saw them in training. Natural logarithm; float('nan') for an option that cannot be scored.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

MODEL_KINDS = ("otter", "otterhd", "replay", "external")

# Otter's benchmark settings (eval-reference 1.0, 2.2): Otter beams 3 with no_repeat_ngram_size 3; OtterHD greedy.
DEFAULT_DECODE: dict[str, dict[str, Any]] = {
    "otter": {"max_new_tokens": 512, "num_beams": 3, "no_repeat_ngram_size": 3},
    "otterhd": {"max_new_tokens": 256, "num_beams": 1, "do_sample": False},
}
DEFAULT_TEMPLATE = {"otter": "otter", "otterhd": "otterhd"}


@runtime_checkable
class EvalModel(Protocol):
    name: str
    template: str

    def generate(self, prompt: str, images: list, **decode: Any) -> str: ...

    def option_logliks(self, prompt: str, images: list, options: list[str]) -> list[float]: ...


class ReplayModel:
    """Replies read back from earlier predictions files, looked up by dataset name and parquet row."""

    template = "otter"

    def __init__(self, name: str, predictions: dict[str, str] | str, template: str | None = None):
        self.name = name
        self.predictions = predictions
        if template:
            self.template = template
        self._cache: dict[str, dict[int, dict]] = {}

    def path_for(self, dataset: str) -> str:
        if isinstance(self.predictions, dict):
            if dataset not in self.predictions:
                raise KeyError(f"replay model {self.name!r}: no predictions file for dataset {dataset!r}; "
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
        return impl(spec)
    if kind == "external":
        raise ValueError(f"model {spec.get('name')!r}: kind external is supplied programmatically "
                         "(run_config(..., models={name: obj}))")
    raise ValueError(f"model {spec.get('name')!r}: unknown kind {kind!r}; valid: {list(MODEL_KINDS)}")


def describe(model: Any) -> dict:
    return {"name": getattr(model, "name", "?"), "template": getattr(model, "template", None),
            "class": type(model).__name__}


__all__ = ["EvalModel", "ReplayModel", "load_eval_model", "DEFAULT_DECODE", "MODEL_KINDS", "describe"]
