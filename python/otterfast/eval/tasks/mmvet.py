"""MM-Vet: free-form answers graded 0..1 by an LLM judge with MM-Vet's few-shot prompt; score is the mean."""

from __future__ import annotations

from ..data import Layout
from ..judge import parse_score
from .base import Task, frac, text

LMMS_PRE = "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"

# The grader prompt of the MM-Vet paper and repository, with the original `Question` header (eval-reference 1.1:
# lmms-eval's copy has a find-and-replace slip there).
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def judge_prompt(question: str, answer: str, reply: str) -> str:
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, gt, reply, ""])


def capabilities(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):  # lmms-lab/MMVet: comma-joined
        return [c.strip() for c in v.split(",") if c.strip()]
    return [str(c).strip() for c in v]


class MMVet(Task):
    name = "mmvet"
    layouts = [
        Layout("otter", ("id", "instruction", "answer", "capability"), ("image_source",), images=("images",)),
        Layout("lmms", ("question_id", "question", "answer", "capability"), ("image_source",), images=("image",)),
    ]
    options = {"prompt": "otter"}
    needs_judge = True

    def fields(self, lay, rec):
        q = rec["instruction"] if lay.name == "otter" else rec["question"]
        return {"id": rec.get("id", rec.get("question_id")), "question": text(q), "answer": text(rec["answer"]),
                "capability": capabilities(rec["capability"])}

    def question(self, item, opts):
        return (LMMS_PRE if opts["prompt"] == "lmms" else "") + item["question"]

    def parse_line(self, item, line, opts):
        return (line.get("reply") or "").strip()

    def metrics(self, items, lines, opts, judge=None):
        samples = []
        for it in items:
            if it.row not in lines:
                continue
            reply = self.parse_line(it, lines[it.row], opts)
            s = {"row": it.row, "id": it["id"], "capability": it["capability"], "answer": it["answer"],
                 "reply": lines[it.row].get("reply"), "judge_score": None}
            if judge is not None:
                r = judge.ask(judge_prompt(it["question"], it["answer"], reply), parse_score)
                s.update(judge_model=r.model, judge_cached=r.cached, judge_reply=r.reply, judge_error=r.error,
                         judge_score=r.value if r.ok else None)
            samples.append(s)
        return summarize_judged(samples, judge, "judge_score", "score", "capability"), samples


def summarize_judged(samples: list[dict], judge, field: str, metric: str, group: str | None) -> dict:
    """Mean of a judged field; withheld (None) while any sample lacks a judgement (trap 10)."""
    got = [s for s in samples if s.get(field) is not None]
    failures = len(samples) - len(got)
    m: dict = {"judged": len(got), "judge_failures": failures if judge is not None else None,
               "judge_model": judge.cfg.model if judge is not None else None}
    if judge is None:
        m[metric] = None
        m["withheld"] = "no judge configured"
        return m
    if failures:
        m[metric] = None
        m["withheld"] = f"{failures} judge failure(s); rerun to retry them (valid replies are cached)"
        return m
    m[metric] = frac(sum(float(s[field]) for s in got), len(got))
    if group:
        caps: dict[str, list[float]] = {}
        sets: dict[str, list[float]] = {}
        for s in got:
            for c in s[group]:
                caps.setdefault(c, []).append(float(s[field]))
            sets.setdefault(",".join(sorted(s[group])), []).append(float(s[field]))
        m[f"by_{group}"] = {k: frac(sum(v), len(v)) for k, v in sorted(caps.items())}
        m[f"by_{group}_set"] = {k: frac(sum(v), len(v)) for k, v in sorted(sets.items())}
    return m
