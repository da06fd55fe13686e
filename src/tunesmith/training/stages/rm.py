"""Reward-model training: a scalar head on the last hidden state, trained so chosen answers outscore rejected.

The score of a sequence is the value head's output at its last real (non-pad) token: the only position
that has read the whole prompt and answer. The language-model head is never used, so a step costs the
backbone alone. Loss and metrics are in `tunesmith.algorithms.reward`.
"""

from __future__ import annotations

import torch

from tunesmith.algorithms.reward import pairwise_loss, pairwise_metrics
from tunesmith.data.pairs import PairBatch
from tunesmith.model.forward import sequence_scores
from tunesmith.model.value_head import attach_value_head
from tunesmith.training.loop import Stage
from tunesmith.training.pairs import build_pair_data, pair_objective
from tunesmith.training.stages.spec import StageInputs, StageSpec
from tunesmith.training.supervised import supervised_stage


def rm_loss(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed pairwise loss over the batch's pairs (the loop divides by the pair count)."""
    chosen, rejected = sequence_scores(model, batch).chunk(2)
    return pairwise_loss(chosen, rejected).sum(), pairwise_metrics(chosen, rejected)


def build_rm(inputs: StageInputs) -> Stage:
    """A fresh value head on the loaded model, trained with the pairwise loss."""
    attach_value_head(inputs.model)
    optim = inputs.config.train
    return supervised_stage(pair_objective(rm_loss, inputs.tokenizer, inputs.device), optim.per_device_train_batch_size,
                            optim.gradient_accumulation_steps, optim.per_device_eval_batch_size)


STAGE = StageSpec(name="rm", build_data=build_pair_data, build=build_rm, saves_value_head=True,
                  plotted=("loss", "eval_loss", "accuracy", "eval_accuracy"))
