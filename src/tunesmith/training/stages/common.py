"""What every stage shares: the backbone forward, per-sequence log-probs, and the train/eval split."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX, chunked_logprobs, shift_labels
from tunesmith.config import TrainConfig
from tunesmith.data.dataset import split_train_eval


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] of a right-padded or packed batch.

    Packed rows carry position_ids and no attention_mask, which is how transformers recognises them and
    keeps attention inside each sample. Right-padded rows need no mask either: under causal attention a
    real token only sees earlier positions, and every pad comes after the row's real tokens. Leaving the
    mask out lets sdpa take its causal fast path; pad positions' outputs are garbage, but never read.
    """
    output = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
    return output.last_hidden_state


def sequence_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each row's labelled tokens [rows], number of those tokens [rows])."""
    token_logps = chunked_logprobs(backbone_hidden(model, batch), model.get_output_embeddings(), batch["labels"], chunk_size)
    lengths = (shift_labels(batch["labels"]) != IGNORE_INDEX).sum(1)
    return token_logps.sum(1), lengths


def train_and_eval_rows(encode: Callable[[list[str]], list], config: TrainConfig) -> tuple[list, list]:
    """Training rows, and eval rows from eval_dataset or a seeded val_size split (none without either)."""
    examples = encode(config.dataset)
    if config.eval_dataset:
        return examples, encode(config.eval_dataset)
    if config.val_size > 0:
        return split_train_eval(examples, config.val_size, config.seed)
    return examples, []


def device_multiple(device: torch.device) -> int:
    """Pad lengths to a multiple of 64 on a GPU (few distinct shapes, aligned matmuls), not at all on a CPU."""
    return 64 if device.type == "cuda" else 1
