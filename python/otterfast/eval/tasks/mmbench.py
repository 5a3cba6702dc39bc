"""MMBench (dev): per-row accuracy and CircularEval, scored locally without a GPT fallback (eval-reference 1.1)."""

from __future__ import annotations

from ..data import Item, Layout, missing_value
from .base import TaskError, first_groups, frac, grouped, options_block, text
from .mc import MultipleChoiceTask

LMMS_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
_OPTION_COLS = tuple("ABCDEFGHI")


class MMBench(MultipleChoiceTask):
    name = "mmbench"
    # One layout covers HuggingFaceM4/MMBench, Otter-AI/MMBench and both lmms-lab copies: the L2 column is spelled
    # `l2-category` or `L2-category` and `index` may be a string (trap 7).
    layouts = [Layout("mmbench", ("index", "question", "A", "B", "answer"),
                      ("hint", *_OPTION_COLS[2:], "category", "l2-category", "L2-category", "source", "split"),
                      images=("image",))]
    options = {"prompt": "otter"}
    group_keys = ("category", "l2_category")

    def fields(self, lay, rec):
        try:
            index = int(float(rec["index"]))  # trap 7: lmms-lab/MMBench `en` stores index as a string
        except (TypeError, ValueError) as e:
            raise TaskError(f"mmbench: index {rec['index']!r} is not a number") from e
        choices = {k: str(rec[k]) for k in _OPTION_COLS if k in rec and not missing_value(rec[k])}
        hint = None if missing_value(rec.get("hint")) else str(rec["hint"])  # trap 7: the string "nan" is missing
        l2 = rec.get("l2-category", rec.get("L2-category"))
        ans = None if missing_value(rec["answer"]) else str(rec["answer"]).strip()
        return {"id": index, "index": index, "question": text(rec["question"]), "hint": hint, "choices": choices,
                "answer": ans, "category": rec.get("category"), "l2_category": l2}

    def check(self, items, path):
        if items and all(it["answer"] is None for it in items):
            return  # the test split: generation works, scoring will refuse
        bad = [it.row for it in items if it["answer"] is not None and it["answer"] not in it["choices"]]
        if bad:
            raise TaskError(f"{path}: mmbench answer is not one of the row's options at rows {bad[:5]}")

    @staticmethod
    def groups(items: list[Item]) -> "dict[int, list[Item]]":
        return grouped(items, lambda it: it["index"] % 1_000_000)

    def subset(self, items, limit):
        return items if limit is None else first_groups(items, self.groups(items), limit)  # whole circular groups

    def question(self, item, opts):
        opts_txt = "There are several options:\n" + options_block(list(item["choices"]), list(item["choices"].values()))
        q = f"{item['hint']} {item['question']} {opts_txt}" if item["hint"] else f"{item['question']} {opts_txt}"
        return q + LMMS_SUFFIX if opts["prompt"] == "lmms" else q

    def metrics(self, items, lines, opts, judge=None):
        scored = [it for it in items if it.row in lines]
        if any(it["answer"] is None for it in scored):
            raise TaskError("mmbench: rows without an answer (the test split); submit those to the official server")
        m, samples = super().metrics(items, lines, opts, judge)
        ok = {s["row"]: s["correct"] for s in samples}
        circ, circ_cat = [], {}
        for key, g in self.groups(items).items():
            have = [it for it in g if it.row in ok]
            if not have:
                continue
            if len(have) != len(g):
                raise TaskError(f"mmbench: circular group {key} has predictions for {len(have)} of {len(g)} rows")
            good = all(ok[it.row] for it in g)
            circ.append(good)
            circ_cat.setdefault(str(g[0].get("category")), []).append(good)
        m["circular_accuracy"] = frac(sum(circ), len(circ))
        m["questions"] = len(circ)
        m["circular_by_category"] = {k: frac(sum(v), len(v)) for k, v in sorted(circ_cat.items())}
        return m, samples
