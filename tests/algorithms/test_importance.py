"""Truncated importance sampling: the weights against the formula, and the weighted surrogate's gradient
against a hand-written one."""

import math

import torch

from tunesmith.algorithms.grpo import grpo_loss
from tunesmith.algorithms.importance import truncated_is_weights
from tunesmith.algorithms.ppo import policy_loss


def test_weights_are_the_probability_ratio_truncated_at_the_cap_and_zero_off_the_mask():
    learner = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]])
    sampler = torch.tensor([[-1.2, -1.0, -2.5], [-3.0, -0.3, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expected = [[math.exp(0.2), math.exp(-1.0), 2.0], [1.0, math.exp(0.2), 0.0]]
    torch.testing.assert_close(truncated_is_weights(learner, sampler, mask, cap=2.0), torch.tensor(expected))


def test_the_weighted_surrogate_gradient_is_w_times_each_tokens_term():
    """d/dlogp of -min(r A w, clip(r) A w) is -w A r where unclipped, 0 where clipped (w > 0 constant)."""
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    logps = (old + 0.3 * torch.randn(3, 5)).requires_grad_()
    advantages, weights = torch.randn(3, 5), torch.rand(3, 5) * 2
    mask = torch.ones(3, 5)
    loss, _ = policy_loss(logps, old, advantages * weights, mask, clip=0.2)
    loss.backward()
    ratio = torch.exp(logps.detach() - old)
    clipped = (-advantages * torch.clamp(ratio, 0.8, 1.2)) > (-advantages * ratio)
    expected = torch.where(clipped, 0.0, -weights * advantages * ratio) / mask.sum()
    torch.testing.assert_close(logps.grad, expected)


def test_grpo_takes_per_token_advantages_and_equals_per_answer_ones_when_the_weights_are_one():
    torch.manual_seed(1)
    old, ref = torch.randn(4, 6), torch.randn(4, 6)
    logps = old + 0.1 * torch.randn(4, 6)
    advantages, mask = torch.randn(4), (torch.rand(4, 6) > 0.2).float()
    per_answer = grpo_loss(logps, old, ref, advantages, mask, 0.2, 0.04)[0]
    per_token = grpo_loss(logps, old, ref, advantages[:, None] * torch.ones(4, 6), mask, 0.2, 0.04)[0]
    torch.testing.assert_close(per_token, per_answer)
