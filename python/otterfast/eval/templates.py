"""Prompt templates for models without their own (fake, replay, `external`), named as in otterfast.generate.

A model that has a `render(question, n_images)` method (the Otter/OtterHD adapter) templates its own prompts, so
a checkpoint gets the template it was trained with; these strings match otterfast.generate.templates for one
query without in-context examples (eval-reference 1.0, 2.1, 2.4):

    otter-image  "<image>" * n + "User: {q} GPT:<answer>"     Otter's benchmarks (alias: otter)
    simple       "<image>" * n + "User:{q} GPT:<answer>"      Otter's/otterfast's training format
    otterhd      "User: {q} Assistant:\\x04"                   OtterHD's benchmarks; image patches come from the model
    fuyu         "User:{q} Assistant:\\x04"                    otterfast's Fuyu training format
    raw          "{q}"
"""

from __future__ import annotations

IMAGE, ANSWER, BOA = "<image>", "<answer>", "\x04"
TEMPLATES = ("otter-image", "simple", "otterhd", "fuyu", "raw")
ALIASES = {"otter": "otter-image"}
# Where the answer follows the prompt with a space in that format (`<answer> {a}`, `\x04 {a}`), a likelihood
# option gets the same leading space.
_SPACE_BEFORE_ANSWER = {"otter-image": True, "simple": False, "llama2": False, "otterhd": True, "fuyu": True,
                        "raw": False}


def canonical(template: str) -> str:
    t = ALIASES.get(template, template)
    if t not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)} (alias otter)")
    return t


def wrap(template: str, question: str, n_images: int) -> str:
    t = canonical(template)
    if t == "otter-image":
        return IMAGE * n_images + f"User: {question} GPT:{ANSWER}"
    if t == "simple":
        return IMAGE * n_images + f"User:{question} GPT:{ANSWER}"
    if t == "otterhd":
        return f"User: {question} Assistant:{BOA}"
    if t == "fuyu":
        return f"User:{question} Assistant:{BOA}"
    return question


def continuation(template: str | None, option: str) -> str:
    """A likelihood option as appended after the templated prompt."""
    t = ALIASES.get(template or "raw", template or "raw")
    return (" " + option) if _SPACE_BEFORE_ANSWER.get(t, True) else option
