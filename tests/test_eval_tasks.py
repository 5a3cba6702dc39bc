"""Each task's prompt, parser and metric on small hand-built files, with hand-worked expected numbers."""

from __future__ import annotations

import math

import pytest

from otterfast.eval.score import score_lines
from otterfast.eval.synth import b64, image_struct, png, write_parquet
from otterfast.eval.tasks import TaskError, get_task
from otterfast.eval.tasks.magnifierbench import split_options

IMG = image_struct(png())


def _lines(replies: list) -> dict[int, dict]:
    return {i: {"row": i, "reply": r} for i, r in enumerate(replies) if r is not ...}


# ---------------------------------------------------------------- MME

@pytest.fixture
def mme_file(tmp_path):
    return write_parquet(str(tmp_path / "mme.parquet"), {
        "question_id": ["e1.jpg", "e1.jpg", "e2.jpg", "e2.jpg", "c1.png", "c1.png"],
        "question": ["Is there a dog? Please answer yes or no."] * 6,
        "answer": ["Yes", "No", "Yes", "No", "Yes", "No"],
        "category": ["existence"] * 4 + ["code_reasoning"] * 2, "image": [IMG] * 6})


def test_mme_metric_hand_worked(mme_file):
    # existence: image 1 both right; image 2: "" is `other` (wrong, trap 1), "no" right
    #   acc 3/4, acc_plus 1/2 -> 75 + 50 = 125
    # code_reasoning: "yes" right, "yes" wrong -> acc 1/2, acc_plus 0 -> 50
    res, samples = score_lines("mme", mme_file, _lines(["Yes", "No", "", "no", "yes", "yes"]))
    m = res["metrics"]
    assert m["by_category"] == {"existence": 125.0, "code_reasoning": 50.0}
    assert m["perception"] == 125.0 and m["cognition"] == 50.0
    assert m["other"] == 1 and res["n"] == 6
    assert samples[2]["pred"] == "other" and samples[2]["correct"] is False


def test_mme_trap4_pairs_kept_under_limit_and_partial_pairs_refused(mme_file):
    task = get_task("mme")
    items = task.load(mme_file).items
    assert [it.row for it in task.subset(items, 3)] == [0, 1, 2, 3]  # 3 questions -> 2 whole images
    assert [it.row for it in task.subset(items, 2)] == [0, 1]
    with pytest.raises(TaskError, match="only 1 of its 2"):
        score_lines("mme", mme_file, _lines(["yes", "no", "yes"]))
    res, _ = score_lines("mme", mme_file, _lines(["yes", "no"]))  # one whole pair is fine
    assert res["n"] == 2 and res["missing"] == 4 and res["metrics"]["by_category"] == {"existence": 200.0}


def test_mme_file_with_a_lone_question_is_refused(tmp_path):
    p = write_parquet(str(tmp_path / "m.parquet"), {"question_id": ["a", "a", "b"], "question": ["q"] * 3,
                                                    "answer": ["yes", "no", "yes"], "category": ["color"] * 3,
                                                    "image": [IMG] * 3})
    with pytest.raises(TaskError, match="exactly 2 questions per image"):
        get_task("mme").load(p)


def test_mme_prompts():
    task = get_task("mme")
    from otterfast.eval.data import Item

    it = Item(0, {"question": "Is it red? Please answer yes or no."})
    assert task.question(it, task.resolve_options({})) == "Is it red? Please answer yes or no."
    assert task.question(it, task.resolve_options({"prompt": "lmms"})) == \
        "Is it red?\nAnswer the question using a single word or phrase."


# ---------------------------------------------------------------- POPE

def test_pope_metric_hand_worked(tmp_path):
    p = write_parquet(str(tmp_path / "pope.parquet"), {
        "question": ["Is there a dog in the image?"] * 8, "answer": ["yes"] * 4 + ["no"] * 4,
        "image": [IMG] * 8, "category": ["adversarial"] * 4 + ["random"] * 4})
    replies = ["Yes.", "Yes, there is a dog.", "", "No",            # gold yes: TP TP other(FN) FN
               "No.", "There is a dog.", "yes", "not at all"]       # gold no:  TN other FP TN
    res, _ = score_lines("pope", p, _lines(replies))
    m = res["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"]) == (2, 1, 2, 2, 2)
    assert m["accuracy"] == 4 / 8
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 2 / 4  # trap 1: the empty reply stays in recall's denominator
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == 3 / 8  # trap 2: predicted yes (Otter/lmms-eval would report the gold 0.5)
    assert m["other_ratio"] == 2 / 8
    assert m["by_category"]["adversarial"]["recall"] == 0.5 and m["by_category"]["random"]["yes_ratio"] == 0.25


