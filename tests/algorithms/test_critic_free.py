"""RLOO, REINFORCE++ and the group-normalised estimator against hand-written loops over answers and tokens."""

import math

import pytest
import torch

from tunesmith.algorithms.critic_free import (
    baselined_scores,
    critic_free_advantages,
    discounted_returns,
    leave_one_out,
)
from tunesmith.algorithms.ppo import token_rewards


def plain_returns(rewards, length, gamma):
    returns, running = [0.0] * length, 0.0
    for t in reversed(range(length)):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def plain_advantages(scores, kl, lengths, beta, gamma, estimator, k):
    """Per answer: baseline the score (loops over the group), shape the token rewards, return G_t."""
    shaped = []
    for i, score in enumerate(scores):
        group = scores[(i // k) * k:(i // k + 1) * k]
        if estimator == "rloo":
            score = score - (sum(group) - score) / (k - 1)
        elif estimator == "grpo":
            mean = sum(group) / k
            std = math.sqrt(sum((s - mean) ** 2 for s in group) / (k - 1))
            score = (score - mean) / (std + 1e-4)
        rewards = [-beta * kl[i][t] for t in range(lengths[i])]
        rewards[-1] += score
        shaped.append(plain_returns(rewards, lengths[i], gamma))
    if estimator == "reinforce_pp":
        tokens = [g for row in shaped for g in row]
        mean = sum(tokens) / len(tokens)
        std = math.sqrt(sum((g - mean) ** 2 for g in tokens) / len(tokens) + 1e-8)
        shaped = [[(g - mean) / std for g in row] for row in shaped]
    return shaped


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_estimators_equal_the_plain_loops(estimator, gamma):
    generator = torch.Generator().manual_seed(0)
    lengths, k = [3, 5, 1, 4, 2, 5], 3
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).float()
    scores = torch.randn(6, generator=generator, dtype=torch.float64)
    kl = torch.rand(6, 5, generator=generator, dtype=torch.float64) * mask
    rewards = token_rewards(baselined_scores(scores, k, estimator), kl, mask, 0.1)
    advantages = critic_free_advantages(rewards, mask, gamma, estimator)
    expected = plain_advantages(scores.tolist(), kl.tolist(), lengths, 0.1, gamma, estimator, k)
    for i, length in enumerate(lengths):
        assert advantages[i, :length].tolist() == pytest.approx(expected[i], rel=1e-6, abs=1e-9)
        assert not advantages[i, length:].any()


def test_leave_one_out_by_hand():
    # group (1, 2, 6): 1 - 4, 2 - 3.5, 6 - 1.5; group (0, 0): 0, 0
    assert leave_one_out(torch.tensor([1.0, 2.0, 6.0]), 3).tolist() == [-3.0, -1.5, 4.5]
    assert leave_one_out(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2).tolist() == [0.0, 0.0, -2.0, 2.0]


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert discounted_returns(rewards, mask, 0.5).tolist() == [[1.5, 1.0, 2.0, 0.0]]
