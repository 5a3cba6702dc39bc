"""MagnifierBench: multiple choice parsed locally, plus the free-form half graded yes/no by an LLM judge."""

from __future__ import annotations

import re

from ..data import Layout
from ..judge import parse_yes_no
from .base import TaskError, text
from .mc import MultipleChoiceTask
from .mmvet import summarize_judged

DEFAULT_PROMPT = "Answer with the option letter from the given choices directly."
FREEFORM_JUDGE = ("You are checking an answer about an image.\nQuestion: {q}\nModel Response: {r}\n"
                  "Ground Truth: {gt}\nDoes the model response give the same answer as the ground truth? "
                  "Answer yes or no.")


def split_options(instruction: str) -> tuple[str, dict[str, str]] | None:
    """'Q? A. x, B. y, C. z, D. w' -> ('Q?', {A: x, ...}). Markers are found in letter order, so a question with
    no '?' or several '?' and option texts containing '.' survive (Otter split on '?' and '.')."""
    found, start = [], 0
    for i in range(26):
        letter = chr(ord("A") + i)
        m = re.compile(rf"(?:^|(?<=[\s,;?:]))({letter})\.\s").search(instruction, start)
        if not m:
            break
        found.append((letter, m.start(), m.end()))
        start = m.end()
    if len(found) < 2:
        return None
    question = instruction[: found[0][1]].strip()
    opts = {}
    for j, (letter, _, end) in enumerate(found):
        stop = found[j + 1][1] if j + 1 < len(found) else len(instruction)
        opts[letter] = instruction[end:stop].strip().rstrip(",;").strip()
    return question, opts


class MagnifierBench(MultipleChoiceTask):
    name = "magnifierbench"
    layouts = [Layout("otter", ("id", "instruction", "answer"), images=("images", "image"))]
    options = {"prompt": "otter", "instruction": DEFAULT_PROMPT, "freeform": True, "multi_image": "skip"}
    group_keys = ()

    def resolve_options(self, given):
        opts = super().resolve_options(given)
        if opts["multi_image"] not in ("skip", "keep"):
            raise TaskError(f"magnifierbench: multi_image {opts['multi_image']!r}; valid: ['keep', 'skip']")
        return opts

    def fields(self, lay, rec):
        instr = text(rec["instruction"])
        sp = split_options(instr)
        if sp is None:
            raise TaskError(f"magnifierbench: id {rec['id']!r}: no 'A. .., B. ..' options in {instr[:80]!r}")
        q, choices = sp
        ans = text(rec["answer"]).strip().rstrip(".").upper()
        if ans not in choices:
            raise TaskError(f"magnifierbench: id {rec['id']!r}: answer {rec['answer']!r} not among {list(choices)}")
        return {"id": rec["id"], "instruction": instr, "question": q, "choices": choices, "answer": ans}

    def skip(self, item, opts):
        # Otter skips multi-image rows but kept them in the denominator; here a skipped row is out of both.
        if opts["multi_image"] == "skip" and item.n_images > 1:
            return f"{item.n_images} images"
        return None

    def question(self, item, opts):
        return f"{opts['instruction']} {item['instruction']}" if opts["instruction"] else item["instruction"]

    def extra_questions(self, item, opts):
        return {"freeform": item["question"]} if opts["freeform"] else {}

    def metrics(self, items, lines, opts, judge=None):
        kept = [it for it in items if self.skip(it, opts) is None]
        m, samples = super().metrics(kept, lines, opts, judge)
        m["skipped"] = len(items) - len(kept)
        by_row = {it.row: it for it in kept}
        ff = [s for s in samples if lines[s["row"]].get("freeform_reply") is not None]
        if ff:
            for s in ff:
                it, reply = by_row[s["row"]], lines[s["row"]]["freeform_reply"]
                s["freeform_reply"] = reply
                s["freeform_correct"] = None
                if judge is not None:
                    gt = it["choices"][it["answer"]]
                    r = judge.ask(FREEFORM_JUDGE.format(q=it["question"], r=reply, gt=gt), parse_yes_no)
                    s.update(judge_model=r.model, judge_cached=r.cached, judge_reply=r.reply, judge_error=r.error)
                    if r.ok:
                        s["freeform_correct"] = 1.0 if r.value == "yes" else 0.0
            fm = summarize_judged(ff, judge, "freeform_correct", "freeform_accuracy", None)
            m["freeform_accuracy"] = fm.pop("freeform_accuracy")
            m["freeform"] = fm
            if len(ff) != len(samples):
                m["freeform"]["missing_replies"] = len(samples) - len(ff)
        return m, samples