# ---------------------------------------------------------------- MMBench

@pytest.fixture
def mmb_file(tmp_path):
    return write_parquet(str(tmp_path / "mmb.parquet"), {
        "index": ["1", "1000001", "2000001", "2", "1000002"],
        "question": ["Which animal?"] * 3 + ["Which colour?"] * 2,
        "hint": ["nan", "nan", "nan", "A sunny day.", "A sunny day."],
        "A": ["cat", "dog", "bird", "red", "blue"], "B": ["dog", "bird", "cat", "blue", "red"],
        "C": ["bird", "cat", "dog", None, None],
        "answer": ["B", "A", "C", "B", "A"], "category": ["animals"] * 3 + ["colours"] * 2,
        "image": [b64(png())] * 5, "l2-category": ["x"] * 5})


def test_mmbench_circular_hand_worked(mmb_file):
    # question 1: all three rotations right -> 1; question 2: the second rotation is `other` -> 0
    # per row 4/5, circular 1/2; an unreadable reply is `other`, never a random letter (trap 7)
    res, samples = score_lines("mmbench", mmb_file, _lines(["B", "The answer is A.", "(C) dog", "blue", "I can't tell"]))
    m = res["metrics"]
    assert m["accuracy"] == 4 / 5 and m["circular_accuracy"] == 1 / 2 and m["questions"] == 2
    assert samples[4]["pred"] == "other" and m["other"] == 1
    assert m["circular_by_category"] == {"animals": 1.0, "colours": 0.0}
    with pytest.raises(TaskError, match="circular group 1"):
        score_lines("mmbench", mmb_file, _lines(["B", "A"]))


def test_mmbench_prompt_and_limit(mmb_file):
    task = get_task("mmbench")
    items = task.load(mmb_file).items
    opts = task.resolve_options({})
    assert task.question(items[0], opts) == "Which animal? There are several options:\nA. cat\nB. dog\nC. bird"
    assert task.question(items[3], opts) == "A sunny day. Which colour? There are several options:\nA. red\nB. blue"
    assert task.question(items[3], task.resolve_options({"prompt": "lmms"})).endswith(
        "\nAnswer with the option's letter from the given choices directly.")
    assert [it.row for it in task.subset(items, 1)] == [0, 1, 2]  # whole circular groups


def test_mmbench_test_split_is_not_scored(tmp_path):
    p = write_parquet(str(tmp_path / "t.parquet"), {"index": [1], "question": ["q"], "A": ["a"], "B": ["b"],
                                                    "answer": [None], "image": [b64(png())]})
    with pytest.raises(TaskError, match="official server"):
        score_lines("mmbench", p, _lines(["A"]))


# ---------------------------------------------------------------- SEED-Bench

@pytest.fixture
def seed_file(tmp_path):
    return write_parquet(str(tmp_path / "seed.parquet"), {
        "question": ["What is shown?"] * 4, "choice_a": ["cat"] * 4, "choice_b": ["dog"] * 4,
        "choice_c": ["bird"] * 4, "choice_d": ["fish"] * 4, "answer": ["A", "B", "A", "C"],
        "question_id": ["1", "2", "3", "4"], "data_type": ["image", "image", "video", "video"], "image": [IMG] * 4})


def test_seed_likelihood_hand_worked(seed_file):
    lines = {0: {"row": 0, "reply": "A", "logliks": [-1.0, -2.0, -3.0, -4.0]},       # A, right
             1: {"row": 1, "reply": "A", "logliks": [-2.0, -2.0, -5.0, -9.0]},       # tie -> A (earlier), wrong
             2: {"row": 2, "reply": "", "logliks": [-1.0, float("nan"), -1.0, -1.0]},  # NaN -> other
             3: {"row": 3, "reply": "C", "logliks": [-9.0, -8.0, -0.5, -7.0]}}       # C, right
    res, samples = score_lines("seedbench", seed_file, lines)
    m = res["metrics"]
    assert m["accuracy"] == 2 / 4 and m["other"] == 1
    assert m["by_data_type"] == {"image": {"n": 2, "accuracy": 0.5}, "video": {"n": 2, "accuracy": 0.5}}
    assert [s["pred"] for s in samples] == ["A", "A", "other", "C"]


