"""Encode conversations into `input_ids` and `labels`, with IGNORE_INDEX on tokens that carry no loss.

SFT loss is next-token cross-entropy on assistant tokens only: labels = input_ids on every response
(assistant content + end-of-turn marker) and IGNORE_INDEX on prompts (unless `train_on_prompt`).
With `mask_history` only the last assistant turn is trained.

Truncation to `cutoff_len` follows LLaMA-Factory's `infer_seqlen`: turns are taken in order (the last
turn first with `mask_history`), each gets the budget left, split between prompt and response so that
the response is kept preferentially; turns that no longer fit are dropped.

Tokenizing a text costs time and memory in proportion to its length, so a 50 MB message would cost
gigabytes to keep cutoff_len tokens of it. The dataset entry points first cut every text to
`text_char_limit(tokenizer, cutoff_len)` characters (`clip_messages`), a bound no text of a record that
fits in cutoff_len tokens can reach, so those records encode exactly as before (see `text_char_limit`).

Usage: `encode_sft(messages, template, tokenizer, cutoff_len=1024)` -> {"input_ids", "labels"}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunesmith.data.templates import ChatTemplate

IGNORE_INDEX = -100
TOKEN_CHAR_SLACK = 4
"""How many characters of input one vocabulary character may stand for. Normalizers such as NFC compose
up to three code points into one (Hangul jamo into a syllable); 4 leaves a margin on top."""


def text_char_limit(tokenizer: PreTrainedTokenizerBase, cutoff_len: int) -> int:
    """Characters beyond which a text cannot belong to a record that fits in `cutoff_len` tokens.

    A token stands for at most as many characters as its vocabulary entry has (byte-level BPE spells one
    byte per character, SentencePiece one character per character, byte fallback `<0xNN>` six per byte),
    times TOKEN_CHAR_SLACK for normalization. A text longer than cutoff_len such tokens is therefore longer
    than cutoff_len tokens, and the record is truncated anyway; cutting it at this bound changes nothing
    that fits. A record that does not fit may keep other tokens than it would untruncated: when prompt
    and response are both long, infer_seqlen shares the budget by their lengths, measured after the cut.
    Left out on purpose: tokenizers that drop characters (BERT's whitespace splitting) break the bound,
    and no chat model's tokenizer does that.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return cutoff_len * TOKEN_CHAR_SLACK * longest


def clip_messages(messages: list, limit: int) -> list:
    """The messages with every content cut to `limit` characters; the same list when none is longer."""
    if all(len(message["content"]) <= limit for message in messages):
        return messages
    return [{**message, "content": message["content"][:limit]} for message in messages]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Kept (source, target) lengths for a prompt/response pair in a budget of `cutoff_len` tokens."""
    if target_len * 2 < cutoff_len:  # short response: keep it whole, cut the prompt
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # short prompt: keep it whole, cut the response
        max_target_len = cutoff_len - source_len
    else:  # both long: share the budget in proportion to their lengths
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def encode_sft(
    messages: list,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict:
    """input_ids and labels of one conversation (system?, user, assistant, ..., assistant)."""
    turns = template.encode_turns(tokenizer, messages)
    if mask_history:
        turns = turns[::-1]  # the last turn is the one trained, so it gets the budget first
    input_ids, labels = [], []
    for turn_index, (prompt_ids, response_ids) in enumerate(turns):
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            break
        source_len, target_len = infer_seqlen(len(prompt_ids), len(response_ids), budget)
        prompt_ids, response_ids = prompt_ids[:source_len], response_ids[:target_len]
        prompt_labels = prompt_ids if train_on_prompt else [IGNORE_INDEX] * source_len
        response_labels = [IGNORE_INDEX] * target_len if mask_history and turn_index > 0 else response_ids
        if mask_history:  # turns are reversed: prepend
            input_ids = prompt_ids + response_ids + input_ids
            labels = prompt_labels + response_labels + labels
        else:
            input_ids = input_ids + prompt_ids + response_ids
            labels = labels + prompt_labels + response_labels
    return {"input_ids": input_ids, "labels": labels}


def encode_pair(
    prompt_messages: list,
    chosen: str,
    rejected: str,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
) -> dict:
    """chosen/rejected input_ids and labels sharing one prompt, both truncated to the same lengths.

    The prompt (all turns up to the last user message) is masked; each answer is trained. Like
    LLaMA-Factory, the budget is split using the longer of the two answers, so both keep the same
    prompt tokens.
    """
    chosen_turns = template.encode_turns(
        tokenizer, prompt_messages + [{"role": "assistant", "content": chosen}]
    )
    rejected_turns = template.encode_turns(
        tokenizer, prompt_messages + [{"role": "assistant", "content": rejected}]
    )
    prompt_ids = [t for prompt, response in chosen_turns[:-1] for t in prompt + response] + chosen_turns[-1][
        0
    ]
    chosen_ids, rejected_ids = chosen_turns[-1][1], rejected_turns[-1][1]
    source_len, target_len = infer_seqlen(
        len(prompt_ids), max(len(chosen_ids), len(rejected_ids)), cutoff_len
    )
    prompt_ids = prompt_ids[:source_len]
    chosen_ids, rejected_ids = chosen_ids[:target_len], rejected_ids[:target_len]
    return {
        "chosen_input_ids": prompt_ids + chosen_ids,
        "chosen_labels": [IGNORE_INDEX] * source_len + chosen_ids,
        "rejected_input_ids": prompt_ids + rejected_ids,
        "rejected_labels": [IGNORE_INDEX] * source_len + rejected_ids,
    }
