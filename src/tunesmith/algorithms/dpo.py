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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")


@dataclass
class PairLogps:
    """Summed response log-probs and response lengths of a batch of pairs, each a [pairs] tensor."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor

    def averaged(self) -> PairLogps:
        return PairLogps(self.chosen / self.chosen_len, self.rejected / self.rejected_len,
                         self.chosen_len, self.rejected_len)


@dataclass
class PreferenceOutput:
    losses: torch.Tensor
    """[pairs] loss per pair (the training loss is their mean)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    """The log-probs the loss used (summed, or length-averaged for ipo/simpo/orpo)."""
    rejected_logps: torch.Tensor


def sigmoid_loss(logratio_margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO; with label_smoothing > 0 the conservative cDPO that assumes labels flip with that chance."""
    logits = beta * logratio_margin
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(logratio_margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: regress the margin onto 1 / (2 beta) instead of pushing it to infinity."""
    return (logratio_margin - 1 / (2 * beta)) ** 2


def hinge_loss(logratio_margin: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * logratio_margin)


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO: length-normalised log-prob margin against a target margin gamma; no reference."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO: SFT on chosen plus beta times the odds-ratio term; no reference."""
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg)))
    return -chosen_avg - beta * F.logsigmoid(log_odds)


def preference_loss(policy: PairLogps, reference: PairLogps | None, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, ftx: float = 0.0) -> PreferenceOutput:
    """Per-pair losses and implicit rewards for `loss_type` (sigmoid, ipo, hinge, simpo, orpo)."""
    if loss_type in LENGTH_AVERAGED:
        policy = policy.averaged()
        reference = reference.averaged() if reference is not None else None
    if loss_type in REFERENCE_FREE:
        losses = (simpo_loss(policy.chosen, policy.rejected, beta, simpo_gamma) if loss_type == "simpo"
                  else orpo_loss(policy.chosen, policy.rejected, beta))
        chosen_rewards, rejected_rewards = beta * policy.chosen.detach(), beta * policy.rejected.detach()
    else:
        if reference is None:
            raise ValueError(f"pref_loss {loss_type} needs reference log-probs")
        chosen_logratio = policy.chosen - reference.chosen
        rejected_logratio = policy.rejected - reference.rejected
        margin = chosen_logratio - rejected_logratio
        if loss_type == "sigmoid":
            losses = sigmoid_loss(margin, beta, label_smoothing)
        elif loss_type == "ipo":
            losses = ipo_loss(margin, beta)
        elif loss_type == "hinge":
            losses = hinge_loss(margin, beta)
        else:
            raise ValueError(f"unknown pref_loss {loss_type!r}")
        chosen_rewards, rejected_rewards = beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
    if ftx > 0:
        chosen_avg = policy.chosen if loss_type in LENGTH_AVERAGED else policy.chosen / policy.chosen_len
        losses = losses - ftx * chosen_avg
    return PreferenceOutput(losses, chosen_rewards, rejected_rewards, policy.chosen.detach(), policy.rejected.detach())


def preference_metrics(output: PreferenceOutput) -> dict[str, float]:
    """TRL's metric names, summed over the batch's pairs (the loop divides by the pair count)."""
    chosen, rejected = output.chosen_rewards.float(), output.rejected_rewards.float()
    sums = torch.stack([
        chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
        output.chosen_logps.float().sum(), output.rejected_logps.float().sum(),
    ]).tolist()
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return dict(zip(names, sums))
