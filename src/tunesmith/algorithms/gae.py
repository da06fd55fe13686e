"""Generalised advantage estimation (Schulman et al. 2016; the book's Algorithm 6.1), vectorised.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t)        (V past the last response token is 0)
    A_t     = sum_{k >= t} (gamma lambda)^(k - t) delta_k
    returns = A + V                                   (the critic's regression targets)

Tensors are [batch, response_len], right-padded, with `mask` 1 on real response tokens. The book's
backwards loop runs once per token; here the discounted sum is one matmul with the [T, T] matrix of
(gamma lambda)^(k - t), which is the same sum (tests compare the two) and costs nothing for T <= a few
thousand.
"""

from __future__ import annotations

import torch


def discount_matrix(length: int, factor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """[T, T] with entry [k, t] = factor^(k - t) for k >= t, else 0, so x @ M sums x_k discounted to t."""
    steps = torch.arange(length, device=device, dtype=torch.float64)
    offsets = steps[:, None] - steps[None, :]  # k - t
    weights = torch.where(offsets >= 0, torch.tensor(factor, dtype=torch.float64, device=device) ** offsets.clamp(min=0), 0.0)
    return weights


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [batch, T] and 0 outside `mask`."""
    mask = mask.to(values.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)  # V(s_{t+1}) [batch, T]
    deltas = (rewards * mask + gamma * next_values - values) * mask  # delta_t [batch, T]
    weights = discount_matrix(rewards.shape[1], gamma * lam, rewards.device).to(deltas.dtype)
    advantages = (deltas @ weights) * mask  # A_t = sum_k (gamma lambda)^(k-t) delta_k
    return advantages, advantages + values
