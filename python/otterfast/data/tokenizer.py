"""Tokenizers: load a local transformers tokenizer folder, add what a prompt format needs, tokenize with labels.

As Otter does, missing special tokens are added (`<|endofchunk|>`, `<image>`, `<answer>`, and `<PAD>`
when there is no pad token); idefics and fuyu formats add theirs. Nothing is ever downloaded: the
folder must be local (a user's MPT / LLaMA / Fuyu tokenizer, or the demo's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import AddedToken

from . import prompts
from .defects import DataError


@dataclass
class TokenizerInfo:
    """The ids a prepared index and the loaders need, saved in the index's meta.json."""

    format: str
    vocab_size: int  # len(tokenizer), including added tokens
    bos_id: int | None
    eos_id: int
    pad_id: int
    media_id: int | None  # <image> (Otter formats)
    eoc_id: int | None
    answer_id: int | None
    fuyu_placeholder_id: int | None
    fuyu_newline_id: int | None
    fuyu_boa_id: int | None
    added_tokens: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_tokenizer(path: str, fmt: str):
    """Load a fast tokenizer from a local folder and add the special tokens `fmt` needs.

    Returns (tokenizer, TokenizerInfo).
    """
    from transformers import AutoTokenizer

    if fmt not in prompts.FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(prompts.FORMATS)}")
    if not os.path.isdir(path):
        raise DataError(f"{path}: tokenizer folder not found (a local transformers tokenizer folder is needed)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise DataError(f"{path}: cannot load a tokenizer: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{path}: a fast tokenizer (tokenizer.json) is needed for label offsets")
    vocab = tok.get_vocab()
    missing = [t for t in prompts.FORMATS[fmt].special_tokens if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    added = list(missing)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": prompts.PAD})
        added.append(prompts.PAD)
    if tok.eos_token is None:
        raise DataError(f"{path}: the tokenizer has no EOS token")

    def tid(t: str) -> int | None:
        i = tok.convert_tokens_to_ids(t)
        return None if i is None or i == tok.unk_token_id else int(i)

    info = TokenizerInfo(
        format=fmt,
        vocab_size=len(tok),
        bos_id=tok.bos_token_id,
        eos_id=int(tok.eos_token_id),
        pad_id=int(tok.pad_token_id),
        media_id=tid(prompts.IMAGE) if prompts.FORMATS[fmt].media_in_text else None,
        eoc_id=tid(prompts.EOC),
        answer_id=tid(prompts.ANSWER),
        fuyu_placeholder_id=tid(prompts.FUYU_PLACEHOLDER) if fmt == "fuyu" else None,
        fuyu_newline_id=tid(prompts.FUYU_NEWLINE) if fmt == "fuyu" else None,
        fuyu_boa_id=tid(prompts.FUYU_BOA) if fmt == "fuyu" else None,
        added_tokens=added,
    )
    return tok, info


@dataclass
class Tokenized:
    input_ids: list[int]  # BOS + text + EOS (fuyu: image tokens are inserted later, by the loader)
    label_spans: list[tuple[int, int]]  # token spans [start, end) whose labels are their ids
    media_pos: list[int]  # per media: token index of its <image> (Otter) or its insertion point (fuyu)


def tokenize_rendered(tok, info: TokenizerInfo, r: prompts.Rendered) -> Tokenized:
    """Tokenize a rendered sample once, then derive labels and media positions from character offsets."""
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offs = enc["offset_mapping"]
    bos = [info.bos_id] if info.bos_id is not None else []
    shift = len(bos)
    labelled = [False] * len(ids)
    for a, b in r.answer_spans:
        for i, (s, e) in enumerate(offs):
            if (e > s and s < b and e > a) or (e == s and a <= s < b):
                labelled[i] = True
    media_pos: list[int] = []
    if prompts.FORMATS[info.format].media_in_text:
        for c in r.media_chars:
            hit = [i for i, (s, _) in enumerate(offs) if s == c and ids[i] == info.media_id]
            if len(hit) != 1:
                raise AssertionError(f"<image> at char {c} did not map to one token")  # a bug, not bad data
            media_pos.append(hit[0] + shift)
    else:
        for c in r.media_chars:
            if c == 0:
                media_pos.append(0)  # Fuyu layout: the first image's tokens come before BOS
            else:
                i = next((i for i, (s, _) in enumerate(offs) if s >= c), len(ids))
                media_pos.append(i + shift)
    full = bos + ids + [info.eos_id]
    spans: list[tuple[int, int]] = []
    flags = [False] * shift + labelled + [True]  # the final EOS is always labelled
    i = 0
    while i < len(flags):
        if flags[i]:
            j = i
            while j < len(flags) and flags[j]:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return Tokenized(full, spans, media_pos)


def labels_from_spans(input_ids, spans) -> list[int]:
    out = [-100] * len(input_ids)
    for a, b in spans:
        out[a:b] = input_ids[a:b]
    return out
