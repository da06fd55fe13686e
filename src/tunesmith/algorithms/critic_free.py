"""Critic-free advantage estimators for PPO's loop (`advantage_estimator`, verl's names).

Each one keeps PPO's reward shaping (`token_rewards`: a per-token KL penalty plus the answer's score on
its last token, the score first baselined by `baselined_scores`),
    r_t = -beta KL_t + [t = last] s'_i,
and uses the discounted return G_t = sum_{k >= t} gamma^(k - t) r_k as the advantage, with no critic.
They differ in the baseline s'_i takes from the other answers:
    grpo          s'_i = (s_i - mean_group) / std_group        (as OpenRLHF's group_norm)
    rloo          s'_i = s_i - mean_{j != i} s_j               (Ahmadian et al. 2024: the leave-one-out mean
                                                                of the other k - 1 answers to the prompt)
    reinforce_pp  s'_i = s_i, then G whitened over every token of the batch (Hu 2025, REINFORCE++)
`gae` is the book's PPO with a critic (algorithms/gae.py).
"""

from __future__ import annotations

import torch

from tunesmith.algorithms.gae import gae_advantages
from tunesmith.algorithms.grpo import group_advantages
from tunesmith.algorithms.ppo import Total, local_total, masked_whiten

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUPED = ("grpo", "rloo")  # the estimators whose baseline needs several answers per prompt


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] each score minus the mean of the other answers' scores in its group (groups laid out in order)."""
    grouped = scores.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def baselined_scores(scores: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """The score each answer's last token is rewarded with, after the estimator's baseline."""
    if estimator == "rloo":
        return leave_one_out(scores, group_size)
    if estimator == "grpo":
        return group_advantages(scores, group_size, "group")[0]
    if estimator == "reinforce_pp":
        return scores
    raise ValueError(f"critic-free advantage_estimator must be one of {ADVANTAGE_ESTIMATORS[1:]}, got {estimator!r}")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """[batch, T] G_t = sum_{k >= t} gamma^(k - t) r_k over each answer's real tokens (GAE with V = 0, lambda = 1)."""
    returns, _ = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def critic_free_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, estimator: str,
                           total: Total = local_total) -> torch.Tensor:
    """[batch, T] advantages of the estimator from token rewards shaped with its `baselined_scores`: the
    returns, whitened for REINFORCE++ (`total` sums over ranks)."""
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, total=total) if estimator == "reinforce_pp" else returns
