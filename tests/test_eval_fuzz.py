"""No reply aborts scoring, in any task: every task's parser and metric on random replies (Hypothesis), with and
without a judge that itself answers random text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from otterfast.eval.judge import JudgeResult, parse_score, parse_yes_no
from otterfast.eval.parsing import extract_choice, parse_mme, parse_pope
from otterfast.eval.score import score_lines
from otterfast.eval.synth import b64, image_struct, png, write_parquet
from otterfast.eval.tasks import TASKS, get_task
from otterfast.eval.tasks.mathvista import extract_rules, normalize

IMG = image_struct(png())

# Text that looks like what parsers look for: literals, numbers, letters, the phrases they match.
_LITERALISH = st.text(alphabet=st.sampled_from(list("[]{}()'\",:;.-+_*eEjx0123456789 ABCDEabcde\n\\$")),
                      max_size=40)
REPLIES = st.one_of(
    st.text(max_size=60),
    _LITERALISH,
    st.builds(lambda s: f'The answer is "{s}".', _LITERALISH),
    st.builds(lambda s: f"The answer is {s}", _LITERALISH),
    st.builds(lambda s: f"[{s}]", _LITERALISH),
    st.sampled_from(["", " ", "NONE", "1e999", "-1e999", "nan", "inf", "9" * 5000, "[" * 300 + "]" * 300,
                     "-" * 5000 + "1", '{[1]: 2}', "{{}}", "{1: [}", "(A)", "A.", "yes", "No.", "0.5", "1.0"]),
)

# Every task on a few rows of each kind it has (MathVista: float, integer, multiple choice, list, text).
FILES = {
    "mme": {"question_id": ["a.jpg", "a.jpg"], "question": ["Is there a dog?", "Is there a cat?"],
            "answer": ["Yes", "No"], "category": ["existence"] * 2, "image": [IMG] * 2},
    "pope": {"question": ["Is there a dog?", "Is there a cat?"], "answer": ["yes", "no"], "image": [IMG] * 2,
             "category": ["random"] * 2},
    "mmbench": {"index": ["1", "1000001"], "question": ["Which animal?"] * 2, "hint": ["nan", "A hint."],
                "A": ["cat", "dog"], "B": ["dog", "cat"], "C": ["bird", None], "answer": ["B", "A"],
                "category": ["animals"] * 2, "image": [b64(png())] * 2},
    "seedbench": {"question": ["What is shown?"] * 2, "choice_a": ["cat"] * 2, "choice_b": ["dog"] * 2,
                  "choice_c": ["bird"] * 2, "choice_d": ["fish"] * 2, "answer": ["A", "B"], "question_id": ["1", "2"],
                  "image": [IMG] * 2},
    "scienceqa": {"image": [IMG, None], "question": ["Which is a mammal?", "Which is a verb?"],
                  "choices": [["frog", "trout", "robin", "gecko", "whale"], ["run", "blue"]], "answer": [4, 0],
                  "hint": ["Mammals have hair.", ""]},
    "mathvista": {"pid": ["1", "2", "3", "4", "5"], "question": ["How long?", "How many?", "Which?", "List.", "Say."],
                  "decoded_image": [IMG] * 5, "choices": [None, None, ["3", "4", "5"], None, None],
                  "unit": ["cm", None, None, None, None], "precision": [2.0, None, None, None, None],
                  "answer": ["1.25", "3", "4", "[1, 2]", "blue"],
                  "question_type": ["free_form", "free_form", "multi_choice", "free_form", "free_form"],
                  "answer_type": ["float", "integer", "text", "list", "text"]},
    "mmvet": {"id": ["v1", "v2"], "instruction": ["What is 2+2?", "Read it."], "answer": ["4<OR>four", "STOP"],
              "images": [[IMG]] * 2, "image_source": ["x"] * 2, "capability": [["math"], ["ocr"]]},
    "magnifierbench": {"id": ["1", "2"], "instruction": ["What colour? A. red, B. blue, C. green"] * 2,
                       "answer": ["B", "A"], "images": [[IMG]] * 2},
}
OPTIONS = {"seedbench": [{}, {"mode": "generate"}], "mathvista": [{}, {"extractor": "judge"}]}


def test_every_task_is_fuzzed():
    assert set(FILES) == set(TASKS)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, cols in FILES.items():
        task = get_task(name)
        items = task.load(write_parquet(str(d / f"{name}.parquet"), cols)).items
        out[name] = (task, items, [task.resolve_options(o) for o in OPTIONS.get(name, [{}])])
    return out


class RandomJudge:
    """A judge whose replies are random text: parsed by the task's own parser, a failure when unusable."""

    class cfg:
        model = "random-judge"

    def __init__(self, replies: list[str]):
        self.replies = list(replies)

    def ask(self, prompt, parse, max_tokens=None):
        reply = self.replies.pop() if self.replies else ""
        v = parse(reply)
        return JudgeResult(v is not None, v, reply, None if v is not None else "unusable reply", self.cfg.model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_reply_aborts_scoring(tasks, data):
    for name, (task, items, option_sets) in tasks.items():
        replies = data.draw(st.lists(REPLIES, min_size=2 * len(items), max_size=2 * len(items)), label=name)
        lines = {it.row: {"row": it.row, "reply": replies[2 * i], "freeform_reply": replies[2 * i + 1]}
                 for i, it in enumerate(items)}
        judge_replies = data.draw(st.lists(REPLIES, max_size=2 * len(items)), label=f"{name} judge")
        for opts in option_sets:
            for judge in (None, RandomJudge(judge_replies)):
                if opts.get("extractor") == "judge" and judge is None:
                    continue
                metrics, samples = task.metrics(items, lines, opts, judge)
                assert len(samples) == len(items) and isinstance(metrics, dict)


@settings(max_examples=300, deadline=None)
@given(reply=REPLIES)
@example('The answer is "{[1]: 2}".')
@example('The answer is "' + "-" * 5000 + '1".')
def test_parsers_never_raise(tasks, reply):
    assert parse_mme(reply) in ("yes", "no", "other") and parse_pope(reply) in ("yes", "no", "other")
    assert extract_choice(reply, list("ABCDE"), {"A": "cat", "B": "dog", "C": "dark red", "D": "red", "E": ""}) \
        in (None, *"ABCDE")
    assert parse_score(reply) is None or 0.0 <= parse_score(reply) <= 1.0
    assert parse_yes_no(reply) in (None, "yes", "no")
    _, items, _ = tasks["mathvista"]
    for it in items:  # every answer type: the rule extractor, then normalisation (also of a judge's extraction)
        ext = extract_rules(reply, it)
        assert ext is None or isinstance(ext, str)
        for v in (ext, reply):
            n = normalize(v, it)
            assert n is None or isinstance(n, str)


def test_mathvista_unhashable_literal_does_not_abort(tmp_path):
    """Issue 14 item 4: literal_eval raised TypeError on `{[1]: 2}` and aborted the whole scoring."""
    p = write_parquet(str(tmp_path / "mv.parquet"), {k: v[3:4] for k, v in FILES["mathvista"].items()})
    res, samples = score_lines("mathvista", p, {0: {"row": 0, "reply": 'The answer is "{[1]: 2}".'}})
    assert samples[0]["correct"] is False and samples[0]["pred"] == "{[1]:2}" and res["metrics"]["accuracy"] == 0.0
    res, samples = score_lines("mathvista", p, {0: {"row": 0, "reply": 'The answer is "[1,2]".'}})
    assert samples[0]["correct"] is True
    # an integer answer of 1e999 (inf) is no answer, not an OverflowError
    p2 = write_parquet(str(tmp_path / "mv2.parquet"), {k: v[1:2] for k, v in FILES["mathvista"].items()})
    res, samples = score_lines("mathvista", p2, {0: {"row": 0, "reply": "1e999"}})
    assert samples[0]["pred"] is None and res["metrics"]["unextracted"] == 1


def test_a_reply_that_is_not_text_is_scored_as_text(tmp_path):
    p = write_parquet(str(tmp_path / "pope.parquet"), FILES["pope"])
    res, samples = score_lines("pope", p, {0: {"row": 0, "reply": 7}, 1: {"row": 1, "reply": {"no": 1}}})
    assert [s["pred"] for s in samples] == ["other", "other"] and res["metrics"]["other"] == 2
