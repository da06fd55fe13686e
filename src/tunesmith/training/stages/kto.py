"""KTO (`stage: kto`): learn from answers marked desirable or undesirable, no pairs needed.

Each row is encoded as a pair (data/pairs.build_kto_examples): its own answer and, for KTO's reference
point, another prompt's answer to this prompt. The reference point is detached, so the mismatched
answers run through the policy in a pass of their own without gradient: backward covers half the
tokens a pair's forward would give it (measured in benchmarks/bench_train.py --stage kto). The reference
log-probs of a row never change, so they are cached as DPO's are (`ReferenceLogps`). The loss is
algorithms/kto.py; the reference point is the mean mismatched log-ratio of the micro-batch on every
rank (TRL gathers it across processes too).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from tunesmith.algorithms.dpo import PairLogps
from tunesmith.algorithms.kto import kto_losses, kto_reference_point, weight_balance
from tunesmith.config import RunConfig
from tunesmith.data.dataset import train_and_eval_rows
from tunesmith.data.pairs import KTOBatch, build_kto_examples, collate_kto
from tunesmith.model.forward import device_multiple, sequence_logps
from tunesmith.training.distributed import sum_over_ranks
from tunesmith.training.loop import RunData, Stage
from tunesmith.training.pair_log import PairScoring, pair_log
from tunesmith.training.pairs import PreferenceArgs, ReferenceLogps, count_pairs
from tunesmith.training.stages.spec import StageInputs, StageSpec
from tunesmith.training.supervised import Objective, supervised_stage


@dataclass
class KTOArgs(PreferenceArgs):
    """kto: the weights of desirable and undesirable answers (LLaMA-Factory's and TRL's keys), beside
    pref_beta and pref_ftx (the SFT term on the desirable answers)."""

    section: ClassVar[str] = "kto"
    kto_chosen_weight: float = 1.0
    """kto: lambda_D, the weight of desirable answers' losses."""
    kto_rejected_weight: float = 1.0
    """kto: lambda_U, the weight of undesirable answers' losses."""

    def problems(self) -> list[tuple[str, str]]:
        """beta and the SFT weight as dpo's, and positive weights."""
        mine = [] if self.kto_chosen_weight > 0 and self.kto_rejected_weight > 0 else [
            ("kto_chosen_weight", "`kto_chosen_weight` and `kto_rejected_weight` must be positive.")]
        return super().problems() + mine


def build_kto_data(config: RunConfig, tokenizer: object, device: torch.device) -> RunData:
    """KTO rows split into train/eval, with TRL's warning when the weighted class balance is off."""
    data, args = config.data, config.method
    encode = partial(build_kto_examples, dataset_dir=data.dataset_dir, tokenizer=tokenizer, template=data.template,
                     cutoff_len=data.cutoff_len, max_samples=data.max_samples, skip_bad_records=data.skip_bad_records)
    train, evaluation = train_and_eval_rows(encode, data.dataset, data.eval_dataset, data.val_size, config.train.seed)
    desirable = sum(row["kto_desirable"] for row in train)
    balance = weight_balance(args.kto_chosen_weight, args.kto_rejected_weight, desirable, len(train) - desirable)
    if not 1 <= balance <= 4 / 3:
        warnings.warn(f"kto: kto_chosen_weight x desirable ({args.kto_chosen_weight} x {desirable}) : kto_rejected_weight "
                      f"x undesirable ({args.kto_rejected_weight} x {len(train) - desirable}) is {balance:.2f}; the KTO "
                      "paper and TRL recommend 1 to 4/3. Adjust the weights.", stacklevel=2)
    return RunData(train=train, eval=evaluation)


def kto_logps(model: torch.nn.Module, batch: KTOBatch, chunk_size: int) -> PairLogps:
    """Summed log-probs of each row's own answer ("chosen") and, without gradient, of its mismatched one."""
    answers, answer_lengths = sequence_logps(model, batch.answers, chunk_size)
    with torch.no_grad():
        mismatched, mismatched_lengths = sequence_logps(model, batch.mismatched, chunk_size)
    return PairLogps(answers, mismatched, answer_lengths, mismatched_lengths)


def kto_loss(model: torch.nn.Module, batch: KTOBatch, args: KTOArgs, chunk_size: int,
             reference: ReferenceLogps) -> tuple[torch.Tensor, dict]:
    """Summed KTO loss over the batch's answers, and TRL-named metrics summed over them."""
    policy = kto_logps(model, batch, chunk_size)
    ref = reference(batch, policy)
    desirable = torch.tensor([row["kto_desirable"] for row in batch.rows], device=policy.chosen.device)
    output = kto_losses(policy.chosen, ref.chosen, kto_reference_point(policy.rejected, ref.rejected, sum_over_ranks), desirable,
                        args.pref_beta, args.kto_chosen_weight, args.kto_rejected_weight)
    losses = output.losses
    if args.pref_ftx:
        losses = losses + args.pref_ftx * desirable * (-policy.chosen / policy.chosen_len.clamp(min=1))
    return losses.sum(), kto_metrics(output.rewards, policy.chosen.detach(), desirable, output.kl)


def kto_metrics(rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor) -> dict:
    """TRL's names, as sums over the batch's answers (the loop divides by their count): rewards/chosen
    and logps/chosen are the batch's means over desirable answers, .../rejected over undesirable ones.
    Every batch reports every key (ranks sum the same list): a batch without desirable (undesirable)
    answers adds 0 to rewards/chosen (rejected), which pulls the logged mean towards 0 a little when
    batches are small and one-sided."""
    count, values = len(rewards), [kl.float()]
    for selected in (desirable, ~desirable):  # a mean over an empty selection is 0 here, not nan
        share = selected.float() / selected.sum().clamp(min=1)
        values += [(rewards.float() * share).sum(), (logps.float() * share).sum()]
    sums = (torch.stack(values) * count).tolist()  # one device sync for every metric
    names = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")
    return dict(zip(names, sums))


def build_kto(inputs: StageInputs) -> Stage:
    """KTO through the supervised loop, on packed answers and packed mismatched answers."""
    optim = inputs.config.train
    reference = ReferenceLogps(inputs.reference, optim.logprob_chunk_size, score=kto_logps)
    loss = partial(kto_loss, args=inputs.config.method, chunk_size=optim.logprob_chunk_size, reference=reference)
    collate = partial(collate_kto, pad_token_id=inputs.tokenizer.pad_token_id,
                      pad_to_multiple_of=device_multiple(inputs.device))
    beta = inputs.config.method.pref_beta
    scoring = PairScoring(lambda rows: collate(rows).answers, ("chosen",),
                          lambda policy, reference, lengths: beta * (policy - reference))  # KTO's implicit reward
    log = pair_log(inputs.config, inputs.data.train, scoring, inputs.reference, inputs.tokenizer, inputs.device)
    return supervised_stage(Objective(loss, collate, count_pairs, inputs.device), optim.per_device_train_batch_size,
                            optim.gradient_accumulation_steps, optim.per_device_eval_batch_size,
                            None if log is None else log.write)


def always(config: RunConfig) -> bool:
    """KTO's log-ratios need the reference model."""
    return True


STAGE = StageSpec(name="kto", args=KTOArgs, build_data=build_kto_data, build=build_kto, needs_reference=always,
                  plotted=("loss", "eval_loss", "rewards/chosen", "rewards/rejected", "kl"))
