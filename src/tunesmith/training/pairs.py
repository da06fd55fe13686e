"""What the stages that train on preference pairs share (rm, dpo, kto): the pair data and its batching,
their config keys, the pair log-probs and the reference's cached log-probs.

A batch of B pairs is one packed row (`data/pairs.collate_pairs`): each pair's prompt is computed once
for both answers, and no padding is computed on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from tunesmith.algorithms.dpo import PairLogps
from tunesmith.config import RunConfig
from tunesmith.data.dataset import train_and_eval_rows
from tunesmith.data.pairs import PairBatch, build_pair_examples, collate_pairs
from tunesmith.model.forward import device_multiple, sequence_logps
from tunesmith.training.loop import RunData
from tunesmith.training.reference import Reference, RowCache
from tunesmith.training.supervised import Objective


@dataclass
class PreferenceArgs:
    """dpo and kto: beta and the SFT term, LLaMA-Factory's keys for both."""

    section: ClassVar[str] = "pref"
    pref_beta: float = 0.1
    """dpo/kto: beta, how strongly the policy is held to the reference (the implicit reward's scale)."""
    pref_ftx: float = 0.0
    """dpo/kto: weight of an SFT term (mean NLL of the chosen / desirable answers) added to the preference loss."""

    def problems(self) -> list[tuple[str, str]]:
        """A positive beta, a non-negative SFT weight."""
        checks = [
            ("pref_beta", self.pref_beta <= 0, f"`pref_beta` must be positive, got {self.pref_beta}."),
            ("pref_ftx", self.pref_ftx < 0, f"`pref_ftx` must not be negative, got {self.pref_ftx}."),
        ]
        return [(key, message) for key, failed, message in checks if failed]


def count_pairs(batch: PairBatch) -> int:
    """What a preference loss is summed over."""
    return batch.num_pairs


def build_pair_data(config: RunConfig, tokenizer: object, device: torch.device) -> RunData:
    """Encoded preference pairs split into train/eval."""
    data = config.data
    encode = partial(build_pair_examples, dataset_dir=data.dataset_dir, tokenizer=tokenizer, template=data.template,
                     cutoff_len=data.cutoff_len, max_samples=data.max_samples, skip_bad_records=data.skip_bad_records)
    train, evaluation = train_and_eval_rows(encode, data.dataset, data.eval_dataset, data.val_size, config.train.seed)
    return RunData(train=train, eval=evaluation)


def pair_batcher(tokenizer: object, device: torch.device) -> Callable[[list[dict]], PairBatch]:
    """Rows -> one packed PairBatch, padded to the device's preferred multiple."""
    return partial(collate_pairs, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=device_multiple(device))


def pair_objective(loss: Callable, tokenizer: object, device: torch.device) -> Objective:
    """An Objective whose loss is summed over the pairs of a packed pair batch."""
    return Objective(loss, pair_batcher(tokenizer, device), count_pairs, device)


def pair_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int) -> PairLogps:
    """Summed answer log-probs of the chosen (first half) and rejected (second half) sequences."""
    sums, lengths = sequence_logps(model, batch, chunk_size)
    chosen, rejected = sums.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    return PairLogps(chosen, rejected, chosen_len, rejected_len)


class ReferenceLogps:
    """The reference's summed answer log-probs of each pair: cached, or computed once and cached."""

    def __init__(self, reference: Reference, chunk_size: int, score: Callable = pair_logps):
        self.reference, self.chunk_size, self.cache, self.score = reference, chunk_size, RowCache(), score

    def compute(self, batch: PairBatch) -> PairLogps:
        """The reference's forward(s) over the batch, with `score` (the stage's pair_logps)."""
        with self.reference.use() as model:
            return self.score(model, batch, self.chunk_size)

    def __call__(self, batch: PairBatch, policy: PairLogps) -> PairLogps:
        """The batch's reference log-probs (lengths are the policy's: same tokens)."""
        cached = self.cache.lookup(batch.rows)
        if cached is not None:
            cached = cached.to(policy.chosen.device)
            return PairLogps(cached[:, 0], cached[:, 1], policy.chosen_len, policy.rejected_len)
        ref = self.compute(batch)
        self.cache.store(batch.rows, torch.stack([ref.chosen, ref.rejected], dim=1))
        return ref
