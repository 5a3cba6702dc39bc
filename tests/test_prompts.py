"""Prompt formats and Otter's loss rule, with hand-checked expectations."""

import pytest

from otterfast.data import prompts
from otterfast.data.prompts import Turn, render
from otterfast.data.tokenizer import labels_from_spans, load_tokenizer, tokenize_rendered


def test_simple_exact_text():
    r = render("simple", [Turn("What is it?", "A cat.", True)])
    assert r.text == "<image>User:What is it? GPT:<answer>A cat.<|endofchunk|>"
    assert r.text[r.answer_spans[0][0]:r.answer_spans[0][1]] == "A cat.<|endofchunk|>"
    assert r.media_chars == [0]


def test_simple_multi_turn_only_first_has_image():
    r = render("simple", [Turn("Q1", "A1", True), Turn("Q2", "A2", False)])
    assert r.text == "<image>User:Q1 GPT:<answer>A1<|endofchunk|>User:Q2 GPT:<answer>A2<|endofchunk|>"
    assert [r.text[a:b] for a, b in r.answer_spans] == ["A1<|endofchunk|>", "A2<|endofchunk|>"]


def test_llama2_exact_text():
    assert render("llama2", [Turn("Q", "A", True)]).text == "[INST]<image>\nQ[/INST]<answer>A<|endofchunk|>"
    assert render("llama2", [Turn("Q", "A", False)]).text == "[INST]Q[/INST]<answer>A<|endofchunk|>"


def test_idefics_exact_text_and_trailing_newline_stripped():
    r = render("idefics", [Turn("Q", "A", True)])
    assert r.text == ("User:<fake_token_around_image><image><fake_token_around_image>Q<end_of_utterance>\n"
                      "Assistant:<answer>A<end_of_utterance>")
    assert r.text[slice(*r.answer_spans[0])] == "A<end_of_utterance>"


def test_fuyu_exact_text():
    r = render("fuyu", [Turn("Q", "A", True)])
    assert r.text == "User:Q Assistant:\x04 A"
    assert r.text[slice(*r.answer_spans[0])] == " A"
    assert r.media_chars == [0]


def test_task_description_prefix():
    r = render("simple", [Turn("Q", "A", False)], task_description="Do it.")
    assert r.text == "Do it.\nUser:Q GPT:<answer>A<|endofchunk|>"


def test_cleaning_keep_symbols_default_and_otter_mode():
    s = "  x = 3 - 1:\n\n  50% #1 "
    assert prompts.clean_instruction(s) == "x = 3 - 1:\n\n  50% #1"
    assert prompts.clean_instruction(s, keep_symbols=False) == "x 3 1 50 1"
    assert prompts.clean_answer("a\r\nb") == "a\nb"


def test_special_token_literals_removed_from_user_text():
    assert prompts.clean_instruction("look <image> here<|endofchunk|>") == "look  here"


@pytest.fixture(scope="module")
def tok(demo_tok_dir):
    return load_tokenizer(demo_tok_dir, "simple")


def otter_masking(ids, info):
    """Otter's `masking()` rule, transcribed token by token (the oracle for our span-based labels)."""
    labels = [i if i == info.eos_id else -100 for i in ids]
    for i, t in enumerate(ids):
        if t == info.answer_id:
            j = next((k for k in range(i + 1, len(ids)) if ids[k] == info.eoc_id), None)
            if j is not None:
                labels[i + 1 : j + 1] = ids[i + 1 : j + 1]
    labels[0] = -100
    return labels


@pytest.mark.parametrize("fmt", ["simple", "llama2"])
def test_labels_equal_otter_rule(demo_tok_dir, fmt):
    t, info = load_tokenizer(demo_tok_dir, fmt)
    turns = [Turn("What is 3 plus 4?", "3 plus 4 is 7.", True), Turn("And 5 plus 5?", "It is 10.", False),
             Turn("Spell cat backwards.", "tac", False)]
    out = tokenize_rendered(t, info, render(fmt, turns))
    labels = labels_from_spans(out.input_ids, out.label_spans)
    assert labels == otter_masking(out.input_ids, info)
    assert out.input_ids[0] == info.bos_id and out.input_ids[-1] == info.eos_id


def test_labels_hand_checked(tok):
    t, info = tok
    out = tokenize_rendered(t, info, render("simple", [Turn("Hi?", "Yes.", True)]))
    labels = labels_from_spans(out.input_ids, out.label_spans)
    labelled = [i for i, l in zip(out.input_ids, labels) if l != -100]
    assert t.decode(labelled) == "Yes.<|endofchunk|></s>"
    # everything before the answer is unlabelled, <answer> included
    ans = out.input_ids.index(info.answer_id)
    assert all(l == -100 for l in labels[: ans + 1])
    assert out.media_pos == [1]  # after BOS
    assert out.input_ids[1] == info.media_id


def test_fuyu_labels_answer_and_eos(demo_tok_dir):
    t, info = load_tokenizer(demo_tok_dir, "fuyu")
    out = tokenize_rendered(t, info, render("fuyu", [Turn("Q one", "first answer", True), Turn("Q two", "second", False)]))
    labels = labels_from_spans(out.input_ids, out.label_spans)
    got = [t.decode([i for i, l in zip(out.input_ids[a:b], labels[a:b])]) for a, b in out.label_spans]
    assert got == [" first answer", " second</s>"]
    assert out.media_pos == [0]  # the first image goes before BOS, as Fuyu does


def test_idefics_labels(demo_tok_dir):
    t, info = load_tokenizer(demo_tok_dir, "idefics")
    out = tokenize_rendered(t, info, render("idefics", [Turn("Q", "yes it is", True)]))
    got = [t.decode(out.input_ids[a:b]) for a, b in out.label_spans]
    assert got == ["yes it is<end_of_utterance></s>"]


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown prompt format"):
        render("vicuna", [Turn("Q", "A", False)])


def _sentencepiece_style_tokenizer(path):
    """A LLaMA-like tokenizer (Metaspace pre-tokenizer, <s>/</s>), without Otter's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    corpus = ["What is 3 plus 4? 3 plus 4 is 7.", "And 5 plus 5? It is 10.", "Spell cat backwards. tac",
              "User: GPT: [INST] [/INST]"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["simple", "llama2"])
def test_labels_equal_otter_rule_sentencepiece_style(tmp_path, fmt):
    t, info = load_tokenizer(_sentencepiece_style_tokenizer(tmp_path), fmt)
    assert "<answer>" in info.added_tokens and "<PAD>" in info.added_tokens
    turns = [Turn("What is 3 plus 4?", "3 plus 4 is 7.", True), Turn("Spell cat backwards.", "tac", False)]
    out = tokenize_rendered(t, info, render(fmt, turns))
    assert labels_from_spans(out.input_ids, out.label_spans) == otter_masking(out.input_ids, info)
    assert out.input_ids[out.media_pos[0]] == info.media_id
