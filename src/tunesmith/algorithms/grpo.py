"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a critic; the baseline is the group's own mean.

G answers are sampled per prompt. Each answer's advantage is its reward relative to its group,
    A_i = r_i - mean(r_group)            or, with scale_rewards, (r_i - mean) / (std + eps)
applied to every token of the answer. The per-token loss is the clipped surrogate plus an optional
KL penalty to the reference (the k3 estimator, in the loss rather than in the reward):
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps)) + beta * k3_t
averaged over each answer's tokens, then over answers (the paper's 1/G sum 1/|o_i| sum_t).
A group whose rewards are all equal has zero advantage everywhere and teaches nothing.
"""

from __future__ import annotations

import torch

from tunesmith.algorithms.ppo import kl_k3


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero_std [N // G] bool) for rewards [N] laid out group by group."""
    grouped = rewards.view(-1, group_size)  # [prompts, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    if scale_rewards:
        centred = centred / (std + eps)
    return centred.reshape(-1), std.squeeze(1) == 0


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float,
              kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over [answers, T] token tensors with [answers] advantages; stats: clip fraction and KL."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    per_answer_advantage = advantages[:, None].to(logps.dtype)
    unclipped = -per_answer_advantage * ratio
    clipped = -per_answer_advantage * torch.clamp(ratio, 1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    stats = {}
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        per_token = per_token + kl_coef * kl
        stats["kl"] = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean().detach()
    lengths = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    stats["policy/clipfrac"] = ((((clipped > unclipped).to(mask.dtype) * mask).sum(1) / lengths).mean()).detach()
    return loss, stats
