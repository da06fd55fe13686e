"""DPO and its variants: train the policy directly on preference pairs (the book's Algorithm 3.1).

Each step runs chosen and rejected answers through the policy in one concatenated forward pass and
sums the log-probs of their answer tokens. The reference log-probs of a pair never change, so they are
computed once per pair by the shared reference model (training/reference.py) and kept in its cache:
the first epoch pays one reference forward per step, later epochs and evaluations none, and
`precompute_ref_logprobs` pays it all before training starts. The losses themselves are pure
functions in `algorithms/dpo.py`, chosen by `pref_loss` from its PREF_LOSSES.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from tunesmith.algorithms.dpo import PREF_LOSSES, PairLogps, preference_loss, preference_metrics
from tunesmith.config import RunConfig
from tunesmith.config.schema import choice_message
from tunesmith.data.pairs import PairBatch
from tunesmith.training.distributed import process_info
from tunesmith.training.loop import Stage, autocast_context
from tunesmith.training.pair_log import PairScoring, pair_log
from tunesmith.training.pairs import (
    PreferenceArgs,
    ReferenceLogps,
    build_pair_data,
    pair_batcher,
    pair_logps,
    pair_objective,
)
from tunesmith.training.stages.spec import StageInputs, StageSpec
from tunesmith.training.supervised import supervised_stage


@dataclass
class DPOArgs(PreferenceArgs):
    """dpo: the preference loss and its reference."""

    section: ClassVar[str] = "dpo"
    pref_loss: str = "sigmoid"
    """dpo: sigmoid (DPO), ipo, hinge, simpo or orpo (simpo and orpo need no reference model)."""
    dpo_label_smoothing: float = 0.0
    """dpo with pref_loss sigmoid: conservative DPO, the assumed chance that a pair's label is flipped, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """dpo with pref_loss simpo: the target reward margin gamma."""
    precompute_ref_logprobs: bool = False
    """dpo: compute the reference log-probs once before training, so no reference forward runs during it."""

    def problems(self) -> list[tuple[str, str]]:
        """The loss must exist and its hyper-parameters be in range."""
        checks = [
            ("pref_loss", self.pref_loss not in PREF_LOSSES, choice_message("pref_loss", self.pref_loss, tuple(PREF_LOSSES))),
            ("dpo_label_smoothing", not 0 <= self.dpo_label_smoothing < 0.5,
             f"`dpo_label_smoothing` must be in [0, 0.5), got {self.dpo_label_smoothing}."),
            ("dpo_label_smoothing", self.dpo_label_smoothing > 0 and self.pref_loss != "sigmoid",
             f"`dpo_label_smoothing` applies to `pref_loss: sigmoid` only, not {self.pref_loss}."),
        ]
        return super().problems() + [(key, message) for key, failed, message in checks if failed]


def dpo_loss(model: torch.nn.Module, batch: PairBatch, args: DPOArgs, chunk_size: int,
             reference: ReferenceLogps | None) -> tuple[torch.Tensor, dict]:
    """Summed preference loss over the batch's pairs, and TRL-named metrics summed over them."""
    policy = pair_logps(model, batch, chunk_size)
    ref = reference(batch, policy) if reference is not None else None
    output = preference_loss(policy, ref, args.pref_loss, args.pref_beta, args.dpo_label_smoothing,
                             args.simpo_gamma, args.pref_ftx)
    return output.losses.sum(), preference_metrics(output)


def build_dpo(inputs: StageInputs) -> Stage:
    """The DPO stage; with precompute_ref_logprobs every pair's reference log-probs are computed first."""
    args, optim = inputs.config.method, inputs.config.train
    reference = None
    if inputs.reference is not None:
        reference = ReferenceLogps(inputs.reference, optim.logprob_chunk_size)
        if args.precompute_ref_logprobs:
            batcher = pair_batcher(inputs.tokenizer, inputs.device)

            def compute(rows: list[dict]) -> torch.Tensor:
                ref = reference.compute(batcher(rows).to(inputs.device))
                return torch.stack([ref.chosen, ref.rejected], dim=1)

            with autocast_context(inputs.device, optim):
                reference.cache.precompute([inputs.data.train, inputs.data.eval], compute,
                                           optim.per_device_train_batch_size, process_info())
    loss = partial(dpo_loss, args=args, chunk_size=optim.logprob_chunk_size, reference=reference)
    scoring = PairScoring(pair_batcher(inputs.tokenizer, inputs.device), ("chosen", "rejected"),
                          partial(implicit_rewards, args=args))
    log = pair_log(inputs.config, inputs.data.train, scoring, inputs.reference, inputs.tokenizer, inputs.device)
    return supervised_stage(pair_objective(loss, inputs.tokenizer, inputs.device), optim.per_device_train_batch_size,
                            optim.gradient_accumulation_steps, optim.per_device_eval_batch_size,
                            None if log is None else log.write)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor,
                     args: DPOArgs) -> torch.Tensor:
    """[2 pairs] the rewards dpo logs (rewards/chosen, then rewards/rejected) from summed log-probs of chosen
    then rejected answers, for pairs.jsonl."""
    to_pairs = lambda sums: PairLogps(*sums.chunk(2), *lengths.chunk(2))  # noqa: E731
    output = preference_loss(to_pairs(policy), None if reference is None else to_pairs(reference), args.pref_loss,
                             args.pref_beta, args.dpo_label_smoothing, args.simpo_gamma)
    return torch.cat([output.chosen_rewards, output.rejected_rewards])


def needs_reference(config: RunConfig) -> bool:
    """Every pref_loss but the reference-free ones (simpo, orpo)."""
    return not PREF_LOSSES[config.method.pref_loss].reference_free


def precomputes_reference(config: RunConfig) -> bool:
    """precompute_ref_logprobs: every pair's reference log-probs before the first update."""
    return config.method.precompute_ref_logprobs


STAGE = StageSpec(
    name="dpo", args=DPOArgs, build_data=build_pair_data, build=build_dpo, needs_reference=needs_reference,
    precomputes_reference=precomputes_reference,
    plotted=("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies",
             "eval_rewards/margins"))
