"""GAE, PPO, GRPO and KL maths against the book's loops, the formulas, and hand-derived numbers."""

import math

import pytest
import torch

from tunesmith.algorithms.gae import gae_advantages
from tunesmith.algorithms.grpo import group_advantages, grpo_loss
from tunesmith.algorithms.logprobs import chunked_logprobs_entropy_at
from tunesmith.algorithms.ppo import (
    AdaptiveKLController,
    RunningMoments,
    kl_k1,
    kl_k3,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def book_gae(rewards, values, lengths, gamma, lam):
    """The book's backwards loop, one sequence at a time, over its real tokens only."""
    advantages = torch.zeros_like(rewards)
    for i, length in enumerate(lengths):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            advantages[i, t] = last
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_vectorised_gae_equals_the_book_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 1, 12, 4]
    rewards, values = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    expected = book_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    assert advantages[~mask].abs().max() == 0


def test_gae_hand_numbers():
    # two tokens, gamma=lambda=1: delta_1 = r_1 - V_1 = 1 - 0.5, delta_0 = r_0 + V_1 - V_0 = 0 + 0.5 - 0.25
    advantages, _ = gae_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.25, 0.5]]), torch.ones(1, 2), 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.75, 0.5]]))


def test_kl_estimators_match_their_formulas():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -1.0, 0.0]))
    ratio = torch.exp(ref - logp)
    torch.testing.assert_close(kl_k3(logp, ref), ratio - 1 - torch.log(ratio))
    assert (kl_k3(logp, ref) >= 0).all()
    # both are unbiased estimators of KL(p || q) under samples from p
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    for estimator in (kl_k1, kl_k3):
        expectation = (p * estimator(p.log(), q.log())).sum()
        torch.testing.assert_close(expectation, exact)


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-1.0 - 0.25, 0.0, 0.0]]))


def test_policy_loss_hand_computation():
    # ratios e^0.5 = 1.649 (clipped to 1.2 for A > 0), e^-0.5 = 0.607 (clipped to 0.8 for A < 0), 1
    logps, old = torch.tensor([[0.5, -0.5, 0.0]]), torch.zeros(1, 3)
    advantages, mask = torch.tensor([[1.0, -2.0, 3.0]]), torch.ones(1, 3)
    loss, stats = policy_loss(logps, old, advantages, mask, clip=0.2)
    # token 0: max(-1.649, -1.2) = -1.2; token 1: max(2 * 0.607, 2 * 0.8) = 1.6; token 2: -3
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.6 - 3.0) / 3))
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(2 / 3))


def test_value_loss_hand_computation():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.2-0)^2 = 0.04 -> 1; token 1: both (0-1)^2 = 1
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1 + 1) / 2))
    torch.testing.assert_close(stats["value/clipfrac"], torch.tensor(0.0))


def test_whiten_over_the_mask_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.2247, 0.0, 1.2247, 0.0]]), atol=1e-4, rtol=0)


def test_group_advantages_and_zero_std_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    advantages, zero_std = group_advantages(rewards, group_size=4, scale_rewards="none")
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    assert zero_std.tolist() == [False, True]
    scaled, _ = group_advantages(rewards, group_size=4, scale_rewards="group")
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()
    torch.testing.assert_close(scaled[:4], advantages[:4] / (std + 1e-4))


def test_grpo_loss_hand_computation():
    # answer 0 (2 tokens, A = 1, ratio 1): per token -1, plus beta * k3 = 0; answer 1 (1 token, A = -1, ratio e^0.5 -> -A * r)
    logps = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logps, old, logps.clone(), torch.tensor([1.0, -1.0]), mask, clip=0.2, kl_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor((-1.0 + math.exp(0.5)) / 2))
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(0.0))
    torch.testing.assert_close(stats["kl"], torch.tensor(0.0))


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_sequences=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(current_kl=5.4, n_sequences=100)  # error -0.1
    assert controller.value == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))


def test_running_moments_match_the_whole_sample():
    moments, torch_values = RunningMoments(), torch.randn(100, dtype=torch.float64) * 3 + 1
    for chunk in torch_values.split([10, 30, 60]):
        moments.update(chunk)
    assert moments.mean == pytest.approx(torch_values.mean().item())
    assert moments.std == pytest.approx(torch_values.std(unbiased=False).item())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_the_plain_computation(temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).double()
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    grad_lp, grad_h = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)

    logps, entropy = chunked_logprobs_entropy_at(hidden, head, targets, chunk_size=4, temperature=temperature)
    ((logps * grad_lp).sum() + (entropy * grad_h).sum()).backward()
    chunked_grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for tensor in (hidden, head.weight, head.bias):
        tensor.grad = None

    log_probs = torch.log_softmax(head(hidden) / temperature, dim=-1)
    plain_logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    plain_entropy = -(log_probs.exp() * log_probs).sum(-1)
    ((plain_logps * grad_lp).sum() + (plain_entropy * grad_h).sum()).backward()
    torch.testing.assert_close(logps.double(), plain_logps)
    torch.testing.assert_close(entropy.double(), plain_entropy)
    for mine, plain in zip(chunked_grads, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(mine, plain)


def test_without_an_entropy_gradient_a_frozen_head_keeps_dlogp_dhidden_from_the_forward():
    """The cheaper path (no entropy term in the loss, LoRA's frozen head): same values, same hidden gradient."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=True).double().requires_grad_(False)
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    grad_lp = torch.randn(9, dtype=torch.float64)
    logps, entropy = chunked_logprobs_entropy_at(hidden, head, targets, chunk_size=4, temperature=0.7, entropy_grad=False)
    assert not entropy.requires_grad
    (logps * grad_lp).sum().backward()
    reference = hidden.detach().requires_grad_()
    log_probs = torch.log_softmax(head(reference) / 0.7, dim=-1)
    plain_logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    (plain_logps * grad_lp).sum().backward()
    torch.testing.assert_close(logps.double(), plain_logps)
    torch.testing.assert_close(entropy.double(), -(log_probs.exp() * log_probs).sum(-1))
    torch.testing.assert_close(hidden.grad, reference.grad)
