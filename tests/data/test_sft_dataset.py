"""dataset.py: the reference files load; build_sft_examples end to end; split before packing."""

import pytest

from tunesmith.data.dataset import (
    build_sft_examples,
    encode_sft_examples,
    load_conversations,
    load_preference_examples,
    split_train_eval,
)
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.formats import PreferenceExample
from tunesmith.data.packing import pack_examples
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError


def test_reference_alpaca_demo_loads(reference_dir):
    conversations = load_conversations(["alpaca_en_demo"], reference_dir)
    assert len(conversations) == 999
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)
    assert conversations[0][0]["content"] == "Describe a process of making crepes."


def test_reference_dpo_demo_loads_as_preferences(reference_dir):
    examples = load_preference_examples(["dpo_en_demo"], reference_dir)
    assert len(examples) == 300
    assert all(isinstance(e, PreferenceExample) and e.prompt_messages[-1]["role"] == "user" for e in examples)
    assert examples[0].chosen.startswith("That sounds like a fun and engaging idea!")


def test_reference_sft_rows(reference_dir, tokenizer):
    rows = build_sft_examples(
        ["alpaca_en_demo"],
        reference_dir,
        tokenizer,
        "chatml",
        cutoff_len=256,
        train_on_prompt=False,
        mask_history=False,
        max_samples=40,
        packing=True,
    )
    assert sum(len(r["input_ids"]) for r in rows) > 0 and all(len(r["input_ids"]) <= 256 for r in rows)


RECORDS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(10)]


def test_build_unpacked_and_packed(tmp_path, write_dataset, tokenizer):
    write_dataset(tmp_path, "qa", RECORDS, {})
    args = dict(cutoff_len=128, train_on_prompt=False, mask_history=False, max_samples=None)
    examples = build_sft_examples(["qa"], tmp_path, tokenizer, None, packing=False, **args)
    assert len(examples) == 10 and set(examples[0]) == {"input_ids", "labels"}
    assert (
        tokenizer.decode([t for t in examples[3]["labels"] if t != IGNORE_INDEX]) == "Answer 3.<|im_end|>\n"
    )
    rows = build_sft_examples(["qa"], tmp_path, tokenizer, None, packing=True, **args)
    assert len(rows) < 10 and all("position_ids" in r for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)


def test_max_samples_per_dataset_and_plain_path(tmp_path, write_dataset):
    write_dataset(tmp_path, "qa", RECORDS, {})
    other = write_dataset(tmp_path, "other", RECORDS[:4])
    assert len(load_conversations(["qa", str(other)], tmp_path, max_samples=3)) == 6


def test_split_then_pack(tmp_path, write_dataset, tokenizer):
    write_dataset(tmp_path, "qa", RECORDS, {})
    conversations = load_conversations("qa", tmp_path)
    examples = encode_sft_examples(conversations, get_template("chatml", tokenizer), tokenizer, 64)
    train, evaluation = split_train_eval(examples, val_size=0.2, seed=7)
    assert (len(train), len(evaluation)) == (8, 2)
    assert sorted(map(str, train + evaluation)) == sorted(map(str, examples))
    assert split_train_eval(examples, 0.2, seed=7) == (train, evaluation)  # seeded
    assert len(split_train_eval(examples, 3, seed=7)[1]) == 3
    assert all(len(r["input_ids"]) <= 64 for r in pack_examples(train, 64))


@pytest.mark.parametrize("val_size", [0, 0.01, 10, 12])
def test_split_rejects_empty_sides(val_size):
    with pytest.raises(TunesmithError, match=f"val_size={val_size}"):
        split_train_eval([{"input_ids": [1]}] * 10, val_size, seed=0)


def test_empty_dataset_is_an_error(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "empty", [])
    with pytest.raises(TunesmithError, match="holds no usable record"):
        load_conversations([str(path)], tmp_path)
