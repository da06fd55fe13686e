"""GRPO (Shao et al. 2024, DeepSeekMath) and its family: PPO without a critic, the group as baseline.

G answers are sampled per prompt. Each answer's advantage is its reward relative to its group,
    A_i = r_i - mean(r_group), divided by std(r_group) (scale_rewards: group, GRPO's), by the std of
    the whole batch's rewards (batch) or by nothing (none: Dr. GRPO's finding that the group std
    up-weights groups whose answers barely differ)
applied to every token of the answer. The per-token loss is the clipped surrogate plus an optional
KL penalty to the reference (the k3 estimator, in the loss rather than in the reward):
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps_high)) + beta * k3_t
with eps_high = eps unless DAPO's clip-higher raises it. The ratio is per token, or (GSPO, Zheng et al.
2025, importance_sampling_level: sequence) the same for every token of an answer: exp of the mean of its
tokens' log-ratios. How the token losses become one number is the loss type (TRL's names):
    grpo     mean over answers of each answer's token mean (the paper's 1/G sum 1/|o_i| sum_t)
    bnpo     mean over the micro-batch's tokens
    dr_grpo  sum over tokens / (answers x max_new_tokens): no length normalisation (Dr. GRPO)
    dapo     mean over every token of the update batch (all micro-batches and ranks; DAPO)
An answer whose tokens are all masked (a truncated answer under mask_truncated_completions, a group
dropped for equal rewards) adds nothing, and grpo and bnpo leave it out of their counts too (TRL's grpo
counts it in its mean over answers); dr_grpo keeps its constant denominator, as TRL. A group whose
rewards are all equal has zero advantage everywhere and teaches nothing.
"""

from __future__ import annotations

import torch

from tunesmith.algorithms.ppo import kl_k3

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4,
                     batch_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero_std [N // G] bool) for rewards [N] laid out group by group. With "batch",
    `batch_std` is the std over every rank's rewards (default: over `rewards`)."""
    grouped = rewards.view(-1, group_size)  # [prompts, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    if scale_rewards == "group":
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        centred = centred / ((rewards.std().item() if batch_std is None else batch_std) + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centred.reshape(-1), torch.isclose(std.squeeze(1), torch.zeros_like(std.squeeze(1)))


def importance_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """[answers, T] log of the importance ratio: per token, or per answer (the masked mean of its
    tokens' log-ratios, broadcast over its tokens) for GSPO's sequence level."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    per_answer = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_answer[:, None].expand_as(log_ratio)


def aggregate_token_losses(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
                           max_length: int | None = None) -> torch.Tensor:
    """One loss from [answers, T] token losses, as `loss_type` defines (see the module docstring); dapo's
    mean over the whole update batch comes from `loss_items` weighting the micro-batches by tokens."""
    total = (per_token * mask).sum(1)
    lengths = mask.sum(1)
    answers = (lengths > 0).sum().clamp(min=1)
    if loss_type == "grpo":
        return (total / lengths.clamp(min=1)).sum() / answers
    if loss_type in ("bnpo", "dapo"):
        return total.sum() / lengths.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_length:
            raise ValueError("loss_type dr_grpo divides by max_length (max_new_tokens); none was given")
        return total.sum() / (mask.shape[0] * max_length)  # every answer, masked or not: a constant, as TRL
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_items(mask: torch.Tensor, loss_type: str = "grpo") -> float:
    """What a micro-batch's loss is a mean over, so accumulation weights it right: its tokens for dapo,
    every answer for dr_grpo, its answers with any token otherwise."""
    lengths = mask.sum(1)
    if loss_type == "dapo":
        return float(lengths.sum())
    return float(mask.shape[0] if loss_type == "dr_grpo" else (lengths > 0).sum())


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float, kl_coef: float,
              clip_high: float | None = None, loss_type: str = "grpo", importance_level: str = "token",
              max_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over [answers, T] token tensors with [answers] advantages (or [answers, T]: weighted per token,
    algorithms/importance.py); stats: clip fraction and KL."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(importance_log_ratio(logps, old_logps, mask, importance_level))
    per_answer_advantage = (advantages if advantages.ndim == 2 else advantages[:, None]).to(logps.dtype)
    unclipped = -per_answer_advantage * ratio
    clipped = -per_answer_advantage * torch.clamp(ratio, 1 - clip, 1 + (clip if clip_high is None else clip_high))
    per_token = torch.maximum(unclipped, clipped)
    stats = {}
    lengths = mask.sum(1).clamp(min=1)
    answers = (mask.sum(1) > 0).sum().clamp(min=1)
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        per_token = per_token + kl_coef * kl
        stats["kl"] = ((kl * mask).sum(1) / lengths).sum().detach() / answers
    loss = aggregate_token_losses(per_token, mask, loss_type, max_length)
    stats["policy/clipfrac"] = (((clipped > unclipped).to(mask.dtype) * mask).sum(1) / lengths).sum().detach() / answers
    return loss, stats


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer tokens, then falling linearly to -1
    at max_length (and -1 beyond)."""
    start = max_length - buffer
    return ((start - lengths.to(torch.float32)) / buffer).clamp(min=-1.0, max=0.0)
