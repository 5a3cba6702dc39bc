"""The prompt layouts, one table for training and inference (`TEMPLATES`: the four training formats exactly as
Otter renders them, and the inference templates of otterfast.generate / otterfast.eval), text cleaning, and
Otter's loss rule.

A sample is a list of turns (context examples or earlier rounds first, the query last). Rendering
returns the text plus, in characters, where every answer's labelled span lies and where each media
goes, so that labels and media positions never depend on re-finding tokens in the text.

Loss rule (Otter's `masking()`): each answer's tokens after its `<answer>` through its closing token
(`<|endofchunk|>`; `<end_of_utterance>` for idefics) inclusive, plus the final EOS; -100 elsewhere.
For `fuyu` (no closing token in the text) the span is the answer text after `\x04`; the final EOS
closes the last one, so a single turn gets answer + EOS as in Otter. Unlike Otter's Fuyu labels
("after the first `\x04` through the second"), every turn's answer is labelled and no instruction is.

Decisions against Otter's bugs:
- `keep_symbols=True` by default: Otter's default deletes `: - / % * # $ =` etc. and collapses newlines
  (pass keep_symbols=False for Otter's cleaning).
- Literal special-token strings inside user text (e.g. a "<image>" typed in an instruction) are removed,
  since they would otherwise become real special tokens and desynchronise media and text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE = "<image>"
EOC = "<|endofchunk|>"
ANSWER = "<answer>"
PAD = "<PAD>"
FAKE_IMAGE = "<fake_token_around_image>"
EOU = "<end_of_utterance>"
FUYU_BOA = "\x04"
FUYU_PLACEHOLDER = "|SPEAKER|"
FUYU_NEWLINE = "|NEWLINE|"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    special_tokens: tuple[str, ...]  # additional special tokens the tokenizer must know
    media_in_text: bool  # Otter formats put <image> in the text; fuyu inserts patch tokens instead


FORMATS = {
    "simple": PromptFormat("simple", (EOC, IMAGE, ANSWER), True),
    "llama2": PromptFormat("llama2", (EOC, IMAGE, ANSWER), True),
    "idefics": PromptFormat("idefics", (EOC, IMAGE, ANSWER, FAKE_IMAGE, EOU), True),
    "fuyu": PromptFormat("fuyu", (FUYU_BOA, FUYU_PLACEHOLDER, FUYU_NEWLINE), False),
}

ALL_SPECIAL = (IMAGE, EOC, ANSWER, PAD, FAKE_IMAGE, EOU, FUYU_BOA, FUYU_PLACEHOLDER, FUYU_NEWLINE)

_SYMBOLS = re.compile(r"[^\w\s.,?!()\"']")
_SPACES = re.compile(r"\s+")


def _strip_specials(text: str, extra: tuple[str, ...] = ()) -> str:
    for tok in ALL_SPECIAL + extra:
        if tok in text:
            text = text.replace(tok, "")
    return text


def clean_instruction(text: str, keep_symbols: bool = True, extra_specials: tuple[str, ...] = ()) -> str:
    """Otter's `pre_question`: strip; without keep_symbols drop symbols and collapse whitespace."""
    text = _strip_specials(text, extra_specials).strip()
    if not keep_symbols:
        text = _SPACES.sub(" ", _SYMBOLS.sub("", text)).strip()
    return text


def clean_answer(text: str, keep_symbols: bool = True, extra_specials: tuple[str, ...] = ()) -> str:
    """Otter's `pre_answer`: as `clean_instruction`, plus `\\r\\n` -> `\\n`."""
    return clean_instruction(text.replace("\r\n", "\n"), keep_symbols, extra_specials)


@dataclass
class Turn:
    instruction: str
    answer: str
    has_media: bool  # the turn carries a media item (an <image> placeholder in Otter formats)


@dataclass
class Rendered:
    text: str
    answer_spans: list[tuple[int, int]]  # character spans that get labels
    media_chars: list[int]  # per media, in order: char offset of its <image> (or of its turn, for fuyu)


