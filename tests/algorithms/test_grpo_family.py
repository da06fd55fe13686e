"""The GRPO family (TRL's loss types, scale_rewards, clip-higher, GSPO's sequence ratio, DAPO's overlong
penalty) against plain, unvectorised re-implementations written from the papers' formulas."""

import math

import pytest
import torch

from tunesmith.algorithms.grpo import (
    LOSS_TYPES,
    aggregate_token_losses,
    group_advantages,
    grpo_loss,
    importance_log_ratio,
    loss_items,
    soft_overlong_penalty,
)
from tunesmith.algorithms.ppo import kl_k3


def plain_grpo_loss(logps, old, ref, advantages, lengths, eps_low, eps_high, beta, loss_type, level, max_len):
    """Loops over answers and tokens; the loss of one micro-batch."""
    token_losses = []
    for i, length in enumerate(lengths):
        log_ratios = [logps[i][t] - old[i][t] for t in range(length)]
        seq_log_ratio = sum(log_ratios) / max(length, 1)
        row = []
        for t in range(length):
            r = math.exp(seq_log_ratio if level == "sequence" else log_ratios[t])
            a = advantages[i]
            term = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            row.append(term + beta * (math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1))
        token_losses.append(row)
    answers = [row for row in token_losses if row]
    if loss_type == "grpo":
        return sum(sum(row) / len(row) for row in answers) / len(answers)
    if loss_type in ("bnpo", "dapo"):
        return sum(map(sum, answers)) / sum(map(len, answers))
    return sum(map(sum, answers)) / (len(lengths) * max_len)  # dr_grpo: every answer, a constant


def random_batch(seed, answers=5, width=7):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(answers, width, generator=generator) * 2
    old = logps + 0.3 * torch.randn(answers, width, generator=generator)
    ref = logps + 0.3 * torch.randn(answers, width, generator=generator)
    lengths = [7, 1, 4, 0, 6][:answers]
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    advantages = torch.randn(answers, generator=generator)
    return logps, old, ref, mask, lengths, advantages


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_equals_the_plain_loop(loss_type, level, eps_high):
    for seed in range(3):
        logps, old, ref, mask, lengths, advantages = random_batch(seed)
        loss, _ = grpo_loss(logps, old, ref, advantages, mask, clip=0.2, kl_coef=0.05, clip_high=eps_high,
                            loss_type=loss_type, importance_level=level, max_length=10)
        expected = plain_grpo_loss(logps.tolist(), old.tolist(), ref.tolist(), advantages.tolist(), lengths, 0.2,
                                   0.2 if eps_high is None else eps_high, 0.05, loss_type, level, 10)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_loss_types_differ_exactly_as_defined_on_unequal_lengths():
    # answer 0: 3 tokens of loss 1; answer 1: 1 token of loss 4
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_token_losses(per_token, mask, "grpo").item() == pytest.approx((1 + 4) / 2)
    assert aggregate_token_losses(per_token, mask, "bnpo").item() == pytest.approx(7 / 4)
    assert aggregate_token_losses(per_token, mask, "dapo").item() == pytest.approx(7 / 4)
    assert aggregate_token_losses(per_token, mask, "dr_grpo", max_length=8).item() == pytest.approx(7 / (2 * 8))
    # what accumulation weights a micro-batch by: answers, except dapo's tokens (so dapo is a mean over all tokens)
    assert [loss_items(mask, t) for t in ("grpo", "bnpo", "dr_grpo", "dapo")] == [2, 2, 2, 4]


def test_dapo_over_micro_batches_is_the_token_mean_of_the_whole_batch_and_bnpo_is_not():
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    pieces = [slice(0, 1), slice(1, 3)]
    for loss_type, expected in (("dapo", 11 / 6), ("bnpo", (3 / 3) * 1 / 3 + (8 / 3) * 2 / 3)):
        items = [loss_items(mask[p], loss_type) for p in pieces]
        combined = sum(aggregate_token_losses(per_token[p], mask[p], loss_type).item() * n / sum(items)
                       for p, n in zip(pieces, items))
        assert combined == pytest.approx(expected)


def test_gspo_ratio_is_the_exp_of_the_mean_token_log_ratio():
    logps, old, _, mask, lengths, _ = random_batch(0)
    sequence = importance_log_ratio(logps, old, mask, "sequence")
    for i, length in enumerate(lengths):
        if length:
            expected = math.exp(sum((logps[i, :length] - old[i, :length]).tolist()) / length)
            assert torch.exp(sequence[i, :length]) == pytest.approx(torch.full((length,), expected), rel=1e-5)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further():
    logps, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    mask, advantage = torch.ones(1, 1), torch.tensor([1.0])
    symmetric, _ = grpo_loss(logps, old, None, advantage, mask, clip=0.2, kl_coef=0.0)
    higher, _ = grpo_loss(logps, old, None, advantage, mask, clip=0.2, kl_coef=0.0, clip_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2) and higher.item() == pytest.approx(-1.25)


def test_scale_rewards_group_batch_and_none():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    none, _ = group_advantages(rewards, 2, "none")
    assert none.tolist() == [0.5, -0.5, 1.0, -1.0]
    group, _ = group_advantages(rewards, 2, "group", eps=0.0)
    std_a, std_b = torch.tensor([1.0, 0.0]).std().item(), torch.tensor([3.0, 1.0]).std().item()
    assert group.tolist() == pytest.approx([0.5 / std_a, -0.5 / std_a, 1 / std_b, -1 / std_b])
    batch, _ = group_advantages(rewards, 2, "batch", eps=0.0)
    assert batch.tolist() == pytest.approx((none / rewards.std()).tolist())
    given, _ = group_advantages(rewards, 2, "batch", eps=0.0, batch_std=2.0)
    assert given.tolist() == pytest.approx((none / 2).tolist())
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "rank")


def test_soft_overlong_penalty_is_dapo_formula():
    # max 20 tokens, buffer 4: no penalty up to 16, then -(L - 16) / 4, -1 at 20 and beyond
    penalty = soft_overlong_penalty(torch.tensor([5, 16, 17, 18, 20, 25]), max_length=20, buffer=4)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


def test_kl_stat_and_masked_answers_leave_fully_masked_rows_out():
    logps, old, ref, mask, lengths, advantages = random_batch(1)
    _, stats = grpo_loss(logps, old, ref, advantages, mask, clip=0.2, kl_coef=0.1)
    kl = kl_k3(logps, ref)
    rows = [(kl[i, :n].mean().item()) for i, n in enumerate(lengths) if n]
    assert stats["kl"].item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
