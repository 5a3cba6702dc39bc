"""Shared scoring for tasks whose answer is one option letter (MMBench, SEED-Bench, ScienceQA, MagnifierBench)."""

from __future__ import annotations

import math
from typing import Any

from ..data import Item
from ..parsing import OTHER, extract_choice
from .base import Task, TaskError, accuracy_by, frac


def argmax_letter(letters: list[str], logliks: list[float]) -> str | None:
    """The option with the highest summed log-likelihood; ties go to the earlier letter; any NaN makes it `other`."""
    if len(logliks) != len(letters):
        raise TaskError(f"{len(logliks)} log-likelihoods for {len(letters)} options")
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in logliks):
        return None
    best = max(range(len(letters)), key=lambda i: (logliks[i], -i))
    return letters[best]


class MultipleChoiceTask(Task):
    group_keys: tuple[str, ...] = ("category",)

    def parse_line(self, item: Item, line: dict, opts: dict) -> str | None:
        choices: dict[str, str] = item["choices"]
        letters = list(choices)
        if line.get("logliks") is not None:
            return argmax_letter(letters, list(line["logliks"]))
        return extract_choice(line.get("reply"), letters, choices)

    def sample(self, item: Item, line: dict, pred: str | None) -> dict[str, Any]:
        s = {"row": item.row, "id": item.get("id"), "answer": item["answer"], "pred": pred or OTHER,
             "correct": pred is not None and pred == item["answer"], "reply": line.get("reply")}
        for k in self.group_keys:
            if item.get(k) is not None:
                s[k] = item.get(k)
        return s

    def metrics(self, items: list[Item], lines: dict[int, dict], opts: dict, judge=None) -> tuple[dict, list[dict]]:
        samples = []
        for it in items:
            if it.row in lines:
                samples.append(self.sample(it, lines[it.row], self.parse_line(it, lines[it.row], opts)))
        m: dict[str, Any] = {"accuracy": frac(sum(s["correct"] for s in samples), len(samples)),
                             "other": sum(s["pred"] == OTHER for s in samples)}
        for k in self.group_keys:
            by = accuracy_by(samples, k)
            if by:
                m[f"by_{k}"] = by
        return m, samples
