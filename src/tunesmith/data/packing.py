"""Pack encoded samples into rows of at most `cutoff_len` tokens, and collate rows into padded batches.

Packing is a greedy knapsack (as in LLaMA-Factory): lengths sorted, each row filled by repeatedly taking
the longest remaining sample that still fits. `position_ids` restart at 0 for every sample; given
position_ids and no attention_mask, transformers (>= 4.56, `masking_utils.find_packed_sequence_indices`)
builds a block-diagonal causal mask, so a token attends only to its own sample. The model must be called
with `use_cache=False`: with a cache the packed-sequence detection is skipped and samples see each other.

The first label of every packed sample is IGNORE_INDEX: the shifted loss would otherwise ask the last
token of one sample to predict the first token of the next (an unpacked sample never trains its first token).

Usage: `rows = pack_examples(examples, cutoff_len)`; `batch = collate(rows[:8], tokenizer.pad_token_id)`.
"""

import bisect

import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import TunesmithError


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


def collate(batch: list, pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a batch to its own longest row (rounded up to `pad_to_multiple_of`); tensors [batch, seq].

    On a GPU a multiple of 64 keeps the number of distinct shapes (and kernel selections) small and the
    matmuls tensor-core aligned; on a CPU every pad token is wasted work, so the default is 1.
    Unpacked rows get an attention_mask. Packed rows (with position_ids) get none: the pad tail is given
    its own position run 0, 1, ... so the model treats it as one more sample, and its labels are ignored.
    """
    longest = max(len(row["input_ids"]) for row in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in batch[0]
    input_ids, labels, extra = [], [], []
    for row in batch:
        pad = longest - len(row["input_ids"])
        input_ids.append(row["input_ids"] + [pad_token_id] * pad)
        labels.append(row["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            extra.append(row["position_ids"] + list(range(pad)))
        else:
            extra.append([1] * len(row["input_ids"]) + [0] * pad)
    return {
        "num_tokens": sum(len(row["input_ids"]) for row in batch),  # non-pad tokens, for throughput
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        ("position_ids" if packed else "attention_mask"): torch.tensor(extra, dtype=torch.long),
    }
