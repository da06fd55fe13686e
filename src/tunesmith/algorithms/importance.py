"""Truncated importance sampling (TIS): when answers are sampled by a model that differs from the learner.

RL stacks sample with a fast engine (vLLM, or here `rollout_dtype: bf16`) whose probabilities pi_sampler
differ from the learner's pi_old by rounding, so the rollout is slightly off-policy. Yao et al. (2025,
"Your efficient RL framework secretly brings you off-policy RL training") correct it by weighing each
token's policy-gradient term by w = min(pi_old / pi_sampler, C), truncated at C so that a token the sampler
found far likelier than the learner cannot dominate the step. w is a constant (no gradient flows through
it), and since the clipped surrogate is positively homogeneous in the advantage, the weighted term equals
the surrogate with advantage w * A.
"""

from __future__ import annotations

import torch


def truncated_is_weights(learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """[samples, T] min(exp(learner - sampler), cap) on real tokens, 0 elsewhere (no gradient)."""
    ratio = torch.exp((learner_logps - sampler_logps).detach().float())
    return ratio.clamp(max=cap) * mask.float()
