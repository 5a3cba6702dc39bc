"""MME: yes/no questions, two per image; per-subtask score 100*acc + 100*acc_plus (eval-reference 1.1)."""

from __future__ import annotations

from ..data import Item, Layout
from ..parsing import OTHER, parse_mme
from .base import Task, TaskError, first_groups, frac, grouped

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
_CANON = {c.lower(): c for c in PERCEPTION + COGNITION}
# Otter-AI/MME ids start with the category's first word ("commonsense_reasoning_12" -> "commonsense").
_CANON.update({c.split("_")[0].lower(): c for c in COGNITION})

LMMS_SUFFIX = "\nAnswer the question using a single word or phrase."


def canonical_category(raw: str) -> str:
    k = str(raw).strip().lower()
    if k in _CANON:
        return _CANON[k]
    k0 = k.split("_")[0]
    if k0 in _CANON:
        return _CANON[k0]
    raise TaskError(f"mme: unknown category {raw!r}; valid: {PERCEPTION + COGNITION}")


class MME(Task):
    name = "mme"
    layouts = [
        # lmms-lab/MME and the early Otter-AI/MME read by lmms-eval; the pair shares question_id
        Layout("lmms", ("question_id", "question", "answer", "category"), images=("image",)),
        # Otter-AI/MME as Otter's datasets/mme.py reads it; the pair shares image_ids[0]
        Layout("otter", ("id", "instruction", "answer", "image_ids"), images=("images",)),
    ]
    options = {"prompt": "otter"}

    def fields(self, lay: Layout, rec: dict) -> dict:
        if lay.name == "otter":
            ids = rec["image_ids"]
            key = ids[0] if isinstance(ids, (list, tuple)) and ids else ids
            cat = canonical_category(str(rec["id"]).split("_")[0])
            return {"id": rec["id"], "question": rec["instruction"], "answer": str(rec["answer"]).strip().lower(),
                    "category": cat, "pair": f"{cat}/{key}"}
        cat = canonical_category(rec["category"])
        return {"id": rec["question_id"], "question": rec["question"], "answer": str(rec["answer"]).strip().lower(),
                "category": cat, "pair": f"{cat}/{rec['question_id']}"}

    def check(self, items: list[Item], path: str) -> None:
        bad = [k for k, rows in self.pairs(items).items() if len(rows) != 2]
        if bad:
            raise TaskError(f"{path}: mme needs exactly 2 questions per image; {len(bad)} image(s) differ, "
                            f"e.g. {bad[:3]}")
        ans = sorted({it["answer"] for it in items} - {"yes", "no"})
        if ans:
            raise TaskError(f"{path}: mme answers must be yes/no, found {ans[:5]}")

    @staticmethod
    def pairs(items: list[Item]) -> "dict[str, list[Item]]":
        return grouped(items, lambda it: it["pair"])

    def subset(self, items: list[Item], limit: int | None) -> list[Item]:
        # Trap 4: keep whole pairs, so --limit N takes the first ceil(N/2) images.
        if limit is None:
            return items
        return first_groups(items, self.pairs(items), (limit + 1) // 2)

    def question(self, item: Item, opts: dict) -> str:
        q = str(item["question"])
        if opts["prompt"] == "lmms":
            q = q.replace(" Please answer yes or no.", "") + LMMS_SUFFIX
        return q

    def parse_line(self, item: Item, line: dict, opts: dict) -> str:
        return parse_mme(line.get("reply"))

    def metrics(self, items, lines, opts, judge=None):
        samples, by_cat = [], {}
        for key, pair in self.pairs(items).items():
            have = [it for it in pair if it.row in lines]
            if not have:
                continue
            if len(have) != len(pair):
                raise TaskError(f"mme: image {key} has a prediction for only {len(have)} of its 2 questions "
                                "(subsets must keep pairs)")
            ok = []
            for it in pair:
                pred = self.parse_line(it, lines[it.row], opts)
                correct = pred == it["answer"]  # `other` never equals yes/no: wrong (trap 1)
                ok.append(correct)
                samples.append({"row": it.row, "id": it["id"], "category": it["category"], "pair": key,
                                "answer": it["answer"], "pred": pred, "correct": correct,
                                "reply": lines[it.row].get("reply")})
            c = by_cat.setdefault(it["category"], {"q": 0, "q_ok": 0, "img": 0, "img_ok": 0})
            c["q"] += len(ok)
            c["q_ok"] += sum(ok)
            c["img"] += 1
            c["img_ok"] += all(ok)
        by_category, detail = {}, {}
        for cat in PERCEPTION + COGNITION:
            if cat in by_cat:
                c = by_cat[cat]
                acc, acc_plus = frac(c["q_ok"], c["q"]), frac(c["img_ok"], c["img"])
                by_category[cat] = 100 * acc + 100 * acc_plus
                detail[cat] = {"acc": acc, "acc_plus": acc_plus, "questions": c["q"], "images": c["img"]}
        m = {"perception": sum(v for k, v in by_category.items() if k in PERCEPTION),
             "cognition": sum(v for k, v in by_category.items() if k in COGNITION),
             "by_category": by_category, "by_category_detail": detail,
             "accuracy": frac(sum(s["correct"] for s in samples), len(samples)),
             "other": sum(s["pred"] == OTHER for s in samples)}
        return m, samples