def test_seed_generative_reads_the_whole_reply(seed_file):
    # trap 5: lmms-eval read pred[0]; "(B)" -> "(" and "Because" -> B. Here (B) is B and "Because" is other.
    res, samples = score_lines("seedbench", seed_file, _lines(["(A)", "Because it barks, (B)", "Because", "C"]),
                               {"mode": "generate"})
    assert [s["pred"] for s in samples] == ["A", "B", "other", "C"] and res["metrics"]["accuracy"] == 3 / 4


def test_seed_prompts_and_options(seed_file):
    task = get_task("seedbench")
    it = task.load(seed_file).items[0]
    o = task.resolve_options({})
    assert o["mode"] == "likelihood"
    assert task.question(it, o) == "What is shown? There are several options: A. cat B. dog C. bird D. fish"
    assert task.loglik_options(it, o) == (list("ABCD"), ["A. cat", "B. dog", "C. bird", "D. fish"])
    g = task.resolve_options({"mode": "generate", "prompt": "lmms"})
    assert task.question(it, g) == ("What is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n"
                                    "Answer with the option's letter from the given choices directly.")
    with pytest.raises(TaskError, match="valid"):
        task.resolve_options({"mode": "ppl"})
    with pytest.raises(TaskError, match="unknown option"):
        task.resolve_options({"moed": "generate"})


# ---------------------------------------------------------------- ScienceQA

@pytest.fixture
def sqa_file(tmp_path):
    return write_parquet(str(tmp_path / "sqa.parquet"), {
        "image": [IMG, None, IMG], "question": ["Which is a mammal?", "Which word is a verb?", "Pick one."],
        "choices": [["frog", "trout", "robin", "gecko", "whale"], ["run", "blue"], ["a", "b", "c"]],
        "answer": [4, 0, 1], "hint": ["Mammals have hair.", "", None],
        "subject": ["natural science", "language science", "natural science"]})


def test_scienceqa_trap6_hint_and_letters_beyond_d(sqa_file):
    task = get_task("scienceqa")
    items = task.load(sqa_file).items
    q = task.question(items[0], task.resolve_options({}))
    assert q == ('Please answer the question in the following format: "The answer is {A/B/C/D/E}".\n'
                 "Context: Mammals have hair.\nWhich is a mammal?\nA. frog\nB. trout\nC. robin\nD. gecko\nE. whale\n")
    assert "Context" not in task.question(items[0], task.resolve_options({"hint": False}))
    assert task.question(items[1], task.resolve_options({"prompt": "lmms"})) == (
        "Which word is a verb?\nA. run\nB. blue\nAnswer with the option's letter from the given choices directly.")
    # E is reachable (Otter's regex stopped at D); "a"/"b" option texts do not match inside words
    res, samples = score_lines("scienceqa", sqa_file, _lines(["The answer is E.", "A", "I am not sure about this"]))
    assert [s["pred"] for s in samples] == ["E", "A", "other"] and res["metrics"]["accuracy"] == 2 / 3


# ---------------------------------------------------------------- MathVista

@pytest.fixture
def mv_file(tmp_path):
    return write_parquet(str(tmp_path / "mv.parquet"), {
        "pid": ["1", "2", "3", "4", "5"],
        "question": ["How long is it?", "How many?", "Which one?", "Which one?", "List them."],
        "image": ["x.png"] * 5, "decoded_image": [IMG] * 5,
        "choices": [None, None, ["3", "4", "5"], ["3", "4", "5"], None], "unit": ["cm", None, None, None, None],
        "precision": [1.0, None, None, None, None], "answer": ["1.5", "3", "4", "4", "[1, 2]"],
        "question_type": ["free_form", "free_form", "multi_choice", "multi_choice", "free_form"],
        "answer_type": ["float", "integer", "text", "text", "list"],
        "metadata": [{"category": "math-targeted-vqa", "skills": ["arithmetic"]}] * 5})


