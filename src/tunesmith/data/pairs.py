"""Preference pairs as training rows, and batches that run chosen and rejected in one forward pass.

A row holds chosen_input_ids/labels and rejected_input_ids/labels sharing one prompt (see
`encode_pair`). A batch of B pairs becomes one packed row (no padding on a CPU), each pair's prompt computed once for both
answers (`collate_pairs`). One forward over chosen and rejected is what TRL calls the concatenated
forward: the weights are read once for both.

Usage:
    rows = build_pair_examples(["dpo_en_demo"], "data", tokenizer, template=None, cutoff_len=1024)
    batch = collate_pairs(rows[:4], tokenizer.pad_token_id)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunesmith.data.dataset import load_kto_examples, load_preference_examples, warn_clipped
from tunesmith.data.encode import IGNORE_INDEX, clip_messages, encode_pair, text_char_limit
from tunesmith.data.formats import PreferenceExample
from tunesmith.data.packing import tensors_to
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PairBatch:
    """B preference pairs as one packed row: chosen sequences are 0..B-1, rejected B..2B-1 (`collate_pairs`)."""

    rows: list[dict]
    """The pairs' encoded rows (read-only: a stage that remembers per-pair results keeps its own cache)."""
    input_ids: torch.Tensor
    """[1, T] every pair's prompt, chosen answer and rejected answer back to back."""
    position_ids: torch.Tensor
    """[1, T] each token's position within its own sequence."""
    cu_seqlens: list[int]
    """Segment boundaries: attention runs per segment."""
    segment_prefixes: list[tuple[int, int] | None]
    """Per segment, an earlier span it also attends to (a rejected answer reads its pair's prompt)."""
    predict_positions: torch.Tensor
    """[answer tokens] flat positions whose next-token prediction is scored ..."""
    predict_targets: torch.Tensor
    """[answer tokens] ... the tokens they should predict ..."""
    predict_owners: torch.Tensor
    """[answer tokens] ... and the sequence each belongs to."""
    last_positions: torch.Tensor
    """[2B] flat position of each sequence's last token (where a reward model reads its score)."""
    num_pairs: int
    num_sequences: int
    num_tokens: int
    """Both sequences of every pair counted in full: the work the pairs stand for."""

    def to(self, device: torch.device) -> PairBatch:
        """The batch with its tensors on `device`."""
        return tensors_to(self, device)


def build_pair_examples(dataset: str | list[str], dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                        template: str | None, cutoff_len: int, max_samples: int | None = None,
                        skip_bad_records: bool = False) -> list[dict]:
    """Load ranking datasets and encode every pair (over-long texts cut first, see `clip_messages`); pairs
    left without a response token are dropped."""
    loaded = load_preference_examples(dataset, dataset_dir, max_samples, skip_bad_records)
    return encode_pairs(loaded, get_template(template, tokenizer), tokenizer, cutoff_len)


def encode_pairs(pairs: list[PreferenceExample], chat_template, tokenizer: PreTrainedTokenizerBase, cutoff_len: int,
                 extras: list[dict] | None = None, what: str = "pair(s)") -> list[dict]:
    """Encode every pair (over-long texts cut first, with a warning), each row updated with its `extras`
    entry; rows left without a response token on either side are dropped, with a warning."""
    limit = text_char_limit(tokenizer, cutoff_len)
    clipped = [_clipped(pair, limit) for pair in pairs]
    warn_clipped(sum(new is not old for new, old in zip(clipped, pairs)), limit, cutoff_len)
    rows = [encode_pair(p.prompt_messages, p.chosen, p.rejected, chat_template, tokenizer, cutoff_len) for p in clipped]
    rows = [{**row, **extra} for row, extra in zip(rows, extras)] if extras is not None else rows
    kept = [row for row in rows if _has_response(row["chosen_labels"]) and _has_response(row["rejected_labels"])]
    if len(kept) < len(rows):
        warnings.warn(f"dropped {len(rows) - len(kept)} {what} with no answer token left after cutoff_len={cutoff_len}",
                      stacklevel=3)
    return kept


