"""Pack encoded samples into rows of at most `cutoff_len` tokens, and collate rows into padded batches.

Packing is a greedy knapsack (as in LLaMA-Factory): lengths sorted, each row filled by repeatedly taking
the longest remaining sample that still fits. `position_ids` restart at 0 for every sample; given
position_ids and no attention_mask, transformers (>= 4.56, `masking_utils.find_packed_sequence_indices`)
builds a block-diagonal causal mask, so a token attends only to its own sample. The model must be called
with `use_cache=False`: with a cache the packed-sequence detection is skipped and samples see each other.

The first label of every packed sample is IGNORE_INDEX: the shifted loss would otherwise ask the last
token of one sample to predict the first token of the next (an unpacked sample never trains its first token).

Usage: `rows = pack_examples(examples, cutoff_len)`; `batch = collate(rows[:8], tokenizer.pad_token_id)`.
A batch of packed rows is laid out as a single row with `cu_seqlens`, so attention costs what the
samples cost (see `pack_into_row`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import TunesmithError

T = TypeVar("T")


@dataclass
class TokenBatch:
    """Token tensors for one forward: right-padded rows [B, T], or samples laid end to end in one row [1, T]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_tokens: int
    """Non-pad tokens, for throughput."""
    position_ids: torch.Tensor | None = None
    """Packed rows: positions restarting at 0 for each sample."""
    cu_seqlens: list[int] | None = None
    """Packed rows: where each sample starts, plus the end (attention runs per sample)."""
    num_sequences: int | None = None
    """Packed rows: how many samples the row holds (a pad tail is one more, unread, segment)."""
    attention_mask: torch.Tensor | None = None
    """Padded rows: 1 on real tokens."""

    def to(self, device: torch.device) -> TokenBatch:
        """The batch with its tensors on `device`."""
        return tensors_to(self, device)


def tensors_to(batch: T, device: torch.device) -> T:
    """A copy of a batch dataclass with every tensor field on `device` (the other fields as they are)."""
    return replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


def _knapsack(lengths: list, capacity: int) -> list:
    """Groups of sample indices whose lengths sum to at most `capacity` (greedy, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    groups = []
    while order:
        group, room = [], capacity
        while True:
            position = bisect.bisect_right(sorted_lengths, room) - 1  # longest sample that fits
            if position < 0:
                break
            room -= sorted_lengths.pop(position)
            group.append(order.pop(position))
        groups.append(group)
    return groups


def pack_examples(examples: list, cutoff_len: int) -> list:
    """Rows {input_ids, labels, position_ids} holding whole samples, each row <= cutoff_len tokens."""
    lengths = [len(example["input_ids"]) for example in examples]
    too_long = [i for i, n in enumerate(lengths) if n > cutoff_len or n == 0]
    if too_long:
        raise TunesmithError(
            f"cannot pack sample {too_long[0]} of length {lengths[too_long[0]]} into rows of {cutoff_len} tokens: "
            "encode with the same cutoff_len used for packing, and drop empty samples."
        )
    rows = []
    for group in _knapsack(lengths, cutoff_len):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for index in group:
            row["input_ids"] += examples[index]["input_ids"]
            row["labels"] += [IGNORE_INDEX] + examples[index]["labels"][1:]
            row["position_ids"] += list(range(lengths[index]))
        rows.append(row)
    return rows


def pack_into_row(sequences: list[tuple[list[int], list[int]]], pad_token_id: int,
                  pad_to_multiple_of: int = 1) -> TokenBatch:
    """Every (input_ids, labels) sequence back to back in one row [1, T]: no padding, nothing wasted.

    position_ids restart at 0 for each sequence and `cu_seqlens` lists where each starts (plus the end),
    which lets attention run per sequence (model/attention.py). Each sequence's first label is ignored, so
    no sequence's last token is trained to predict the next one's first. A pad tail up to
    `pad_to_multiple_of` is one more, unlabelled, segment.
    """
    input_ids, labels, positions, cu_seqlens = [], [], [], [0]
    for ids, row_labels in sequences:
        input_ids += ids
        labels += [IGNORE_INDEX] + row_labels[1:]
        positions += range(len(ids))
        cu_seqlens.append(len(input_ids))
    pad = -len(input_ids) % pad_to_multiple_of
    if pad:
        input_ids += [pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
        cu_seqlens.append(len(input_ids))
    return TokenBatch(input_ids=torch.tensor([input_ids], dtype=torch.long),
                      labels=torch.tensor([labels], dtype=torch.long), num_tokens=cu_seqlens[len(sequences)],
                      position_ids=torch.tensor([positions], dtype=torch.long), cu_seqlens=cu_seqlens,
                      num_sequences=len(sequences))


def collate(batch: list, pad_token_id: int, pad_to_multiple_of: int = 1, one_row: bool = False) -> TokenBatch:
    """Tensors for a list of rows: unpacked rows right-padded to the longest, packed rows as one row.

    Unpacked rows get an attention_mask and are padded to their own longest row (rounded up to
    `pad_to_multiple_of`: on a GPU a multiple of 64 keeps the number of distinct shapes small and the
    matmuls tensor-core aligned). On a CPU every pad token is wasted work: `one_row` lays the samples
    end to end instead, with attention per sample, which computes exactly what the padded batch does.
    Packed rows (with position_ids) are always laid end to end in a single row (`pack_into_row`),
    split back into their samples at each position 0.
    """
    if "position_ids" in batch[0]:
        samples = []
        for row in batch:
            starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
            samples += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts[:-1], starts[1:])]
        return pack_into_row(samples, pad_token_id, pad_to_multiple_of)
    if one_row:
        return pack_into_row([(row["input_ids"], row["labels"]) for row in batch], pad_token_id, pad_to_multiple_of)
    longest = max(len(row["input_ids"]) for row in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, labels, mask = [], [], []
    for row in batch:
        pad = longest - len(row["input_ids"])
        input_ids.append(row["input_ids"] + [pad_token_id] * pad)
        labels.append(row["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(row["input_ids"]) + [0] * pad)
    return TokenBatch(input_ids=torch.tensor(input_ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                      num_tokens=sum(len(row["input_ids"]) for row in batch),
                      attention_mask=torch.tensor(mask, dtype=torch.long))


@dataclass
class AnswerRow:
    """Sampled answers and their prompts as one packed row for a forward that scores the answers' tokens."""

    input_ids: torch.Tensor
    """[1, T] each prompt, then the answers to it."""
    position_ids: torch.Tensor
    """[1, T] each token's position within its own prompt + answer."""
    cu_seqlens: list[int]
    """Segment boundaries: attention runs per segment."""
    segment_prefixes: list[tuple[int, int] | None]
    """Per segment, the earlier prompt it also attends to (an answer after the first to the same prompt)."""
    predict_positions: torch.Tensor
    """[answer tokens] flat position whose next-token prediction is each answer token, answer by answer."""
    targets: torch.Tensor
    """[answer tokens] the answer tokens, in the same order."""

    def to(self, device: torch.device) -> AnswerRow:
        """The row with its tensors on `device`."""
        return tensors_to(self, device)


