"""SEED-Bench: four options; scored by likelihood of the option tokens only (default) or by generation."""

from __future__ import annotations

from ..data import Layout
from .base import TaskError, options_block
from .mc import MultipleChoiceTask

LMMS_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


class SEEDBench(MultipleChoiceTask):
    name = "seedbench"
    # Otter-AI/SEEDBench (one image) and lmms-lab/SEED-Bench (a list of images or video frames) share the columns.
    layouts = [Layout("seed", ("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer"),
                      ("question_id", "data_type", "question_type_id", "data_id"), images=("image",))]
    options = {"prompt": "otter", "mode": "likelihood"}
    modes = ("likelihood", "generate")
    group_keys = ("data_type", "question_type_id")

    def fields(self, lay, rec):
        choices = {L: str(rec[f"choice_{L.lower()}"]) for L in "ABCD"}
        ans = str(rec["answer"]).strip().upper()
        if ans not in choices:
            raise TaskError(f"seedbench: answer {rec['answer']!r} is not A-D")
        return {"id": rec.get("question_id"), "question": str(rec["question"]), "choices": choices, "answer": ans,
                "data_type": rec.get("data_type"), "question_type_id": rec.get("question_type_id")}

    def question(self, item, opts):
        letters, texts = list(item["choices"]), list(item["choices"].values())
        if opts["prompt"] == "lmms":
            if opts["mode"] == "likelihood":
                return f"{item['question']} Answer :"  # lmms-eval seedbench_ppl
            return f"{item['question']}\n{options_block(letters, texts)}{LMMS_SUFFIX}"
        # Otter's eval_forward prompt: the options inline after the question
        return f"{item['question']} There are several options: {options_block(letters, texts, sep=' ')}"

    def loglik_options(self, item, opts):
        letters, texts = list(item["choices"]), list(item["choices"].values())
        if opts["prompt"] == "lmms":
            return letters, texts
        return letters, [f"{l}. {t}" for l, t in zip(letters, texts)]
