"""The step of the stages that minimise a loss over batches of rows (sft, rm, dpo).

A stage supplies a `loss(model, batch) -> (loss summed over the batch's items, metrics summed over the
same items)`, how to count those items (label tokens for SFT, pairs for preference losses), and how to
collate rows into a batch. A step splits its rows into micro-batches of per_device_train_batch_size,
backpropagates each loss divided by the item count of the whole step (over every rank), then takes one
optimizer step: accumulation, and N ranks, give the same gradient as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunesmith.data.packing import TokenBatch
from tunesmith.data.pairs import PairBatch
from tunesmith.training.loop import Stage, StepOutput, Updates

Batch = TokenBatch | PairBatch
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


@dataclass
class Objective:
    """A loss over batches, and how rows become batches and how many items a batch's loss sums over."""

    loss: LossFn
    collate: Callable[[list[dict]], Batch]
    count_items: Callable[[Batch], int]
    device: torch.device


def supervised_stage(objective: Objective, micro_batch_size: int, accumulation: int, eval_batch_size: int,
                     log_samples: Callable[[torch.nn.Module, int], None] | None = None) -> Stage:
    """The loop's Stage for a loss: each step is `accumulation` micro-batches and one optimizer update
    (`log_samples`: the stage's per-step sample log, see `Stage`)."""
    def step(model: torch.nn.Module, rows: list[dict], updates: Updates) -> StepOutput:
        batches = [objective.collate(rows[i:i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]
        return accumulate(model, objective, batches, updates)

    def evaluate(model: torch.nn.Module, rows: list[dict]) -> dict[str, float]:
        return evaluate_loss(model, objective, rows, eval_batch_size)

    return Stage(rows_per_step=micro_batch_size * accumulation, step=step, evaluate=evaluate,
                 micro_batch_rows=micro_batch_size, log_samples=log_samples)


def accumulate(model: torch.nn.Module, objective: Objective, batches: list[Batch], updates: Updates) -> StepOutput:
    """Backward over one step's micro-batches, each loss divided by the step's total item count, then step."""
    items = sum(objective.count_items(b) for b in batches)  # counted on the CPU, before the copy to the device
    global_items = updates.global_count(items)  # the whole step's, over every rank
    sums, tokens = {"loss": 0.0}, 0
    for batch in batches:
        tokens += batch.num_tokens
        with updates.autocast():
            loss_sum, metrics = objective.loss(model, batch.to(objective.device))
        updates.backward(loss_sum / max(global_items, 1))
        sums["loss"] = sums["loss"] + loss_sum.detach()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    updates.step()
    return StepOutput(sums, items, tokens)


def evaluate_loss(model: torch.nn.Module, objective: Objective, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Loss and metrics over all `rows`, averaged per item, named eval_*."""
    totals, items = {"loss": 0.0}, 0
    for start in range(0, len(rows), batch_size):
        batch = objective.collate(rows[start:start + batch_size]).to(objective.device)
        loss_sum, metrics = objective.loss(model, batch)
        totals["loss"] += loss_sum.item()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        items += objective.count_items(batch)
    return {f"eval_{key}": value / max(items, 1) for key, value in totals.items()}
