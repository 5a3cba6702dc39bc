"""MathVista (testmini): rule-based answer extraction (or an LLM extractor), normalisation with integer precision."""

from __future__ import annotations

import ast
import json
import re
import warnings

from ..data import Layout, missing_value
from ..parsing import extract_choice, letters_for
from .base import Task, TaskError, accuracy_by, frac, text

# MathVista's task hints (the "solution" shot); Otter uses them without a "Hint: " prefix.
HINTS = {
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float1": "Please answer the question requiring a floating-point number with one decimal place and provide the "
              "final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Please answer the question requiring a floating-point number with two decimal places and provide the "
              "final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Please answer the question requiring a Python list as an answer and provide the final list, "
            "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}
GROUP_FIELDS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills")
EXTRACT_PROMPT = ("Extract the final answer from the model response to the question below. Reply with the answer "
                  "only: an option's text for multiple choice, a number for numeric answers, a Python list for "
                  "lists. If the response gives no answer, reply NONE.\n\nQuestion: {q}\n\nModel response: {r}\n\n"
                  "Extracted answer:")
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def hint_for(answer_type: str, question_type: str, precision: int | None) -> str:
    if question_type == "multi_choice":
        return HINTS["multi_choice"]
    if answer_type == "integer":
        return HINTS["integer"]
    if answer_type == "float":
        p = 1 if precision is None else precision  # trap 8: built from int(precision), never str(1.0) == "1"
        if p in (1, 2):
            return HINTS[f"float{p}"]
        return (f"Please answer the question requiring a floating-point number with {p} decimal places and provide "
                "the final value at the end.")
    return HINTS["list"]


def normalize(value: str | None, item) -> str | None:
    """MathVista's normalisation with the fixes of trap 8: int(precision) for rounding, and an empty or unmatched
    multiple-choice extraction is None (wrong), never the nearest choice by edit distance."""
    if value is None:
        return None
    v = str(value).strip()
    if not v:
        return None
    if item["question_type"] == "multi_choice":
        choices = item["choices"]
        if v in choices:
            return v
        m = re.search(r"\(([A-Z])\)", v)
        letter = m.group(1) if m else (v if re.fullmatch(r"[A-Z]", v) else None)
        letters = letters_for(len(choices))
        if letter in letters:
            return choices[letters.index(letter)]
        low = [c for c in choices if c.strip().lower() == v.lower()]
        return low[0] if len(low) == 1 else None
    try:
        if item["answer_type"] == "integer":
            return str(int(float(v.replace(",", ""))))
        if item["answer_type"] == "float":
            p = item["precision"] if item["precision"] is not None else 1
            return str(round(float(v.replace(",", "")), p))
    except (ValueError, OverflowError):  # "abc", "nan"; "1e999" is inf, which int() refuses with OverflowError
        return None
    if item["answer_type"] == "list":
        lit = safe_literal(v)
        return re.sub(r"\s+", "", v) if lit is None else lit
    return v


# Everything ast.literal_eval (and str() of its value) raises on text that is not a literal: malformed text
# (ValueError, SyntaxError), an unhashable key or set element such as "{[1]: 2}" (TypeError), nesting too deep
# (RecursionError, MemoryError), an int too long to print (ValueError).
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError)


def safe_literal(v: str) -> str | None:
    """str() of the Python literal `v`, or None when it is not one. Never raises: a reply cannot abort scoring."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "invalid escape sequence" in a reply is not our warning to print
            return str(ast.literal_eval(v))
    except _LITERAL_ERRORS:
        return None


def extract_rules(reply: str, item) -> str | None:
    """MathVista's fast paths, then deterministic rules in place of the GPT extractor (documented in docs/eval.md)."""
    r = (reply or "").strip()
    if not r:
        return None
    choices = item["choices"]
    if item["question_type"] == "multi_choice":
        if r in choices:
            return r
        letters = letters_for(len(choices))
        letter = extract_choice(r, letters, dict(zip(letters, choices)))
        return choices[letters.index(letter)] if letter else None
    if item["answer_type"] in ("integer", "float"):
        try:
            float(r.replace(",", ""))
            return r
        except ValueError:
            pass
    m = re.search(r'The answer is "(.*)"\.', r)
    if m:
        return m.group(1)
    if item["answer_type"] in ("integer", "float"):
        m = re.search(r"(?i)answer\s*(?:is|:)\s*(?:\$|\\boxed\{)?\s*(" + _NUM.pattern + ")", r)
        if m:
            return m.group(1)
        nums = _NUM.findall(r)
        return nums[-1] if nums else None  # the prompt asks for the final value at the end
    if item["answer_type"] == "list":
        lists = re.findall(r"\[[^\[\]]*\]", r)
        return lists[-1] if lists else None
    return r


