"""Prompt templates for inference, by name (eval-reference 2.1 and 2.4): data/prompts.py's TEMPLATES, the one
table of prompt layouts, which training renders too.

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

from ..data.prompts import FORMATS, TEMPLATES, prompt

# the format a model was trained with (otterfast's prepare --format) -> its inference template (the same layout)
FROM_TRAINING_FORMAT = {f: f for f in FORMATS}


def render(template: str, query: str, examples: list[tuple[str, str]] = (), with_image: bool = True) -> str:
    return prompt(template, query, list(examples), n_media=1 if with_image else 0)


__all__ = ["FROM_TRAINING_FORMAT", "TEMPLATES", "render"]
