"""Prompt templates for models without their own (fake, replay, `external`): data/prompts.py's TEMPLATES, the
table otterfast.generate uses too, for one query without in-context examples (eval-reference 1.0, 2.1, 2.4).

A model that has a `render(question, n_images)` method (the Otter/OtterHD adapter) templates its own prompts, so
a checkpoint gets the template it was trained with. For example:

    otter-image  "<image>" * n + "User: {q} GPT:<answer>"     Otter's benchmarks (alias: otter)
    simple       "<image>" * n + "User:{q} GPT:<answer>"      Otter's/otterfast's training format
    otterhd      "User: {q} Assistant:\\x04"                   OtterHD's benchmarks; image patches come from the model
    fuyu         "User:{q} Assistant:\\x04"                    otterfast's Fuyu training format
    raw          "{q}"
"""

from __future__ import annotations

from ..data.prompts import TEMPLATES, answer_follows_space, prompt

ALIASES = {"otter": "otter-image"}


def canonical(template: str) -> str:
    t = ALIASES.get(template, template)
    if t not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)} (alias otter)")
    return t


def wrap(template: str, question: str, n_images: int) -> str:
    return prompt(canonical(template), question, (), n_media=n_images)


def continuation(template: str | None, option: str) -> str:
    """A likelihood option as appended after the templated prompt: with a leading space where the template's
    answer follows one (`<answer> {a}`, `\\x04 {a}`)."""
    t = ALIASES.get(template or "raw", template or "raw")
    return (" " + option) if t not in TEMPLATES or answer_follows_space(t) else option