def pack_answers(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int,
                 pad_to_multiple_of: int = 1, share_prompts: bool = True) -> AnswerRow:
    """Answer i to prompt i, every one laid out back to back in one row, each answer's tokens scored.

    A GRPO group's answers have one prompt: with `share_prompts`, the row holds each distinct prompt once,
    wherever its answers stand (the update shuffles them). The first answer to a prompt follows it as
    usual; each later one attends to it through `segment_prefixes` (model/attention.py) with positions
    continuing from the prompt's end, so every answer sees exactly what it would see alone, and the
    prompt's last position predicts each answer's first token. 4 answers of 64 tokens to a 63-token
    prompt: 319 tokens, not 508. An empty answer has nothing to score and takes no place in the row.
    """
    ids: list[int] = []
    positions: list[int] = []
    bounds, prefixes, predict = [0], [], []
    spans: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt -> where it stands in the row
    for prompt, answer in zip(prompt_ids, response_ids):
        if not prompt:
            raise TunesmithError("an RL prompt encoded to no tokens, so nothing predicts its answer's first "
                                 "token: check the dataset's prompts and the template.")
        if not answer:
            continue
        start, key = len(ids), tuple(prompt)
        span = spans.get(key) if share_prompts else None
        if span is not None:
            ids += answer
            positions += range(len(prompt), len(prompt) + len(answer))
            predict += [span[1] - 1, *range(start, start + len(answer) - 1)]
        else:
            ids += prompt + answer
            positions += range(len(prompt) + len(answer))
            predict += range(start + len(prompt) - 1, start + len(prompt) + len(answer) - 1)
            spans[key] = (start, start + len(prompt))
        prefixes.append(span)
        bounds.append(len(ids))
    pad = -len(ids) % pad_to_multiple_of
    if pad:  # one more, unread, segment
        ids += [pad_token_id] * pad
        positions += range(pad)
        bounds.append(len(ids))
        prefixes.append(None)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return AnswerRow(input_ids=as_tensor([ids]), position_ids=as_tensor([positions]), cu_seqlens=bounds,
                     segment_prefixes=prefixes, predict_positions=as_tensor(predict),
                     targets=as_tensor([token for answer in response_ids for token in answer]))