@dataclass(frozen=True)
class Template:
    """One prompt layout, for training (a turn with its answer, labelled) and inference (a query, unanswered).

    A turn is `lead`, then `media` when it carries a media item, then `query` (with {q}), then `answer` (with
    {a}; the labelled span), then `tail`. `media` holds the `<image>` (the media position) or is empty (Fuyu:
    the model places the patches; the position is the turn's start)."""
    family: str | None  # the models it is for: "otter" (<image> in the text), "fuyu" (patches), None (any)
    query: str
    answer: str
    media: str = ""
    lead: str = ""
    tail: str = ""

    def media_at(self) -> int:
        """Offset of the media position within `media`."""
        return self.media.find(IMAGE) if IMAGE in self.media else 0


# Every prompt layout, by name (otterfast.generate and otterfast.eval use this table). The four training formats
# (FORMATS: simple, llama2, idefics, fuyu) render training samples; every entry is an inference template (the
# query part, the answer left to the model).
TEMPLATES = {
    # Otter's benchmarks and demos; the default for published Otter checkpoints
    "otter-image": Template("otter", "User: {q} GPT:" + ANSWER, " {a}" + EOC, media=IMAGE),
    "simple": Template("otter", "User:{q} GPT:" + ANSWER, "{a}" + EOC, media=IMAGE),
    "llama2": Template("otter", "{q}[/INST]" + ANSWER, "{a}" + EOC, media=IMAGE + "\n", lead="[INST]"),
    "idefics": Template("otter", "{q}" + EOU + "\nAssistant:" + ANSWER, "{a}" + EOU,
                        media=FAKE_IMAGE + IMAGE + FAKE_IMAGE, lead="User:", tail="\n"),
    # OtterHD's benchmarks; the default for Fuyu checkpoints
    "otterhd": Template("fuyu", "User: {q} Assistant:" + FUYU_BOA, " {a}"),
    "fuyu": Template("fuyu", "User:{q} Assistant:" + FUYU_BOA, " {a}"),
    "raw": Template(None, "{q}", "{a}"),  # the prompt as given: no media text, no examples, nothing appended
}


def _pieces(fmt: str, t: Turn) -> list[tuple[str, str]]:
    """A turn as (kind, text) pieces; kind "label" marks the labelled span, "media" the <image>."""
    tp = TEMPLATES[fmt]
    out = [("text", tp.lead)]
    if t.has_media:
        at = tp.media_at()
        out += [("text", tp.media[:at]), ("media", tp.media[at:])]
    return out + [("text", tp.query.format(q=t.instruction)), ("label", tp.answer.format(a=t.answer)),
                  ("text", tp.tail)]


def prompt(template: str, query: str, examples: list[tuple[str, str]] = (), n_media: int = 1) -> str:
    """An inference prompt: the in-context examples (question, answer), each with one media when `n_media`, then
    the query with `n_media` media; it ends where the model's answer starts. `raw`: the query as given."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    tp = TEMPLATES[template]
    if template == "raw":
        return query
    shots = "".join(tp.lead + (tp.media if n_media else "") + tp.query.format(q=q) + tp.answer.format(a=a) + tp.tail
                    for q, a in examples)
    return shots + tp.lead + tp.media * n_media + tp.query.format(q=query)


def answer_follows_space(template: str) -> bool:
    """Whether the answer starts with a space after the prompt (`<answer> {a}`, `\\x04 {a}`) in that template."""
    return TEMPLATES[template].answer.startswith(" ")


def render(fmt: str, turns: list[Turn], task_description: str | None = None) -> Rendered:
    """Concatenate the turns with no separator (Otter), strip the trailing newline, track spans."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(FORMATS)}")
    parts: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = []
    media: list[int] = []
    if task_description:
        parts.append(task_description + "\n")
        pos += len(parts[-1])
    for t in turns:
        for kind, s in _pieces(fmt, t):
            if kind == "media":
                media.append(pos)
            elif kind == "label":
                spans.append((pos, pos + len(s)))
            parts.append(s)
            pos += len(s)
    text = "".join(parts)
    stripped = text.rstrip("\n")
    spans = [(a, min(b, len(stripped))) for a, b in spans]
    return Rendered(stripped, spans, media)