def parse_metadata(v):
    if isinstance(v, dict):
        return v
    if isinstance(v, str) and v.strip():
        for loader in (ast.literal_eval, json.loads):  # Otter-AI stores it as a Python-literal string
            try:
                out = loader(v)
                return out if isinstance(out, dict) else {}
            except _LITERAL_ERRORS:
                continue
    return {}


class MathVista(Task):
    name = "mathvista"
    layouts = [
        Layout("ai4math", ("pid", "question", "choices", "precision", "question_type", "answer_type", "answer"),
               ("unit", "metadata", "query"), images=("decoded_image", "image")),
        Layout("otter", ("question", "choices", "precision", "question_type", "answer_type", "answer"),
               ("unit", "metadata", "pid"), images=("image",)),
    ]
    options = {"prompt": "otter", "extractor": "rules"}
    needs_judge = False

    def resolve_options(self, given):
        opts = super().resolve_options(given)
        if opts["extractor"] not in ("rules", "judge"):
            raise TaskError(f"mathvista: extractor {opts['extractor']!r}; valid: ['judge', 'rules']")
        return opts

    def fields(self, lay, rec):
        prec = rec.get("precision")
        prec = None if missing_value(prec) else int(float(prec))  # trap 8: float64 on the hub
        meta = parse_metadata(rec.get("metadata"))
        f = {"id": rec.get("pid"), "question": text(rec["question"]),
             "choices": [str(c) for c in rec["choices"]] if rec.get("choices") is not None else [],
             "unit": None if missing_value(rec.get("unit")) else str(rec["unit"]), "precision": prec,
             "question_type": rec["question_type"], "answer_type": rec["answer_type"],
             "answer": None if rec.get("answer") is None else str(rec["answer"]), "query": rec.get("query"),
             "metadata": meta}
        for k in GROUP_FIELDS:
            if k not in ("question_type", "answer_type") and k in meta:
                f[k] = [str(x) for x in meta[k]] if isinstance(meta[k], (list, tuple)) else meta[k]
        return f

    def question(self, item, opts):
        if opts["prompt"] == "lmms" and item.get("query"):
            return str(item["query"])  # AI4Math ships the built query; lmms-eval sends it
        hint = hint_for(item["answer_type"], item["question_type"], item["precision"])
        q = f"Question: {item['question']}" + (f" (Unit: {item['unit']})" if item["unit"] else "")
        parts = [f"Hint: {hint}" if opts["prompt"] == "lmms" else hint, q]
        if item["choices"]:
            letters = letters_for(len(item["choices"]))
            parts.append("Choices:\n" + "\n".join(f"({l}) {c}" for l, c in zip(letters, item["choices"])))
        parts.append("Solution: ")
        return "\n".join(parts)

    def metrics(self, items, lines, opts, judge=None):
        scored = [it for it in items if it.row in lines]
        if any(it["answer"] is None for it in scored):
            raise TaskError("mathvista: rows without an answer: only testmini is scored locally (test is "
                            "submission-only)")
        if opts["extractor"] == "judge" and judge is None:
            raise TaskError("mathvista: extractor 'judge' needs a judge configured")
        samples, failures = [], 0
        for it in scored:
            reply = lines[it.row].get("reply") or ""
            s = {"row": it.row, "id": it["id"], "answer": it["answer"], "reply": reply}
            if opts["extractor"] == "judge":
                r = judge.ask(EXTRACT_PROMPT.format(q=it["question"], r=reply), lambda x: (x or "").strip() or None)
                s.update(judge_model=r.model, judge_cached=r.cached, judge_error=r.error)
                ext = None if not r.ok or r.value.upper() == "NONE" else r.value
                failures += not r.ok
            else:
                ext = extract_rules(reply, it)
            pred = normalize(ext, it)
            s.update(extraction=ext, pred=pred, correct=pred is not None and pred == normalize(it["answer"], it))
            for k in GROUP_FIELDS:
                if it.get(k) is not None:
                    s[k] = it.get(k)
            samples.append(s)
        m = {"accuracy": frac(sum(s["correct"] for s in samples), len(samples)),
             "unextracted": sum(s["pred"] is None for s in samples), "extractor": opts["extractor"]}
        if opts["extractor"] == "judge":
            m["judge_failures"] = failures
            m["judge_model"] = judge.cfg.model
            if failures:
                m["accuracy"] = None
                m["withheld"] = f"{failures} judge failure(s)"
        for k in GROUP_FIELDS:
            by = accuracy_by(samples, k)
            if by:
                m[f"by_{k}"] = by
        return m, samples
