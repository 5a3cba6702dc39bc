"""POPE: object-existence yes/no; accuracy, precision, recall, F1 and the share of *predicted* yes."""

from __future__ import annotations

from ..data import Layout
from ..parsing import OTHER, parse_pope
from .base import Task, TaskError, frac

LMMS_SUFFIX = "\nAnswer the question using a single word or phrase."


def binary_metrics(samples: list[dict]) -> dict:
    """`other` predictions count in every denominator and as wrong: a gold-yes row predicted `other` is a false
    negative, a gold-no row predicted `other` is neither TP nor FP but still lowers accuracy (traps 1, 3).
    yes_ratio is the share of predicted yes over all rows (trap 2), not of gold yes."""
    n = len(samples)
    tp = sum(s["answer"] == "yes" and s["pred"] == "yes" for s in samples)
    fp = sum(s["answer"] == "no" and s["pred"] == "yes" for s in samples)
    tn = sum(s["answer"] == "no" and s["pred"] == "no" for s in samples)
    fn = sum(s["answer"] == "yes" and s["pred"] != "yes" for s in samples)
    other = sum(s["pred"] == OTHER for s in samples)
    precision, recall = frac(tp, tp + fp), frac(tp, tp + fn)
    return {"n": n, "accuracy": frac(tp + tn, n), "precision": precision, "recall": recall,
            "f1": frac(2 * precision * recall, precision + recall), "yes_ratio": frac(tp + fp, n),
            "other_ratio": frac(other, n), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "other": other}


class POPE(Task):
    name = "pope"
    layouts = [
        Layout("lmms", ("question_id", "question", "answer"), ("id", "category", "image_source"), images=("image",)),
        Layout("otter", ("question", "answer"), ("category",), images=("image",)),
    ]
    options = {"prompt": "otter"}

    def fields(self, lay, rec):
        ans = str(rec["answer"]).strip().lower()
        if ans not in ("yes", "no"):
            raise TaskError(f"pope: answer {rec['answer']!r} is not yes/no")
        return {"id": rec.get("question_id", rec.get("id")), "question": rec["question"], "answer": ans,
                "category": rec.get("category")}

    def question(self, item, opts):
        q = str(item["question"])
        return q + LMMS_SUFFIX if opts["prompt"] == "lmms" else q

    def parse_line(self, item, line, opts):
        return parse_pope(line.get("reply"))

    def metrics(self, items, lines, opts, judge=None):
        samples = []
        for it in items:
            if it.row in lines:
                pred = self.parse_line(it, lines[it.row], opts)
                samples.append({"row": it.row, "id": it["id"], "category": it["category"], "answer": it["answer"],
                                "pred": pred, "correct": pred == it["answer"], "reply": lines[it.row].get("reply")})
        m = binary_metrics(samples)
        cats = sorted({s["category"] for s in samples if s["category"] is not None})
        if cats:
            m["by_category"] = {c: binary_metrics([s for s in samples if s["category"] == c]) for c in cats}
        return m, samples
