"""Reply parsers, each against hand-worked replies, with the eval-reference 1.3 trap each case guards named."""

from __future__ import annotations

import pytest

from otterfast.eval.parsing import OTHER, extract_choice, letters_for, parse_mme, parse_pope

ABCD = list("ABCD")
PETS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("reply,want", [
    ("yes", "yes"), ("No", "no"), ("Yes.", "yes"), ("y", "yes"), ("n", "no"),
    ("Yes, there is a dog.", "yes"), ("No, it is not.", "no"), ("Not really", "no"),
    # trap 1: empty / off-format replies are `other`, never yes
    ("", OTHER), (None, OTHER), ("   ", OTHER), ("The image shows a dog", OTHER), ("Maybe", OTHER),
])
def test_mme_parser(reply, want):
    assert parse_mme(reply) == want


@pytest.mark.parametrize("reply,want", [
    ("Yes", "yes"), ("No", "no"),
    # trap 3: exact-match parsing scored these wrong; the first-sentence rule reads them
    ("Yes.", "yes"), ("Yes, there is a car in the image.", "yes"), ("No, there is no car.", "no"),
    ("There is not a car in the image.", "no"), ("no", "no"), ("NO.", "no"),
    # only the first sentence counts (official rule): the 'no' later is not read
    ("Yes. There is no doubt.", "yes"),
    # trap 1: empty and off-format are `other`, not yes (Otter made an empty reply a yes)
    ("", OTHER), (None, OTHER), ("A car.", OTHER), ("I cannot tell", OTHER),
])
def test_pope_parser(reply, want):
    assert parse_pope(reply) == want


class TestChoiceExtraction:
    @pytest.mark.parametrize("reply,want", [
        ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) dog", "B"), ("B. dog", "B"), ("**B**", "B"), ("b", "B"),
        ("The answer is C.", "C"), ("Answer: (D)", "D"), ("the correct option is B", "B"), ("I think it's C.", "C"),
        ("dog", "B"), ("It is a fish.", "D"),
    ])
    def test_forms(self, reply, want):
        assert extract_choice(reply, ABCD, PETS) == want

    def test_trap5_bare_article_is_not_option_a(self):
        # Otter's MagnifierBench/ScienceQA fallbacks read any uppercase 'A' as option A
        assert extract_choice("A dog is sitting on the sofa", ABCD, None) is None
        assert extract_choice("A dog is sitting on the sofa", ABCD, PETS) == "B"  # by the unique option text
        assert extract_choice("The answer is A dog", ABCD, None) is None
        assert extract_choice("A", ABCD, None) == "A" and extract_choice("A. cat", ABCD, None) == "A"

    def test_trap5_never_only_the_first_character(self):
        # lmms-eval SEED read pred[0]: "Because ..." would be B, "(B)" would be "("
        assert extract_choice("Because the dog is larger", ABCD, None) is None
        assert extract_choice("(B)", ABCD, None) == "B"
        assert extract_choice("The answer is B", ABCD, None) == "B"
        assert extract_choice("Definitely C", ABCD, None) is None  # "D" is only the first character

    def test_trap5_no_unordered_letter_set(self):
        # several distinct letters without a decisive form is ambiguous (`other`), never whichever a set yields first
        assert extract_choice("Either (A) or (C) could fit", ABCD, None) is None
        for _ in range(3):
            assert extract_choice("A. cat B. dog", ABCD, None) == "A"  # leading letter rule, deterministic

    def test_trap5_every_letter_the_item_has(self):
        letters = letters_for(6)
        assert extract_choice("The answer is E.", letters, None) == "E"
        assert extract_choice("F", letters, None) == "F"
        assert extract_choice("The answer is E.", ABCD, None) is None  # not an option of a 4-choice item

    def test_option_text_overlap_and_ambiguity(self):
        ch = {"A": "red", "B": "dark red", "C": "blue"}
        assert extract_choice("It is dark red.", list("ABC"), ch) == "B"
        assert extract_choice("red or blue", list("ABC"), ch) is None
        assert extract_choice("reddish", list("ABC"), ch) is None  # whole words only, no substring hits

    def test_empty_is_other(self):
        assert extract_choice("", ABCD, PETS) is None and extract_choice(None, ABCD, PETS) is None

    def test_letters_for(self):
        assert letters_for(5) == list("ABCDE")
        with pytest.raises(ValueError):
            letters_for(27)
