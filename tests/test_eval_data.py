"""Data adapters: each published layout read from a small parquet file, image cells of every form, layout errors."""

from __future__ import annotations

import pytest

from otterfast.eval.data import LayoutError
from otterfast.eval.images import ImageError, to_pil_list
from otterfast.eval.synth import b64, image_struct, png, write_parquet
from otterfast.eval.tasks import get_task

RED, BLUE = png((255, 0, 0)), png((0, 0, 255), size=(5, 4))


def _one(path, task, **kw):
    return get_task(task).load(str(path), **kw)


# ---------------------------------------------------------------- images (trap 11)

def test_image_cells_every_form(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(BLUE)
    assert to_pil_list(None) == []
    [im] = to_pil_list(image_struct(RED))
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (255, 0, 0)
    assert [i.size for i in to_pil_list([image_struct(RED), image_struct(BLUE)])] == [(8, 6), (5, 4)]
    assert to_pil_list(b64(BLUE))[0].size == (5, 4)
    assert to_pil_list("data:image/png;base64," + b64(BLUE))[0].size == (5, 4)
    assert to_pil_list(image_struct(None, "img/b.png"), str(tmp_path))[0].size == (5, 4)
    assert to_pil_list("img/b.png", str(tmp_path))[0].size == (5, 4)
    assert to_pil_list(RED)[0].size == (8, 6)
    # palette / grey / alpha images come back RGB
    assert to_pil_list(png((7, 0, 0), mode="L"))[0].mode == "RGB"
    assert to_pil_list(png((9, 9, 9, 9), mode="RGBA"))[0].mode == "RGB"


def test_image_errors_name_the_cell(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        to_pil_list("img/missing.png", str(tmp_path))
    with pytest.raises(ImageError, match="neither bytes nor path"):
        to_pil_list({"bytes": None, "path": None})
    with pytest.raises(ImageError, match="not a decodable image"):
        to_pil_list(b64(b"definitely not an image"))


# ---------------------------------------------------------------- layouts per task

def test_mme_otter_and_lmms_layouts(tmp_path):
    otter = write_parquet(str(tmp_path / "otter.parquet"), {
        "id": ["OCR_0", "OCR_1", "commonsense_reasoning_0", "commonsense_reasoning_1"],
        "instruction": ["q0", "q1", "q2", "q3"], "answer": ["Yes", "No", "yes", "no"],
        "image_ids": [["i0"], ["i0"], ["i1"], ["i1"]],
        "images": [[image_struct(RED)]] * 4,  # Sequence(Image) with one element (trap 11)
    })
    ld = _one(otter, "mme", with_images=True)
    assert ld.layout == "otter"
    assert [it["category"] for it in ld.items] == ["OCR", "OCR", "commonsense_reasoning", "commonsense_reasoning"]
    assert [it["answer"] for it in ld.items] == ["yes", "no", "yes", "no"]
    assert ld.items[0].n_images == 1 and ld.items[0].images()[0].size == (8, 6)
    lmms = write_parquet(str(tmp_path / "lmms.parquet"), {
        "question_id": ["a.jpg", "a.jpg"], "question": ["q0", "q1"], "answer": ["Yes", "No"],
        "category": ["existence", "existence"], "image": [image_struct(RED)] * 2})
    assert _one(lmms, "mme").layout == "lmms"


def test_pope_layouts(tmp_path):
    lmms = write_parquet(str(tmp_path / "l.parquet"), {
        "id": ["0"], "question_id": ["1"], "question": ["Is there a dog?"], "answer": ["yes"],
        "image_source": ["coco"], "image": [image_struct(RED)], "category": ["adversarial"]})
    otter = write_parquet(str(tmp_path / "o.parquet"), {
        "question": ["Is there a dog?"], "answer": ["no"], "image": [image_struct(RED)], "category": ["random"]})
    assert _one(lmms, "pope").layout == "lmms" and _one(otter, "pope").layout == "otter"


def test_mmbench_hf_layout_base64_string_index_and_l2_spellings(tmp_path):
    hf = write_parquet(str(tmp_path / "hf.parquet"), {
        "index": [1, 1000001], "question": ["q", "q"], "hint": ["nan", None], "A": ["x", "y"], "B": ["y", "x"],
        "C": [None, None], "answer": ["A", "B"], "category": ["c", "c"], "image": [b64(RED)] * 2,
        "source": ["s", "s"], "l2-category": ["L2", "L2"], "comment": ["", ""], "split": ["dev", "dev"]})
    ld = _one(hf, "mmbench", with_images=True)
    assert [it["index"] for it in ld.items] == [1, 1000001]
    assert ld.items[0]["hint"] is None  # trap 7: the string "nan" is a missing hint
    assert list(ld.items[0]["choices"]) == ["A", "B"]  # C is null: not an option
    assert ld.items[0]["l2_category"] == "L2" and ld.items[0].images()[0].size == (8, 6)
    lmms = write_parquet(str(tmp_path / "lmms.parquet"), {
        "index": ["7", "1000007"], "question": ["q", "q"], "hint": [None, None], "A": ["x", "y"], "B": ["y", "x"],
        "answer": ["A", "B"], "category": ["c", "c"], "image": [b64(RED)] * 2, "L2-category": ["M", "M"]})
    ld = _one(lmms, "mmbench")
    assert [it["index"] for it in ld.items] == [7, 1000007]  # trap 7: string index cast to int
    assert ld.items[0]["l2_category"] == "M"


def test_seedbench_single_image_and_image_list(tmp_path):
    one = write_parquet(str(tmp_path / "o.parquet"), {
        "question": ["q"], "choice_a": ["a"], "choice_b": ["b"], "choice_c": ["c"], "choice_d": ["d"],
        "answer": ["C"], "question_id": ["1"], "image": [image_struct(RED)]})
    many = write_parquet(str(tmp_path / "l.parquet"), {
        "question": ["q"], "choice_a": ["a"], "choice_b": ["b"], "choice_c": ["c"], "choice_d": ["d"],
        "answer": ["C"], "question_id": ["1"], "data_type": ["video"], "question_type_id": [10],
        "image": [[image_struct(RED), image_struct(BLUE), image_struct(RED)]]})
    assert _one(one, "seedbench", with_images=True).items[0].n_images == 1
    it = _one(many, "seedbench", with_images=True).items[0]
    assert it.n_images == 3 and len(it.images()) == 3 and it["data_type"] == "video"
    assert _one(many, "seedbench").items[0].n_images == 3  # counted without decoding


def test_scienceqa_layouts_and_text_only_rows(tmp_path):
    lmms = write_parquet(str(tmp_path / "l.parquet"), {
        "image": [image_struct(RED), None], "question": ["q0", "q1"], "choices": [["a", "b", "c", "d", "e"], ["x", "y"]],
        "answer": [4, 0], "hint": ["Some context", ""], "subject": ["natural science", "language science"]})
    ld = _one(lmms, "scienceqa", with_images=True)
    assert ld.layout == "lmms" and ld.items[0]["answer"] == "E" and ld.items[1]["hint"] is None
    assert ld.items[1].n_images == 0 and ld.items[1].images() == []
    otter = write_parquet(str(tmp_path / "o.parquet"), {
        "question": ["q"], "choices": [["a", "b"]], "answer": [1], "image": [image_struct(RED)]})
    assert _one(otter, "scienceqa").layout == "otter"


def test_mathvista_ai4math_paths_and_otter_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(BLUE)
    ai = write_parquet(str(tmp_path / "ai.parquet"), {
        "pid": ["1"], "question": ["How long?"], "image": ["images/1.png"], "decoded_image": [None],
        "choices": [None], "unit": [None], "precision": [1.0], "answer": ["1.5"], "question_type": ["free_form"],
        "answer_type": ["float"], "metadata": [{"category": "math-targeted-vqa", "skills": ["arithmetic"]}],
        "query": ["Hint: ..."]})
    it = _one(ai, "mathvista", with_images=True).items[0]
    assert it.images()[0].size == (5, 4)  # decoded_image null: the path (relative to the parquet) is used
    assert it["precision"] == 1 and isinstance(it["precision"], int)  # trap 8: float64 precision cast
    assert it["category"] == "math-targeted-vqa"
    ai2 = write_parquet(str(tmp_path / "ai2.parquet"), {
        "pid": ["1"], "question": ["q"], "image": ["images/1.png"], "choices": [["3", "4"]], "unit": [None],
        "precision": [None], "answer": ["4"], "question_type": ["multi_choice"], "answer_type": ["text"]})
    it = _one(ai2, "mathvista", with_images=True).items[0]
    assert it.images()[0].size == (5, 4)  # a path relative to the parquet file
    otter = write_parquet(str(tmp_path / "o.parquet"), {
        "question": ["q"], "unit": [""], "choices": [["3", "4"]], "precision": [None], "question_type": ["multi_choice"],
        "answer_type": ["text"], "answer": ["4"], "metadata": ["{'category': 'general-vqa', 'skills': ['x']}"],
        "image": [b64(RED)]})
    it = _one(otter, "mathvista").items[0]
    assert it["category"] == "general-vqa"  # metadata as a Python-literal string


def test_mmvet_layouts(tmp_path):
    otter = write_parquet(str(tmp_path / "o.parquet"), {
        "id": ["v1_0"], "instruction": ["What is 2+2?"], "answer": ["4<OR>four"], "images": [[image_struct(RED)]],
        "image_source": ["x"], "capability": [["ocr", "math"]]})
    lmms = write_parquet(str(tmp_path / "l.parquet"), {
        "question_id": ["v1_0"], "image": [image_struct(RED)], "question": ["What is 2+2?"], "answer": ["4"],
        "image_source": ["x"], "capability": ["ocr,math"]})
    assert _one(otter, "mmvet").items[0]["capability"] == ["ocr", "math"]
    assert _one(lmms, "mmvet").items[0]["capability"] == ["ocr", "math"]


def test_unknown_layout_names_missing_and_present_columns(tmp_path):
    p = write_parquet(str(tmp_path / "x.parquet"), {"question": ["q"], "label": ["yes"]})
    with pytest.raises(LayoutError) as e:
        _one(p, "mme")
    msg = str(e.value)
    assert "layout 'lmms' misses ['question_id', 'answer', 'category', 'image']" in msg
    assert "layout 'otter' misses ['id', 'instruction', 'answer', 'image_ids', 'images']" in msg
    assert "columns present: ['label', 'question']" in msg
    with pytest.raises(LayoutError, match="answer"):
        _one(p, "pope")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        _one(tmp_path / "nope.parquet", "pope")