def build_kto_examples(dataset: str | list[str], dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                       template: str | None, cutoff_len: int, max_samples: int | None = None,
                       skip_bad_records: bool = False) -> list[dict]:
    """KTO rows as pairs: "chosen" is the record's own answer, "rejected" another record's answer to this
    prompt (the mismatched pair of KTO's reference point, fixed once as TRL does), `kto_desirable` its label."""
    loaded = load_kto_examples(dataset, dataset_dir, max_samples, skip_bad_records)
    if len(loaded) < 2:
        raise TunesmithError(f"stage kto needs at least 2 records (each prompt is also paired with another record's "
                             f"answer to estimate the KL term); {', '.join([dataset] if isinstance(dataset, str) else dataset)} "
                             f"has {len(loaded)}.")
    pairs = [PreferenceExample(example.prompt_messages, example.completion, loaded[mismatched_index(loaded, i)].completion)
             for i, example in enumerate(loaded)]
    return encode_pairs(pairs, get_template(template, tokenizer), tokenizer, cutoff_len,
                        [{"kto_desirable": example.desirable} for example in loaded], "KTO record(s)")


def mismatched_index(examples: list, index: int) -> int:
    """The record whose answer pairs with record `index`'s prompt: half the dataset away, moving on past
    records with the same prompt (pairs made unpaired sit side by side, and the same prompt's other answer
    is no mismatch); the next record when every prompt is the same."""
    count = len(examples)
    for offset in range(count // 2, count // 2 + count):
        other = (index + max(offset, 1)) % count
        if other != index and examples[other].prompt_messages != examples[index].prompt_messages:
            return other
    return (index + 1) % count


def _clipped(pair: PreferenceExample, limit: int) -> PreferenceExample:
    """The pair with every text cut to `limit` characters; the same object when none is longer."""
    prompt = clip_messages(pair.prompt_messages, limit)
    if prompt is pair.prompt_messages and len(pair.chosen) <= limit and len(pair.rejected) <= limit:
        return pair
    return PreferenceExample(prompt, pair.chosen[:limit], pair.rejected[:limit])


def _has_response(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted


def shared_prefix_length(row: dict) -> int:
    """Tokens chosen and rejected share before either carries a label: the prompt, computed once."""
    limit = min(_first_label(row["chosen_labels"]), _first_label(row["rejected_labels"]))
    shared = 0
    for a, b in zip(row["chosen_input_ids"][:limit], row["rejected_input_ids"][:limit]):
        if a != b:
            break
        shared += 1
    return shared


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _flat_index(j: int, base: int, shared: int, answer_start: int) -> int:
    """Where token j of a pair's sequence sits in the packed row: in the shared prompt, or in its answer."""
    return base + j if j < shared else answer_start + j - shared


def collate_pairs(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> PairBatch:
    """B pairs as one packed row: for each pair its prompt, chosen answer and rejected answer back to back.

    The prompt is run once: the chosen answer follows it as usual, and the rejected answer attends to it
    through `segment_prefixes` (model/attention.py), with positions continuing from the prompt's end, so
    each answer sees exactly what it would see alone. Sequences are numbered chosen 0..B-1, rejected
    B..2B-1. Because the prompt's last position predicts both answers' first tokens, log-probs are
    gathered at explicit (position, target, sequence) triples instead of by shifting labels.
    num_tokens counts both sequences in full (the work the pair stands for).
    """
    pairs, packed = len(rows), _Packing()
    packed.last_positions = [0] * (2 * pairs)
    for i, row in enumerate(rows):
        base, shared = len(packed.input_ids), shared_prefix_length(row)
        chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
        packed.input_ids += chosen + rejected[shared:]
        packed.positions += list(range(len(chosen))) + list(range(shared, len(rejected)))
        packed.bounds += [base + len(chosen), len(packed.input_ids)]
        packed.prefixes += [None, (base, base + shared) if shared else None]

        for sequence, (ids, labels, answer_start) in enumerate(
                [(chosen, row["chosen_labels"], base + shared),
                 (rejected, row["rejected_labels"], base + len(chosen))]):
            owner = i + sequence * pairs
            for t in range(1, len(ids)):
                if labels[t] != IGNORE_INDEX:
                    packed.score(_flat_index(t - 1, base, shared, answer_start), labels[t], owner)
            packed.last_positions[owner] = _flat_index(len(ids) - 1, base, shared, answer_start)
    tokens = sum(len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) for row in rows)
    return packed.batch(rows, 2 * pairs, tokens, pad_token_id, pad_to_multiple_of)


def collate_side(rows: list[dict], side: str, pad_token_id: int, pad_to_multiple_of: int = 1) -> PairBatch:
    """One side ("chosen" or "rejected") of B pairs as one packed row, sequence i from row i, for a loss
    that needs the two sides in separate passes (KTO: its mismatched answers need no gradient)."""
    packed = _Packing()
    for i, row in enumerate(rows):
        base, ids, labels = len(packed.input_ids), row[f"{side}_input_ids"], row[f"{side}_labels"]
        packed.input_ids += ids
        packed.positions += range(len(ids))
        packed.bounds.append(len(packed.input_ids))
        packed.prefixes.append(None)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                packed.score(base + t - 1, labels[t], i)
        packed.last_positions.append(base + len(ids) - 1)
    tokens = sum(len(row[f"{side}_input_ids"]) for row in rows)
    return packed.batch(rows, len(rows), tokens, pad_token_id, pad_to_multiple_of)


@dataclass
class KTOBatch:
    """B KTO rows as two packed rows: their own answers, and the mismatched answers of the reference point,
    which need no gradient and so run in a pass of their own (`collate_kto`)."""

    answers: PairBatch
    mismatched: PairBatch

    @property
    def rows(self) -> list[dict]:
        return self.answers.rows

    @property
    def num_pairs(self) -> int:
        return self.answers.num_pairs

    @property
    def num_tokens(self) -> int:
        """Both answers of every row counted in full, as a pair batch counts them."""
        return self.answers.num_tokens + self.mismatched.num_tokens

    def to(self, device: torch.device) -> KTOBatch:
        return KTOBatch(self.answers.to(device), self.mismatched.to(device))


def collate_kto(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> KTOBatch:
    """KTO rows (`build_kto_examples`): "chosen" is each row's own answer, "rejected" its mismatched one."""
    return KTOBatch(*(collate_side(rows, side, pad_token_id, pad_to_multiple_of) for side in ("chosen", "rejected")))


@dataclass
class _Packing:
    """A packed row being built: its tokens and segments, and the (position, target, owner) triples scored."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    bounds: list[int] = field(default_factory=lambda: [0])
    prefixes: list[tuple[int, int] | None] = field(default_factory=list)
    predict_positions: list[int] = field(default_factory=list)
    predict_targets: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    last_positions: list[int] = field(default_factory=list)

    def score(self, position: int, target: int, owner: int) -> None:
        """Position `position`'s prediction of `target` counts towards sequence `owner`."""
        self.predict_positions.append(position)
        self.predict_targets.append(target)
        self.owners.append(owner)

    def batch(self, rows: list[dict], sequences: int, tokens: int, pad_token_id: int, multiple: int) -> PairBatch:
        """The finished PairBatch, padded to a multiple of `multiple` tokens by one more, unread, segment."""
        pad = -len(self.input_ids) % multiple
        if pad:
            self.input_ids += [pad_token_id] * pad
            self.positions += range(pad)
            self.bounds.append(len(self.input_ids))
            self.prefixes.append(None)
        as_tensor = partial(torch.tensor, dtype=torch.long)
        return PairBatch(
            rows=rows, input_ids=as_tensor([self.input_ids]), position_ids=as_tensor([self.positions]),
            cu_seqlens=self.bounds, segment_prefixes=self.prefixes,
            predict_positions=as_tensor(self.predict_positions), predict_targets=as_tensor(self.predict_targets),
            predict_owners=as_tensor(self.owners), last_positions=as_tensor(self.last_positions),
            num_pairs=len(rows), num_sequences=sequences, num_tokens=tokens)
