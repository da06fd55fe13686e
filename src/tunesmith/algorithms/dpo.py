"""Preference losses on sequence log-probs: DPO (the book's Algorithm 3.1) and its variants.

Inputs are per-pair tensors [pairs]: summed response log-probs of the chosen and rejected answers under
the policy (and, for the losses that use one, the reference), plus response lengths. With
    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
the losses are
    sigmoid (DPO):      -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps: label smoothing, cDPO)
    ipo:                (h - 1 / (2 beta))^2                with length-averaged log-probs
    hinge (SLiC):       max(0, 1 - beta h)
    simpo:              -log sigma(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)      no reference
    orpo:               -avg log pi(y_w) - beta log sigma(log odds(y_w) - log odds(y_l)), no reference
                        where log odds(y) = avg log p - log(1 - exp(avg log p))
and pref_ftx adds ftx * (-avg log pi(y_w)), an SFT term on the chosen answer.
Implicit rewards (what TRL logs as rewards/*) are beta (log pi - log ref) for the reference-based losses
and beta avg log pi for simpo and orpo. The choices of which log-probs are length-averaged follow
LLaMA-Factory, so numbers are comparable across the two.

Each loss is one function of (chosen, rejected, params) -> [pairs] losses, registered in PREF_LOSSES with
its properties: whether it uses a reference (then chosen/rejected are log-ratios policy - reference) and
whether it length-averages the log-probs. Adding a variant is one function and one dict entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed response log-probs and response lengths of a batch of pairs, each a [pairs] tensor."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor

    def averaged(self) -> PairLogps:
        """Per-token means instead of sums (what the length-averaged losses compare)."""
        return PairLogps(self.chosen / self.chosen_len, self.rejected / self.rejected_len,
                         self.chosen_len, self.rejected_len)


@dataclass
class PreferenceOutput:
    """Per-pair losses and the implicit rewards TRL logs, for one batch of pairs."""

    losses: torch.Tensor
    """[pairs] loss per pair (the training loss is their mean)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    """The log-probs the loss used (summed, or length-averaged for ipo/simpo/orpo)."""
    rejected_logps: torch.Tensor


@dataclass(frozen=True)
class PreferenceParams:
    """The scalars a preference loss may read (each loss reads only its own)."""

    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


def sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, params: PreferenceParams) -> torch.Tensor:
    """DPO on log-ratios; with label_smoothing > 0 the conservative cDPO that assumes labels flip with that chance."""
    logits = params.beta * (chosen - rejected)
    return -(1 - params.label_smoothing) * F.logsigmoid(logits) - params.label_smoothing * F.logsigmoid(-logits)


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, params: PreferenceParams) -> torch.Tensor:
    """IPO: regress the log-ratio margin onto 1 / (2 beta) instead of pushing it to infinity."""
    return (chosen - rejected - 1 / (2 * params.beta)) ** 2


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, params: PreferenceParams) -> torch.Tensor:
    """SLiC's hinge on the log-ratio margin."""
    return torch.relu(1 - params.beta * (chosen - rejected))


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, params: PreferenceParams) -> torch.Tensor:
    """SimPO: length-normalised log-prob margin against a target margin gamma; no reference."""
    return -F.logsigmoid(params.beta * (chosen - rejected) - params.simpo_gamma)


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, params: PreferenceParams) -> torch.Tensor:
    """ORPO on average log-probs: SFT on chosen plus beta times the odds-ratio term; no reference."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen - params.beta * F.logsigmoid(log_odds)


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss function and the properties the caller needs before calling it."""

    fn: Callable[[torch.Tensor, torch.Tensor, PreferenceParams], torch.Tensor]
    reference_free: bool = False
    """Compares the policy's own log-probs (no reference model is built or run)."""
    length_averaged: bool = False
    """Takes per-token average log-probs instead of sums."""


PREF_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss),
    "ipo": PreferenceLoss(ipo_loss, length_averaged=True),
    "hinge": PreferenceLoss(hinge_loss),
    "simpo": PreferenceLoss(simpo_loss, reference_free=True, length_averaged=True),
    "orpo": PreferenceLoss(orpo_loss, reference_free=True, length_averaged=True),
}


def preference_loss(policy: PairLogps, reference: PairLogps | None, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, ftx: float = 0.0) -> PreferenceOutput:
    """Per-pair losses and implicit rewards for `loss_type` (a key of PREF_LOSSES)."""
    loss = PREF_LOSSES[loss_type]
    if loss.length_averaged:
        policy = policy.averaged()
        reference = reference.averaged() if reference is not None else None
    if loss.reference_free:
        chosen, rejected = policy.chosen, policy.rejected
    elif reference is None:
        raise ValueError(f"pref_loss {loss_type} needs reference log-probs")
    else:
        chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    losses = loss.fn(chosen, rejected, PreferenceParams(beta, label_smoothing, simpo_gamma))
    if ftx > 0:
        chosen_avg = policy.chosen if loss.length_averaged else policy.chosen / policy.chosen_len
        losses = losses - ftx * chosen_avg
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach(), policy.chosen.detach(),
                            policy.rejected.detach())


def preference_metrics(output: PreferenceOutput) -> dict[str, float]:
    """TRL's metric names, summed over the batch's pairs (the loop divides by the pair count)."""
    chosen, rejected = output.chosen_rewards.float(), output.rejected_rewards.float()
    sums = torch.stack([
        chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
        output.chosen_logps.float().sum(), output.rejected_logps.float().sum(),
    ]).tolist()
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return dict(zip(names, sums))
