"""ScienceQA: as many letters as the item has choices, the hint included as context (trap 6)."""

from __future__ import annotations

from ..data import Layout, missing_value
from ..parsing import letters_for
from .base import TaskError, options_block, text
from .mc import MultipleChoiceTask

LMMS_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


class ScienceQA(MultipleChoiceTask):
    name = "scienceqa"
    layouts = [
        Layout("lmms", ("question", "choices", "answer", "hint"),
               ("task", "grade", "subject", "topic", "category", "skill"), images=("image",)),
        Layout("otter", ("question", "choices", "answer"), images=("image",)),
    ]
    options = {"prompt": "otter", "hint": True}
    group_keys = ("subject", "grade")

    def fields(self, lay, rec):
        ch = list(rec["choices"] or [])
        letters = letters_for(len(ch))
        try:
            ans = letters[int(rec["answer"])]
        except (TypeError, ValueError, IndexError) as e:
            raise TaskError(f"scienceqa: answer {rec['answer']!r} is not an index into {len(ch)} choices") from e
        hint = rec.get("hint")
        return {"id": None, "question": text(rec["question"]), "choices": dict(zip(letters, map(str, ch))),
                "answer": ans, "hint": None if missing_value(hint) else str(hint),
                "subject": rec.get("subject"), "grade": rec.get("grade")}

    def question(self, item, opts):
        letters, texts = list(item["choices"]), list(item["choices"].values())
        ctx = f"Context: {item['hint']}\n" if opts["hint"] and item["hint"] else ""
        if opts["prompt"] == "lmms":
            return f"{ctx}{item['question']}\n{options_block(letters, texts)}{LMMS_SUFFIX}"
        # Otter's format instruction, listing every letter the item has instead of a fixed {A/B/C/D}
        return (f'Please answer the question in the following format: "The answer is {{{"/".join(letters)}}}".\n'
                f"{ctx}{item['question']}\n{options_block(letters, texts)}\n")
