"""KTO's loss against the paper's formula computed one answer at a time, and by hand."""

import math

import pytest
import torch

from tunesmith.algorithms.kto import kto_losses, kto_reference_point, weight_balance


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_equals_the_formula_answer_by_answer():
    generator = torch.Generator().manual_seed(0)
    policy, ref = -torch.rand(6, generator=generator) * 20, -torch.rand(6, generator=generator) * 20
    policy_kl, ref_kl = -torch.rand(6, generator=generator) * 20, -torch.rand(6, generator=generator) * 20
    desirable = torch.tensor([True, False, True, True, False, False])
    z = kto_reference_point(policy_kl, ref_kl)
    assert z.item() == pytest.approx(max(0.0, sum((policy_kl - ref_kl).tolist()) / 6), rel=1e-6)
    out = kto_losses(policy, ref, z, desirable, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    for i in range(6):
        r = (policy[i] - ref[i]).item()
        expected = 1.5 * (1 - sigmoid(0.3 * (r - z.item()))) if desirable[i] else 0.7 * (1 - sigmoid(0.3 * (z.item() - r)))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5)
        assert out.rewards[i].item() == pytest.approx(0.3 * r, rel=1e-5)


def test_kto_by_hand():
    # r = 2, z = 0 (the mismatched log-ratios average to -1, clamped), beta 0.5: desirable 1 - sigmoid(1)
    z = kto_reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-2.0, -4.0]))
    assert z.item() == 0.0
    out = kto_losses(torch.tensor([-1.0, -1.0]), torch.tensor([-3.0, -3.0]), z, torch.tensor([True, False]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([1 - sigmoid(1.0), 1 - sigmoid(-1.0)])


def test_the_reference_point_has_no_gradient_and_the_loss_pushes_the_right_way():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    policy_kl = torch.tensor([-1.0], requires_grad=True)
    z = kto_reference_point(policy_kl, torch.tensor([-1.5]))
    out = kto_losses(policy, torch.tensor([-2.0, -2.0]), z, torch.tensor([True, False]), beta=0.1)
    out.losses.sum().backward()
    assert policy_kl.grad is None  # detached
    assert policy.grad[0] < 0 and policy.grad[1] > 0  # raise the desirable answer, lower the undesirable


def test_weight_balance_is_trl_ratio():
    assert weight_balance(1.0, 1.0, 30, 30) == 1.0
    assert weight_balance(1.0, 1.33, 40, 30) == pytest.approx(40 / 39.9)
