"""GRPO (`stage: grpo`): num_generations answers per prompt, group-relative advantages, no critic.

    rollout sample G answers per prompt from one prefilled prompt; A_i = (r_i - mean_group) / std_group
    update  ppo_epochs passes of the clipped policy loss per answer, plus beta * k3 KL to the reference
The shared RL step is training/rl.py; the maths is algorithms/grpo.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tunesmith.algorithms.grpo import group_advantages, grpo_loss
from tunesmith.config import RunConfig
from tunesmith.training.loop import Stage
from tunesmith.training.rl import (
    RLArgs,
    RLParts,
    build_rl_data,
    global_mean,
    make_scorer,
    rl_problems,
    rl_stage,
    rollout_metrics,
    rollout_settings,
    stop_token_ids,
)
from tunesmith.training.rollout import Rollout, response_forward, sample_and_score
from tunesmith.training.stages.spec import StageInputs, StageSpec


@dataclass
class GRPOArgs(RLArgs):
    """grpo: the group of answers per prompt and how their rewards are compared."""

    section: ClassVar[str] = "grpo"
    default_kl_coef: ClassVar[float] = 0.04
    num_generations: int = 4
    """grpo: answers sampled per prompt (the group size G)."""
    grpo_scale_rewards: bool = True
    """grpo: divide group-centred rewards by the group's std."""

    def problems(self) -> list[tuple[str, str]]:
        """The shared RL checks, plus a group of at least two."""
        mine = [] if self.num_generations >= 2 else [(
            "num_generations", "`num_generations` must be at least 2 for grpo (advantages compare answers within a "
            f"group), got {self.num_generations}.")]
        return super().problems() + mine


def build_grpo(inputs: StageInputs) -> Stage:
    """GRPO as the loop's Stage: the shared RL step around GRPO's group advantages and loss."""
    config = inputs.config
    return rl_stage(grpo_parts(inputs), config.train, config.method, config.sampling)


def grpo_parts(inputs: StageInputs) -> RLParts:
    """Sampling G answers per prompt, their group-relative advantages, and the clipped loss with k3 KL."""
    config = inputs.config
    args: GRPOArgs = config.method
    group = args.num_generations
    scorer, _ = make_scorer(args, config.model, inputs.tokenizer, inputs.model, config.train.use_cpu)
    settings = rollout_settings(config.sampling, config.train, inputs.tokenizer, group)
    stop_ids = stop_token_ids(config.data.template, inputs.tokenizer)
    forward = {**settings.forward, "with_values": False, "entropy_grad": False}

    def rollout(model: torch.nn.Module, rows: list[dict], seeds: list[int]) -> tuple[Rollout, dict]:
        sampled = sample_and_score(model, rows, settings, scorer, stop_ids, group, with_values=False,
                                   reference=inputs.reference, seeds=seeds)
        advantages, zero_std = group_advantages(sampled.scores, group, args.grpo_scale_rewards)
        metrics = {**rollout_metrics(sampled), "reward": global_mean(sampled.scores),
                   "zero_std_share": global_mean(zero_std.float())}
        return sampled.with_advantages(advantages), metrics

    def loss(model: torch.nn.Module, part: Rollout) -> tuple[torch.Tensor, dict]:
        logps, _, _ = response_forward(model, part.prompt_ids, part.response_ids, **forward)
        return grpo_loss(logps, part.old_logps, part.ref_logps, part.advantages, part.mask, args.ppo_clip,
                         args.ppo_kl_coef)

    return RLParts(rollout, loss, len, group, scorer, stop_ids, {"scores": scorer})


def kl_in_loss(config: RunConfig) -> bool:
    """The reference runs only when the loss has a KL term."""
    return config.method.ppo_kl_coef > 0


STAGE = StageSpec(name="grpo", args=GRPOArgs, build_data=build_rl_data, build=build_grpo, needs_reference=kl_in_loss,
                  check=rl_problems, plotted=("score", "kl", "loss", "zero_std_share", "eval_score"))
