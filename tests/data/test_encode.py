"""encode.py: labels token by token (prompt masked, response + end marker trained), truncation, pairs."""

import pytest

from tunesmith.data.encode import IGNORE_INDEX, encode_pair, encode_sft, infer_seqlen
from tunesmith.data.templates import get_template

MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello, how are you?"},
    {"role": "user", "content": "Give three tips."},
    {"role": "assistant", "content": "Eat well, exercise, sleep."},
]


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_alpaca_prompt_masked_response_and_end_marker_trained(tokenizer):
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    example = encode_sft(messages, get_template("chatml", tokenizer), tokenizer, cutoff_len=1024)
    prompt = ids(
        tokenizer, "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    response = ids(tokenizer, "Paris<|im_end|>\n")
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert im_end in trained and tokenizer.decode(trained) == "Paris<|im_end|>\n"


def _segments(tokenizer):
    turns = get_template("chatml", tokenizer).encode_turns(tokenizer, MULTI_TURN)
    (p0, r0), (p1, r1) = turns
    assert tokenizer.decode(p0).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    return p0, r0, p1, r1


def test_multi_turn_every_assistant_turn_trained(tokenizer):
    p0, r0, p1, r1 = _segments(tokenizer)
    example = encode_sft(MULTI_TURN, get_template("chatml", tokenizer), tokenizer, cutoff_len=1024)
    assert example["input_ids"] == p0 + r0 + p1 + r1
    assert example["labels"] == [IGNORE_INDEX] * len(p0) + r0 + [IGNORE_INDEX] * len(p1) + r1


def test_mask_history_trains_only_last_turn(tokenizer):
    p0, r0, p1, r1 = _segments(tokenizer)
    example = encode_sft(MULTI_TURN, get_template("chatml", tokenizer), tokenizer, 1024, mask_history=True)
    assert example["input_ids"] == p0 + r0 + p1 + r1
    assert example["labels"] == [IGNORE_INDEX] * (len(p0) + len(r0) + len(p1)) + r1


def test_train_on_prompt_trains_everything(tokenizer):
    example = encode_sft(MULTI_TURN, get_template("chatml", tokenizer), tokenizer, 1024, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize(
    "source, target, cutoff, expected",
    [
        (100, 10, 50, (40, 10)),  # short response kept whole, prompt cut
        (10, 100, 50, (10, 40)),  # short prompt kept whole, response cut
        (60, 40, 50, (30, 20)),  # both long: 50 * 40/100 = 20 for the response
        (3, 4, 50, (3, 4)),  # fits: untouched
    ],
)
def test_infer_seqlen_hand_cases(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected


def test_cutoff_keeps_the_response(tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    messages = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Paris"}]
    response = ids(tokenizer, "Paris<|im_end|>\n")
    example = encode_sft(messages, get_template("chatml", tokenizer), tokenizer, cutoff_len=32)
    assert len(example["input_ids"]) == 32
    assert example["input_ids"][-len(response) :] == response
    assert [t for t in example["labels"] if t != IGNORE_INDEX] == response


def test_cutoff_drops_later_turns(tokenizer):
    p0, r0, _, _ = _segments(tokenizer)
    cutoff = len(p0) + len(r0)
    example = encode_sft(MULTI_TURN, get_template("chatml", tokenizer), tokenizer, cutoff_len=cutoff)
    assert example["input_ids"] == p0 + r0
    # with mask_history the last turn gets the budget first instead
    example = encode_sft(MULTI_TURN, get_template("chatml", tokenizer), tokenizer, cutoff, mask_history=True)
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]).startswith("Eat well")


def test_encode_pair_shares_prompt_and_truncates_both_sides(tokenizer):
    template = get_template("chatml", tokenizer)
    prompt_messages = MULTI_TURN[:4]
    pair = encode_pair(
        prompt_messages, "Sleep well.", "The quick brown fox jumps.", template, tokenizer, 1024
    )
    prompt = template.encode_prompt(tokenizer, prompt_messages)
    for side, answer in (("chosen", "Sleep well."), ("rejected", "The quick brown fox jumps.")):
        answer_ids = ids(tokenizer, answer + "<|im_end|>\n")
        assert pair[f"{side}_input_ids"] == prompt + answer_ids
        assert pair[f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + answer_ids
    short = encode_pair(prompt_messages, "Sleep well.", "The quick brown fox jumps.", template, tokenizer, 24)
    assert len(short["rejected_input_ids"]) == 24
    n_prompt = sum(t == IGNORE_INDEX for t in short["chosen_labels"])
    assert short["chosen_input_ids"][:n_prompt] == short["rejected_input_ids"][:n_prompt] == prompt[:n_prompt]
    assert n_prompt == sum(t == IGNORE_INDEX for t in short["rejected_labels"])