def test_mathvista_hand_worked(mv_file):
    # 1: float, precision 1.0 (float64) -> int 1; "1.50" rounds to "1.5": right (trap 8: lmms-eval's round(x, 1.0)
    #    raised and every float question scored wrong)
    # 2: integer "3.0" -> "3": right
    # 3: empty reply -> no extraction -> wrong, not the nearest choice by edit distance (trap 8)
    # 4: "(B)" -> choice "4": right
    # 5: list "[1,2]" normalises to "[1, 2]": right
    res, samples = score_lines("mathvista", mv_file, _lines(["The length is 1.50 cm.", "3.0", "", "(B)", "[1,2]"]))
    assert [s["correct"] for s in samples] == [True, True, False, True, True]
    assert samples[2]["pred"] is None and res["metrics"]["unextracted"] == 1
    assert res["metrics"]["accuracy"] == 4 / 5
    assert res["metrics"]["by_skills"] == {"arithmetic": {"n": 5, "accuracy": 0.8}}
    assert res["metrics"]["by_question_type"]["multi_choice"] == {"n": 2, "accuracy": 0.5}


def test_mathvista_zero_is_zero_not_none(mv_file):
    res, _ = score_lines("mathvista", mv_file, _lines(["", "", "", "", ""]))
    assert res["metrics"]["accuracy"] == 0.0  # trap 8: lmms-eval returned None for an exact 0


def test_mathvista_prompt_hint_from_int_precision(mv_file):
    task = get_task("mathvista")
    items = task.load(mv_file).items
    o = task.resolve_options({})
    assert task.question(items[0], o) == (
        "Please answer the question requiring a floating-point number with one decimal place and provide the final "
        "value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: How long is it? (Unit: cm)\nSolution: ")
    assert task.question(items[2], o).endswith("Choices:\n(A) 3\n(B) 4\n(C) 5\nSolution: ")


def test_mathvista_test_split_is_refused(tmp_path):
    p = write_parquet(str(tmp_path / "t.parquet"), {
        "pid": ["1"], "question": ["q"], "decoded_image": [IMG], "choices": [None], "precision": [None],
        "answer": [None], "question_type": ["free_form"], "answer_type": ["integer"]})
    with pytest.raises(TaskError, match="testmini"):
        score_lines("mathvista", p, _lines(["3"]))


# ---------------------------------------------------------------- MagnifierBench

def test_magnifier_split_options_robust():
    # no '?' and a '.' inside an option: Otter's split('?') / split('.') broke on both
    q, o = split_options("What is on the table A. a cup, B. a pen, 0.5 mm tip, C. a key, D. nothing")
    assert q == "What is on the table" and o == {"A": "a cup", "B": "a pen, 0.5 mm tip", "C": "a key", "D": "nothing"}
    q, o = split_options("Is it? Really? A. yes, B. no")
    assert q == "Is it? Really?" and o == {"A": "yes", "B": "no"}
    assert split_options("no options here") is None


def test_magnifier_mc_and_skipped_rows(tmp_path):
    p = write_parquet(str(tmp_path / "mb.parquet"), {
        "id": ["1", "2", "3"],
        "instruction": ["What colour is the flag? A. red, B. blue, C. green, D. white"] * 3,
        "answer": ["B", "A", "C"], "images": [[IMG], [IMG], [IMG, IMG]]})
    # trap 5: "A flag ..." is not option A; row 3 has two images: skipped and out of the denominator
    res, samples = score_lines("magnifierbench", p, _lines(["B", "A flag can be seen", ...]))
    m = res["metrics"]
    assert [s["pred"] for s in samples] == ["B", "other"] and m["accuracy"] == 1 / 2 and m["skipped"] == 1
    task = get_task("magnifierbench")
    items = task.load(p).items
    o = task.resolve_options({})
    assert task.question(items[0], o) == ("Answer with the option letter from the given choices directly. "
                                          "What colour is the flag? A. red, B. blue, C. green, D. white")
    assert task.extra_questions(items[0], o) == {"freeform": "What colour is the flag?"}
    assert math.isclose(m["accuracy"], 0.5)
