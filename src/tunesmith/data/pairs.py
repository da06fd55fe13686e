"""Preference pairs as training rows, and batches that run chosen and rejected in one forward pass.

A row holds chosen_input_ids/labels and rejected_input_ids/labels sharing one prompt (see
`encode_pair`). A batch of B pairs becomes one packed row: the B chosen sequences, then the B rejected ones, back to
back with no padding (`pack_into_row`; attention stays within each sequence). One forward over both
is what TRL calls the concatenated forward: the weights are read once for chosen and rejected.

Usage:
    rows = build_pair_examples(["dpo_en_demo"], "data", tokenizer, template=None, cutoff_len=1024)
    batch = collate_pairs(rows[:4], tokenizer.pad_token_id)
"""

from __future__ import annotations

import warnings

import torch

from tunesmith.data.dataset import load_preference_examples
from tunesmith.data.encode import IGNORE_INDEX, encode_pair
from tunesmith.data.packing import pack_into_row
from tunesmith.data.templates import get_template

REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def build_pair_examples(dataset, dataset_dir, tokenizer, template, cutoff_len: int, max_samples=None,
                        skip_bad_records: bool = False) -> list[dict]:
    """Load ranking datasets and encode every pair; pairs left without a response token are dropped."""
    chat_template = get_template(template, tokenizer)
    pairs = load_preference_examples(dataset, dataset_dir, max_samples, skip_bad_records)
    rows = [encode_pair(p.prompt_messages, p.chosen, p.rejected, chat_template, tokenizer, cutoff_len) for p in pairs]
    kept = [row for row in rows if _has_response(row["chosen_labels"]) and _has_response(row["rejected_labels"])]
    if len(kept) < len(rows):
        warnings.warn(f"dropped {len(rows) - len(kept)} pair(s) with no answer token left after cutoff_len={cutoff_len}",
                      stacklevel=2)
    return kept


def _has_response(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted


def collate_pairs(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """The batch's chosen then rejected sequences packed into one row (see `pack_into_row`), with
    num_pairs, the rows themselves (so a stage can remember per-pair results in them) and, when every
    row carries them, the cached reference log-probs [pairs]."""
    sequences = [(row["chosen_input_ids"], row["chosen_labels"]) for row in rows]
    sequences += [(row["rejected_input_ids"], row["rejected_labels"]) for row in rows]
    batch = {**pack_into_row(sequences, pad_token_id, pad_to_multiple_of), "num_pairs": len(rows), "rows": rows}
    if all(key in rows[0] for key in REFERENCE_KEYS):
        for key in REFERENCE_KEYS:
            batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32)
    return batch
