"""Preference losses and implicit rewards equal hand computations from the formulas, pair by pair."""

import math

import pytest
import torch

from tunesmith.algorithms.dpo import PairLogps, preference_loss, preference_metrics

# Three pairs: summed response log-probs and response lengths, policy and reference.
POLICY = dict(chosen=[-12.0, -30.5, -7.25], rejected=[-15.0, -28.0, -9.5],
              chosen_len=[4.0, 10.0, 5.0], rejected_len=[6.0, 7.0, 5.0])
REFERENCE = dict(chosen=[-13.0, -29.0, -8.0], rejected=[-14.0, -29.5, -9.0],
                 chosen_len=POLICY["chosen_len"], rejected_len=POLICY["rejected_len"])
BETA = 0.3


def log_sigmoid(x):
    """log(1 / (1 + exp(-x))) written without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def pair_logps(values, requires_grad=False):
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    tensors["chosen"].requires_grad_(requires_grad)
    return PairLogps(**tensors)


def hand(loss_type, beta=BETA, label_smoothing=0.0, gamma=0.5, ftx=0.0):
    """Per-pair (loss, chosen reward, rejected reward) from the module docstring's formulas."""
    p, r = POLICY, REFERENCE
    out = []
    for i in range(3):
        pc, pr, rc, rr = p["chosen"][i], p["rejected"][i], r["chosen"][i], r["rejected"][i]
        lc, lr = p["chosen_len"][i], p["rejected_len"][i]
        if loss_type in ("ipo", "simpo", "orpo"):
            pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * h)
        elif loss_type == "simpo":
            loss = -log_sigmoid(beta * (pc - pr) - gamma)
        else:  # orpo
            log_odds_c = pc - math.log(1 - math.exp(pc))
            log_odds_r = pr - math.log(1 - math.exp(pr))
            loss = -pc - beta * log_sigmoid(log_odds_c - log_odds_r)
        loss += ftx * (-p["chosen"][i] / lc)
        if loss_type in ("simpo", "orpo"):
            out.append((loss, beta * pc, beta * pr))
        else:
            out.append((loss, beta * (pc - rc), beta * (pr - rr)))
    return out


CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.1}),
    ("ipo", {}),
    ("hinge", {}),
    ("simpo", {"gamma": 0.7}),
    ("orpo", {}),
]


@pytest.mark.parametrize("loss_type,kwargs", CASES, ids=["sigmoid", "sigmoid-ls0.1", "ipo", "hinge", "simpo", "orpo"])
def test_losses_and_rewards_match_hand_computation(loss_type, kwargs):
    """Each pref_loss's per-pair losses, rewards and reported log-probs equal the docstring formulas."""
    module_kwargs = {("simpo_gamma" if k == "gamma" else k): v for k, v in kwargs.items()}
    reference = None if loss_type in ("simpo", "orpo") else pair_logps(REFERENCE)
    out = preference_loss(pair_logps(POLICY), reference, loss_type, BETA, **module_kwargs)
    expected = hand(loss_type, **kwargs)
    torch.testing.assert_close(out.losses, torch.tensor([e[0] for e in expected], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([e[1] for e in expected], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([e[2] for e in expected], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    averaged = loss_type in ("ipo", "simpo", "orpo")
    chosen = [c / n if averaged else c for c, n in zip(POLICY["chosen"], POLICY["chosen_len"])]
    rejected = [c / n if averaged else c for c, n in zip(POLICY["rejected"], POLICY["rejected_len"])]
    assert out.chosen_logps.tolist() == pytest.approx(chosen, rel=1e-12)
    assert out.rejected_logps.tolist() == pytest.approx(rejected, rel=1e-12)


def test_hinge_is_zero_past_the_margin():
    """hinge is max(0, 1 - beta h): a pair with beta h > 1 costs exactly 0."""
    # Pair 0 has h = 1 - (-1) = 2; with beta = 1 it sits at beta h = 2 > 1.
    out = preference_loss(pair_logps(POLICY), pair_logps(REFERENCE), "hinge", 1.0)
    assert out.losses[0].item() == 0.0
    assert out.losses.tolist() == pytest.approx([e[0] for e in hand("hinge", beta=1.0)], rel=1e-12)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    """At policy == reference DPO costs ln 2 per pair, rewards and margins are 0, ties are not accurate."""
    out = preference_loss(pair_logps(POLICY), pair_logps(POLICY), "sigmoid", BETA)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
    metrics = preference_metrics(out)
    assert metrics["rewards/accuracies"] == 0.0
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_ftx_adds_chosen_mean_nll(loss_type):
    """pref_ftx adds ftx * (-chosen_sum / chosen_len) to each pair's loss."""
    ftx = 0.25
    reference = None if loss_type == "orpo" else pair_logps(REFERENCE)
    base = preference_loss(pair_logps(POLICY), reference, loss_type, BETA)
    with_ftx = preference_loss(pair_logps(POLICY), reference, loss_type, BETA, ftx=ftx)
    nll = [-c / n for c, n in zip(POLICY["chosen"], POLICY["chosen_len"])]
    assert (with_ftx.losses - base.losses).tolist() == pytest.approx([ftx * x for x in nll], rel=1e-12)
    assert with_ftx.losses.tolist() == pytest.approx([e[0] for e in hand(loss_type, ftx=ftx)], rel=1e-12)


def test_metrics_are_sums_under_trl_names():
    """preference_metrics sums rewards, accuracy count, margins and log-probs over the pairs."""
    out = preference_loss(pair_logps(POLICY), pair_logps(REFERENCE), "sigmoid", BETA)
    rewards = [(e[1], e[2]) for e in hand("sigmoid")]
    metrics = preference_metrics(out)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    # Hand rewards: 0.3, -0.45, 0.225 vs -0.3, 0.45, -0.15 -> pairs 0 and 2 correct.
    assert metrics["rewards/accuracies"] == 2.0 == sum(c > r for c, r in rewards)
    assert metrics["rewards/chosen"] == pytest.approx(sum(c for c, _ in rewards), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(sum(r for _, r in rewards), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(sum(c - r for c, r in rewards), abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(sum(POLICY["chosen"]), rel=1e-6)
    assert metrics["logps/rejected"] == pytest.approx(sum(POLICY["rejected"]), rel=1e-6)


def test_sigmoid_gradient_matches_hand_formula():
    """d(DPO loss)/d(policy chosen logp) = -beta * sigmoid(-beta h), checked with autograd."""
    policy = pair_logps(POLICY, requires_grad=True)
    out = preference_loss(policy, pair_logps(REFERENCE), "sigmoid", BETA)
    out.losses.sum().backward()
    expected = []
    for i in range(3):
        h = (POLICY["chosen"][i] - REFERENCE["chosen"][i]) - (POLICY["rejected"][i] - REFERENCE["rejected"][i])
        expected.append(-BETA / (1 + math.exp(BETA * h)))
    torch.testing.assert_close(policy.chosen.grad, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_reference_based_loss_without_reference_raises(loss_type):
    """A reference-based pref_loss with reference=None is an error, not a silent reference-free loss."""
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pair_logps(POLICY), None, loss_type, BETA)
