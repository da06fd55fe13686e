"""The reward model's pairwise loss and metrics equal hand computations of -log sigma(rc - rr)."""

import math

import pytest
import torch

from tunesmith.algorithms.reward import pairwise_loss, pairwise_metrics

CHOSEN = [1.5, -0.25, 2.0, 0.0]
REJECTED = [0.5, 0.75, 2.0, -3.0]


def test_pairwise_loss_matches_hand_computation():
    """pairwise_loss is -log(1 / (1 + exp(-(rc - rr)))) pair by pair."""
    got = pairwise_loss(torch.tensor(CHOSEN, dtype=torch.float64), torch.tensor(REJECTED, dtype=torch.float64))
    expected = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(CHOSEN, REJECTED)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got[2].item() == pytest.approx(math.log(2), rel=1e-12)  # a tie costs ln 2


def test_pairwise_loss_stays_finite_at_large_negative_margin():
    """At rc - rr = -1000 the naive exp overflows; the loss stays finite and about 1000 + exp(-1000)."""
    with pytest.raises(OverflowError):
        math.exp(1000.0)  # the naive -log(1 / (1 + exp(-margin))) cannot be evaluated
    for dtype in (torch.float32, torch.float64):
        got = pairwise_loss(torch.tensor([-500.0], dtype=dtype), torch.tensor([500.0], dtype=dtype))
        assert torch.isfinite(got).all()
        assert got.item() == pytest.approx(1000.0, rel=1e-12)
    big = pairwise_loss(torch.tensor([500.0], dtype=torch.float64), torch.tensor([-500.0], dtype=torch.float64))
    assert big.item() == pytest.approx(0.0, abs=1e-12)  # the other way round it costs nothing


def test_pairwise_metrics_are_hand_sums_with_ties_incorrect():
    """accuracy counts strictly higher chosen scores (a tie is wrong); margin and scores are sums."""
    metrics = pairwise_metrics(torch.tensor(CHOSEN), torch.tensor(REJECTED))
    assert set(metrics) == {"accuracy", "margin", "scores/chosen", "scores/rejected"}
    assert metrics["accuracy"] == 2.0 == sum(c > r for c, r in zip(CHOSEN, REJECTED))  # pairs 0 and 3
    assert metrics["margin"] == pytest.approx(sum(c - r for c, r in zip(CHOSEN, REJECTED)), abs=1e-6)
    assert metrics["scores/chosen"] == pytest.approx(sum(CHOSEN), abs=1e-6)
    assert metrics["scores/rejected"] == pytest.approx(sum(REJECTED), abs=1e-6)


def test_pairwise_loss_gradient_is_minus_sigmoid_of_minus_margin():
    """d loss / d rc = -sigmoid(-(rc - rr)) = -1 / (1 + exp(rc - rr)), and d loss / d rr is its negative."""
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    pairwise_loss(chosen, rejected).sum().backward()
    expected = torch.tensor([-1 / (1 + math.exp(c - r)) for c, r in zip(CHOSEN, REJECTED)], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected.grad, -expected, rtol=1e-12, atol=1e-12)
