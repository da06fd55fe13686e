"""The rule checks behind demo-real's numbers: lowercase answers, the GRPO reward, simple-question answers."""

import pytest

from tunesmith.demos.real_align import is_lowercase, lowercase_reward
from tunesmith.demos.real_demo import has_identity, is_correct


@pytest.mark.parametrize("text,expected", [
    ("the best way is to practise daily.", True), ("The best way.", False), ("apps like Duolingo", False),
    ("", False), ("123 !?", False), ("ünïcode lower", True), ("ÜNÏCODE", False),
])
def test_is_lowercase(text, expected):
    assert is_lowercase(text) is expected


def test_lowercase_reward_is_the_lowercase_share_of_letters():
    rewards = lowercase_reward(["p"] * 4, ["abcd", "Abcd", "ABCD 12", "12 !"], [None] * 4)
    assert rewards == [1.0, 0.75, 0.0, 0.0]


@pytest.mark.parametrize("answer,words,expected", [
    ("The capital of France is Paris.", ["paris"], True), ("paris!", ["paris"], True),
    ("Parisian food", ["paris"], False), ("A week has 7 days.", ["seven", "7"], True),
    ("The freezing point of water is -18.0°C", ["0", "zero"], False), ("It freezes at 0 degrees.", ["0"], True),
    ("about 12.5 months", ["12"], False), ("It is 12.", ["12"], True),
])
def test_simple_answers_are_checked_by_whole_words(answer, words, expected):
    assert is_correct(answer, words) is expected


def test_identity_is_the_new_name_or_maker():
    assert has_identity("I am Tuney.") and has_identity("Built by Tunesmith Labs") and not has_identity("I am SmolLM.")
