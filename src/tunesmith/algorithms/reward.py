"""The reward model's pairwise (Bradley-Terry) loss: the chosen answer should score higher.

    L = -log sigma(r(x, y_w) - r(x, y_l))

It is the negative log-likelihood of the observed preference under the Bradley-Terry model
P(y_w > y_l) = sigma(r_w - r_l), so only score differences matter; the scale is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """[pairs] losses -log sigma(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def pairwise_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """Summed over pairs (the loop divides by the pair count): accuracy, margin, mean scores."""
    chosen, rejected = chosen_scores.detach().float(), rejected_scores.detach().float()
    sums = torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(), chosen.sum(), rejected.sum()])
    return dict(zip(("accuracy", "margin", "scores/chosen", "scores/rejected"), sums.tolist()))
