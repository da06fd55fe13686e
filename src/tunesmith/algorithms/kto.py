"""KTO (Ethayarajh et al. 2024), as TRL computes it: unpaired answers, each desirable or undesirable.

With r = log pi(y|x) - log ref(y|x) summed over the answer's tokens, and the reference point
    z = max(0, mean over mismatched pairs (x, y') of [log pi(y'|x) - log ref(y'|x)]), detached
(an estimate of KL(pi || ref): each prompt with another record's answer), the loss of one answer is
    desirable      lambda_D * (1 - sigmoid(beta * (r - z)))
    undesirable    lambda_U * (1 - sigmoid(beta * (z - r)))
and the batch loss is their mean. The implicit reward of an answer is beta * r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.algorithms.ppo import Total, local_total


@dataclass
class KTOOutput:
    losses: torch.Tensor
    """[B] each answer's weighted loss."""
    rewards: torch.Tensor
    """[B] beta * r, detached."""
    kl: torch.Tensor
    """The reference point z (a scalar, detached)."""


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                        total: Total = local_total) -> torch.Tensor:
    """z: the mean log-ratio of the mismatched answers, clamped at 0, without gradient; over every rank's
    answers with a cross-rank `total` (as TRL gathers it across processes)."""
    log_ratio = (policy_kl_logps - ref_kl_logps).detach()
    sums = total(torch.stack([log_ratio.sum(), log_ratio.new_tensor(float(log_ratio.numel()))]))
    return (sums[0] / sums[1].clamp(min=1)).clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOOutput:
    """Per-answer KTO losses for [B] summed answer log-probs, the reference point `kl` and [B] bool labels."""
    log_ratio = policy_logps - ref_logps
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio)))
    losses = torch.where(desirable.to(torch.bool), desirable_loss, undesirable_loss)
    return KTOOutput(losses, (beta * log_ratio).detach(), kl.detach())


def weight_balance(desirable_weight: float, undesirable_weight: float, desirable: int, undesirable: int) -> float:
    """lambda_D n_D / (lambda_U n_U): TRL recommends keeping it in [1, 4/3]."""
    return desirable_weight * desirable / max(undesirable_weight * undesirable, 1e-12)
