"""PPO for RLHF as pure tensor functions (Schulman et al. 2017; Ziegler et al. 2019; the book's Algorithm 7.1).

Per response token t, with ratio_t = pi(y_t) / pi_old(y_t):
    reward_t   = -beta * kl_t, plus the sequence score at the last response token
    policy     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
    value      = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)
    total      = policy + c1 * value - c2 * entropy
Every mean is over the real response tokens of the batch (`mask`). kl_t estimates KL(pi || ref) from
the sampled token: k1 = log pi - log ref (unbiased, noisy, can be negative), k3 = (r - 1) - log r with
r = ref / pi (unbiased, always >= 0, lower variance; Schulman's "Approximating KL divergence").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Total = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor of partial sums over data-parallel ranks (the identity in one process), so statistics are
those of the whole global batch."""


def local_total(sums: torch.Tensor) -> torch.Tensor:
    """One process: its partial sums are the totals."""
    return sums


def masked_mean(values: torch.Tensor, mask: torch.Tensor, total: Total = local_total) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over every rank's values with a cross-rank `total`, as a statistic
    without gradient)."""
    mask = mask.to(values.dtype)
    sums = torch.stack([(values * mask).sum(), mask.sum()])
    sums = sums if total is local_total else total(sums.detach())
    return sums[0] / sums[1].clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Total = local_total) -> torch.Tensor:
    """(values - mean) / std over the masked entries; 0 outside the mask. Without shift_mean the mean is kept."""
    mean = masked_mean(values, mask, total)
    variance = masked_mean((values - mean) ** 2, mask, total)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """log pi - log ref per token."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r with r = ref / pi, per token; >= 0."""
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """[batch, T]: -kl_coef * kl_t on every response token, plus each sequence's score on its last one."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last response token [batch]
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate objective (to minimise), and clip fraction and approximate KL to pi_old."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "policy/approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss: the critic may not move more than `clip` from its rollout-time values."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


@dataclass
class PPOLoss:
    """The total loss to backpropagate and its parts (detached means are logged), plus the clip statistics."""

    loss: torch.Tensor
    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    stats: dict[str, torch.Tensor]


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
             clip: float, value_clip: float, value_coef: float, entropy_coef: float) -> PPOLoss:
    """policy + c1 * value - c2 * entropy, all [batch, T] inputs masked by `mask`."""
    pg, pg_stats = policy_loss(logps, old_logps, advantages, mask, clip)
    vf, vf_stats = value_loss(values, old_values, returns, mask, value_clip)
    mean_entropy = masked_mean(entropy, mask)
    total = pg + value_coef * vf - entropy_coef * mean_entropy
    return PPOLoss(total, pg, vf, mean_entropy, {**pg_stats, **vf_stats})


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: beta grows when KL overshoots the target, shrinks below it.

        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    where KL is the batch's mean summed per-sequence KL and n the number of sequences in the batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_sequences: int) -> None:
        """Move beta towards the KL target after a batch of `n_sequences` with mean summed KL `current_kl`."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_sequences / self.horizon


class FixedKLController:
    """A constant beta with the adaptive controller's interface, so the loop never asks which one it has."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_sequences: int) -> None:
        """Ignore the measured KL: beta stays where the config put it."""


class RunningMoments:
    """Running mean and std of scores (Chan et al.'s parallel update), for `ppo_score_norm`."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, values: torch.Tensor, total: Total = local_total) -> None:
        """Fold a batch of scores (every rank's, with a cross-rank `total`) into the running mean and variance
        (exact, not an exponential average)."""
        values = values.double()
        if total is local_total:
            batch_mean, batch_var, n = values.mean().item(), values.var(unbiased=False).item(), values.numel()
        else:
            n, summed = total(torch.stack([values.new_tensor(values.numel()), values.sum()])).tolist()
            batch_mean = summed / n
            batch_var = total((values - batch_mean).pow(2).sum().reshape(1)).item() / n
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The population standard deviation of every score seen so far (0 if rounding made var negative)."""
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict[str, float]:
        """The moments as plain floats, saved with a checkpoint so a resumed run normalises identically."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the moments `state_dict` saved."""
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
