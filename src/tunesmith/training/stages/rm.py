"""Reward-model training: a scalar head on the last hidden state, trained so chosen answers outscore rejected.

The score of a sequence is the value head's output at its last real (non-pad) token: the only position
that has read the whole prompt and answer. The language-model head is never used, so a step costs the
backbone alone. Loss and metrics are in `tunesmith.algorithms.reward`.
"""

from __future__ import annotations

from functools import partial

import torch

from tunesmith.algorithms.reward import pairwise_loss, pairwise_metrics
from tunesmith.config import TrainConfig
from tunesmith.data.pairs import build_pair_examples, collate_pairs
from tunesmith.model.value_head import attach_value_head
from tunesmith.training.loop import RunData, Stage
from tunesmith.training.stages.common import (
    backbone_hidden,
    device_multiple,
    last_token_positions,
    train_and_eval_rows,
)


def sequence_scores(model, batch: dict, head=None) -> torch.Tensor:
    """[sequences] value-head score (model.v_head unless `head` is given) at each sequence's last token."""
    hidden = backbone_hidden(model, batch)
    return (head or model.v_head)(hidden.reshape(-1, hidden.shape[-1])[last_token_positions(batch)])


def rm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed pairwise loss over the batch's pairs (the loop divides by the pair count)."""
    chosen, rejected = sequence_scores(model, batch).chunk(2)
    return pairwise_loss(chosen, rejected).sum(), pairwise_metrics(chosen, rejected)


def count_pairs(batch: dict) -> int:
    return batch["num_pairs"]


def count_tokens(batch: dict) -> int:
    return batch["num_tokens"]


def build_pair_data(config: TrainConfig, tokenizer, device: torch.device) -> RunData:
    """Encoded preference pairs split into train/eval; a batch is one packed row (`collate_pairs`)."""
    encode = partial(build_pair_examples, dataset_dir=config.dataset_dir, tokenizer=tokenizer,
                     template=config.template, cutoff_len=config.cutoff_len, max_samples=config.max_samples,
                     skip_bad_records=config.skip_bad_records)
    train, evaluation = train_and_eval_rows(encode, config)
    batcher = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=device_multiple(device))
    return RunData(train=train, eval=evaluation, collate=batcher)


def build_rm(config: TrainConfig, tokenizer, device: torch.device):
    """Pair data, and a function that attaches a fresh value head to the loaded model and gives the stage."""
    def make_stage(model, data: RunData) -> Stage:
        attach_value_head(model)
        return Stage(loss=rm_loss, count_items=count_pairs, count_tokens=count_tokens)

    return build_pair_data(config, tokenizer, device), make_stage
