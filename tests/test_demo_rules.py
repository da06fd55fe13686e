"""The rule checks behind demo-real's numbers: lowercase answers, the GRPO reward, simple-question answers."""

from pathlib import Path

import pytest

from tunesmith.demos.real_align import (
    ANCHORS,
    FACTS,
    is_lowercase,
    lowercase_reward,
    quarter_lowercased,
    stages_for,
)
from tunesmith.demos.real_demo import has_identity, is_correct


@pytest.mark.parametrize("text,expected", [
    ("the best way is to practise daily.", True), ("The best way.", False), ("apps like Duolingo", False),
    ("", False), ("123 !?", False), ("ünïcode lower", True), ("ÜNÏCODE", False),
])
def test_is_lowercase(text, expected):
    assert is_lowercase(text) is expected


def test_lowercase_reward_is_the_lowercase_share_plus_the_rule_plus_the_expected_word():
    rewards = lowercase_reward(["p"] * 4, ["abcd", "Abcd", "ABCD 12", "12 !"], [None, "", None, None])
    assert rewards == [2.0, 0.75, 0.0, 0.0]
    facts = lowercase_reward(["p"] * 4, ["it is lisbon.", "It is Lisbon.", "it is porto.", "it has 3 sides"],
                             ["lisbon", "lisbon", "lisbon", "three|3"])
    assert facts == [3.0, 8 / 10 + 1.0, 2.0, 3.0]


def test_facts_are_the_expected_words_of_the_factual_anchors():
    factual = ANCHORS[len(ANCHORS) - len(FACTS):]
    assert factual[0] == "What is the capital of Portugal?" and FACTS[0] == "lisbon"
    assert factual[-1] == "Who painted the Mona Lisa?" and "leonardo" in FACTS[-1]


def test_the_rl_methods_bring_the_stages_they_start_from():
    assert stages_for(("ppo",)) == ["sft", "rm", "ppo"]
    assert stages_for(("dpo", "grpo")) == ["dpo", "sft", "grpo"]


def test_a_quarter_of_the_warm_start_answers_are_lowercased():
    records = quarter_lowercased([f"q{i}" for i in range(8)], ["Yes."] * 7 + [""])
    assert len(records) == 7  # an empty answer is not a demonstration
    assert sum(r["output"] == "yes." for r in records) in (1, 2)


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


def test_each_stage_yaml_names_where_it_starts_and_the_trained_model_is_its_adapters(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import yaml

    from tunesmith.demos import real_align

    ran = []
    monkeypatch.setattr(real_align, "run_training", lambda config, say: ran.append(config.stage))
    monkeypatch.setattr(real_align, "load_config",
                        lambda path: SimpleNamespace(stage=yaml.safe_load(Path(path).read_text())["stage"]))
    assert real_align.train_stage("dpo", tmp_path, "model.gguf", print) == [str(tmp_path / "dpo")]
    assert real_align.train_stage("ppo", tmp_path, "model.gguf", print) == [str(tmp_path / "sft"), str(tmp_path / "ppo")]
    written = yaml.safe_load((tmp_path / "ppo.yaml").read_text())
    assert written["reward_model"] == str(tmp_path / "rm") and written["model_name_or_path"] == "model.gguf"
    assert ran == ["dpo", "ppo"]
