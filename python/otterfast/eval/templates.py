"""Model prompt templates: wrap a task's question text the way each model family was prompted in Otter's benchmarks.

The runner hands the wrapped string to the model adapter unchanged (eval-reference 1.0, 2.1, 2.4):
- otter:   "<image>" * n_images + "User: {q} GPT:<answer>"   (media first, one <image> per image)
- otterhd: "User: {q} Assistant:"   (the adapter adds Fuyu's image patches before and the \\x04 boa token after)
- raw:     "{q}"   (fuyu.py sends the bare prompt)

For likelihood scoring each option is a continuation appended verbatim after the prompt (after the boa token for
OtterHD); `continuation` puts the one space the inference templates have between the answer marker and the answer.
"""

from __future__ import annotations

TEMPLATES = ("otter", "otterhd", "raw")


def wrap(template: str, question: str, n_images: int) -> str:
    if template == "otter":
        return "<image>" * n_images + f"User: {question} GPT:<answer>"
    if template == "otterhd":
        return f"User: {question} Assistant:"
    if template == "raw":
        return question
    raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def continuation(template: str, option: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    return option if template == "raw" else " " + option
