"""Prompt templates for inference, by name (eval-reference 2.1 and 2.4).

Otter templates put one `<image>` per media, in-context examples first and the query last; OtterHD templates
carry no image text (the patch tokens are placed before BOS by the model inputs) and end with the boa token.

    otter-image  Otter's benchmarks and demos: `<image>User: {q} GPT:<answer>` (examples `... {a}<|endofchunk|>`);
                 the default for published Otter checkpoints
    simple       otterfast's/Otter's training format: `<image>User:{q} GPT:<answer>` (no spaces)
    llama2       `[INST]<image>\\n{q}[/INST]<answer>`
    idefics      `User:<fake_token_around_image><image><fake_token_around_image>{q}<end_of_utterance>\\nAssistant:<answer>`
    otterhd      OtterHD's benchmarks: `User: {q} Assistant:` + `\\x04`; the default for Fuyu checkpoints
    fuyu         otterfast's Fuyu training format: `User:{q} Assistant:` + `\\x04`
    raw          the prompt as given (no `<image>` added, nothing appended)
"""

from __future__ import annotations

from ..data.prompts import ANSWER, EOC, EOU, FAKE_IMAGE, FUYU_BOA, IMAGE


def _otter(q_fmt: str, a_fmt: str):
    def render(query: str, examples: list[tuple[str, str]], with_image: bool) -> str:
        img = IMAGE if with_image else ""
        shots = "".join(img + q_fmt.format(q=q) + a_fmt.format(a=a) + EOC for q, a in examples)
        return shots + img + q_fmt.format(q=query)
    return render


def _fuyu(q_fmt: str):
    def render(query: str, examples: list[tuple[str, str]], with_image: bool) -> str:
        shots = "".join(q_fmt.format(q=q) + FUYU_BOA + " " + a for q, a in examples)
        return shots + q_fmt.format(q=query) + FUYU_BOA
    return render


TEMPLATES = {
    "otter-image": ("otter", _otter("User: {q} GPT:" + ANSWER, " {a}")),
    "simple": ("otter", _otter("User:{q} GPT:" + ANSWER, "{a}")),
    "llama2": ("otter", _otter("[INST]{q}[/INST]" + ANSWER, "{a}")),
    "idefics": ("otter", None),  # rendered in render(): the image sits inside the turn
    "otterhd": ("fuyu", _fuyu("User: {q} Assistant:")),
    "fuyu": ("fuyu", _fuyu("User:{q} Assistant:")),
    "raw": (None, lambda query, examples, with_image: query),
}
# the format a model was trained with (otterfast's prepare --format) -> its inference template
FROM_TRAINING_FORMAT = {"simple": "simple", "llama2": "llama2", "fuyu": "fuyu", "idefics": "idefics"}


def render(template: str, query: str, examples: list[tuple[str, str]] = (), with_image: bool = True) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "llama2":  # the image goes inside [INST], followed by a newline (training layout)
        img = (IMAGE + "\n") if with_image else ""
        shots = "".join(f"[INST]{img}{q}[/INST]{ANSWER}{a}{EOC}" for q, a in examples)
        return shots + f"[INST]{img}{query}[/INST]{ANSWER}"
    if template == "idefics":  # data/prompts.py's idefics turn; each closed by <end_of_utterance>\n
        img = (FAKE_IMAGE + IMAGE + FAKE_IMAGE) if with_image else ""
        shots = "".join(f"User:{img}{q}{EOU}\nAssistant:{ANSWER}{a}{EOU}\n" for q, a in examples)
        return shots + f"User:{img}{query}{EOU}\nAssistant:{ANSWER}"
    return TEMPLATES[template][1](query, list(examples), with_image)
