"""GRPO (`stage: grpo`) and its family: num_generations answers per prompt, group-relative advantages, no critic.

    rollout sample G answers per prompt from one prefilled prompt; optional overlong penalty; A_i =
            (r_i - mean_group) / std (scale_rewards); optionally mask truncated answers and drop groups
            whose rewards are all equal (DAPO's dynamic sampling, by skipping)
    update  ppo_epochs passes of the clipped policy loss (clip-higher, token or sequence ratio), plus
            beta * k3 KL to the reference, aggregated per loss_type: grpo, bnpo, dr_grpo or dapo
The shared RL step is training/rl.py; the maths is algorithms/grpo.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from tunesmith.algorithms.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    grpo_loss,
    loss_items,
    soft_overlong_penalty,
)
from tunesmith.algorithms.ppo import kl_k3
from tunesmith.config import RunConfig
from tunesmith.config.schema import choice_message
from tunesmith.training.loop import Stage
from tunesmith.training.rl import (
    RLArgs,
    RLParts,
    build_rl_data,
    global_mean,
    global_std,
    make_scorer,
    rl_problems,
    rl_stage,
    rollout_metrics,
    rollout_settings,
    sampler_metrics,
    stop_token_ids,
)
from tunesmith.training.rollout import Rollout, response_forward, sample_and_score, update_sees_pi_old
from tunesmith.training.rollout_log import rollout_log
from tunesmith.training.stages.spec import StageInputs, StageSpec


@dataclass
class GRPOArgs(RLArgs):
    """grpo: the group of answers per prompt and how their rewards are compared."""

    section: ClassVar[str] = "grpo"
    default_kl_coef: ClassVar[float] = 0.04
    scale_rewards: str = "group"
    """grpo: divide group-centred rewards by the group's std (group), the batch's std (batch) or nothing (none, Dr. GRPO)."""
    loss_type: str = "grpo"
    """grpo: how token losses are averaged: grpo (per answer, then over answers), bnpo (micro-batch tokens), dr_grpo (answers x max_new_tokens), dapo (every token of the update batch)."""
    epsilon_high: float | None = None
    """grpo: upper clip range of the ratio (DAPO's clip-higher, e.g. 0.28); default ppo_clip, TRL's epsilon."""
    importance_sampling_level: str = "token"
    """grpo: token (GRPO) or sequence (GSPO: one ratio per answer, exp of its mean token log-ratio)."""
    mask_truncated_completions: bool = False
    """grpo: leave answers that never reached their stop token out of the loss (DAPO)."""
    drop_zero_std_groups: bool = False
    """grpo: leave groups whose rewards are all equal out of the update (DAPO's dynamic sampling, by skipping; logged as dropped_share)."""
    overlong_buffer_len: int | None = None
    """grpo: DAPO's soft overlong penalty: from max_new_tokens - this many tokens, subtract up to 1 linearly from the reward."""

    grpo_scale_rewards: bool | None = None
    """grpo: the earlier key of scale_rewards (true: group, false: none); set scale_rewards instead."""

    def resolve(self) -> None:
        """TRL's older boolean scale_rewards (true is group, false is none), and tunesmith's older key."""
        super().resolve()
        if self.num_generations is None:
            self.num_generations = 4
        if self.grpo_scale_rewards is not None:
            warnings.warn("grpo_scale_rewards is now scale_rewards (group, batch or none); reading "
                          f"grpo_scale_rewards: {self.grpo_scale_rewards} as scale_rewards: "
                          f"{'group' if self.grpo_scale_rewards else 'none'}.", stacklevel=2)
            self.scale_rewards = "group" if self.grpo_scale_rewards else "none"
        self.scale_rewards = {"true": "group", "false": "none"}.get(self.scale_rewards.lower(), self.scale_rewards)

    def problems(self) -> list[tuple[str, str]]:
        """The shared RL checks, plus a group of at least two and the family's choices."""
        checks = [
            ("num_generations", self.num_generations < 2, "`num_generations` must be at least 2 for grpo (advantages "
             f"compare answers within a group), got {self.num_generations}."),
            ("scale_rewards", self.scale_rewards not in SCALE_REWARDS,
             choice_message("scale_rewards", self.scale_rewards, SCALE_REWARDS)),
            ("loss_type", self.loss_type not in LOSS_TYPES, choice_message("loss_type", self.loss_type, LOSS_TYPES)),
            ("importance_sampling_level", self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS,
             choice_message("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)),
            ("epsilon_high", self.epsilon_high is not None and self.epsilon_high <= 0,
             f"`epsilon_high` must be positive, got {self.epsilon_high}."),
            ("overlong_buffer_len", self.overlong_buffer_len is not None and self.overlong_buffer_len < 1,
             f"`overlong_buffer_len` must be at least 1, got {self.overlong_buffer_len}."),
        ]
        return super().problems() + [(key, message) for key, failed, message in checks if failed]


def build_grpo(inputs: StageInputs) -> Stage:
    """GRPO as the loop's Stage: the shared RL step around GRPO's group advantages and loss."""
    config = inputs.config
    return rl_stage(grpo_parts(inputs), config.train, config.method, config.sampling,
                    rollout_log(config.output, inputs.tokenizer))


def grpo_parts(inputs: StageInputs) -> RLParts:
    """Sampling G answers per prompt, their group-relative advantages, and the clipped loss with k3 KL."""
    config = inputs.config
    args: GRPOArgs = config.method
    group = args.num_generations
    scorer, _ = make_scorer(args, config.model, inputs.tokenizer, inputs.model, config.train.use_cpu)
    settings = rollout_settings(config.sampling, config.train, inputs.tokenizer, group, args)
    settings = replace(settings, old_from_update=update_sees_pi_old(inputs.model, args.ppo_epochs,
                                                                    args.ppo_buffer_size))
    stop_ids = stop_token_ids(config.data.template, inputs.tokenizer)
    forward = {**settings.forward, "with_values": False, "entropy_grad": False}

    def rollout(model: torch.nn.Module, rows: list[dict], seeds: list[int]) -> tuple[Rollout, dict]:
        sampled = sample_and_score(model, rows, settings, scorer, stop_ids, group, with_values=False,
                                   reference=inputs.reference, seeds=seeds)
        scores, metrics = sampled.scores, rollout_metrics(sampled)
        if args.overlong_buffer_len:
            penalty = soft_overlong_penalty(sampled.mask.sum(1), config.sampling.max_new_tokens, args.overlong_buffer_len)
            scores = scores + penalty.to(scores.dtype)
            metrics["overlong_penalty"] = global_mean(penalty)
        batch_std = global_std(scores) if args.scale_rewards == "batch" else None
        advantages, zero_std = group_advantages(scores, group, args.scale_rewards, batch_std=batch_std)
        metrics.update({"reward": global_mean(scores), "zero_std_share": global_mean(zero_std.float())})
        known = sampled.ref_logps is not None and sampled.old_logps is not None  # else only the loss's stats say
        kl = kl_k3(sampled.old_logps, sampled.ref_logps) * sampled.mask if known else None
        scored = replace(sampled, scores=scores, advantages=advantages, kl=kl)  # kl: what the loss starts from
        return trained_answers(scored, zero_std, args, metrics), metrics

    def loss(model: torch.nn.Module, part: Rollout) -> tuple[torch.Tensor, dict]:
        logps, _, _ = response_forward(model, part.prompt_ids, part.response_ids, **forward)
        deferred = part.old_logps is None
        part = part.with_update_old(logps, settings.is_cap)
        loss, stats = grpo_loss(logps, part.old_logps, part.ref_logps, part.policy_advantages(), part.mask,
                                args.ppo_clip, args.ppo_kl_coef, args.epsilon_high, args.loss_type,
                                args.importance_sampling_level, config.sampling.max_new_tokens)
        return loss, {**stats, **(sampler_metrics(part, in_update=True) if deferred else {})}

    return RLParts(rollout, loss, lambda part: loss_items(part.mask, args.loss_type), group, scorer, stop_ids,
                   {"scores": scorer})


def trained_answers(rollout: Rollout, zero_std: torch.Tensor, args: GRPOArgs, metrics: dict) -> Rollout:
    """The rollout with the answers the update leaves out (truncated ones, groups of equal rewards)
    masked out entirely: they add nothing to the loss (see algorithms/grpo.py for how each loss type
    counts them)."""
    keep = torch.ones(len(rollout), dtype=torch.bool, device=rollout.mask.device)
    if args.mask_truncated_completions:
        keep &= rollout.stopped.to(torch.bool)
    if args.drop_zero_std_groups:
        keep &= ~zero_std.repeat_interleave(args.num_generations).to(keep.device)
        metrics["dropped_share"] = global_mean(zero_std.float())
    return replace(rollout, mask=rollout.mask * keep[:, None].to(rollout.mask.dtype))


def grpo_problems(config: RunConfig, command: str) -> list[tuple[str, str]]:
    """The shared RL checks, plus an overlong buffer inside max_new_tokens."""
    buffer, longest = config.method.overlong_buffer_len, config.sampling.max_new_tokens
    mine = [("overlong_buffer_len", f"`overlong_buffer_len: {buffer}` must be below max_new_tokens ({longest}): the "
             "penalty grows over the last overlong_buffer_len tokens an answer may have.")] if buffer and buffer >= longest else []
    return rl_problems(config, command) + mine


def kl_in_loss(config: RunConfig) -> bool:
    """The reference runs only when the loss has a KL term."""
    return config.method.ppo_kl_coef > 0


STAGE = StageSpec(name="grpo", args=GRPOArgs, build_data=build_rl_data, build=build_grpo, needs_reference=kl_in_loss,
                  check=grpo_problems, plotted=("score", "kl", "loss", "zero_std_share", "eval_score"))
