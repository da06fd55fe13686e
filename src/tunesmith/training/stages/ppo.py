"""PPO (`stage: ppo`, the book's Algorithm 7.1, as in Ziegler et al. 2019 and TRL's PPO).

    roles   actor = the LoRA adapter; reference = the same model with the adapter off; critic = a value
            head on the actor's last hidden state (initialised from the reward model's head when
            there is one); reward = reward model, function or endpoint
    rollout sample, then r_t = -beta KL_t (+ score on the last token), GAE -> advantages (whitened), returns
    update  ppo_epochs passes of clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy
With `advantage_estimator` grpo, rloo or reinforce_pp there is no critic: num_generations answers per
prompt, the score baselined by the other answers (algorithms/critic_free.py), the return as advantage,
and the policy loss alone.
The shared RL step (rollout, then ppo_epochs of updates) is training/rl.py; the maths is algorithms/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tunesmith.algorithms.critic_free import (
    ADVANTAGE_ESTIMATORS,
    GROUPED,
    baselined_scores,
    critic_free_advantages,
)
from tunesmith.algorithms.gae import gae_advantages
from tunesmith.algorithms.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_loss,
    token_rewards,
)
from tunesmith.config import RunConfig
from tunesmith.config.schema import choice_message
from tunesmith.model.value_head import attach_value_head
from tunesmith.training.distributed import sum_over_ranks as total
from tunesmith.training.loop import Stage
from tunesmith.training.rl import (
    RLArgs,
    RLParts,
    build_rl_data,
    global_count,
    global_mean,
    make_scorer,
    rl_problems,
    rl_stage,
    rollout_metrics,
    rollout_settings,
    stop_token_ids,
)
from tunesmith.training.rollout import Rollout, response_forward, sample_and_score
from tunesmith.training.rollout_log import rollout_log
from tunesmith.training.stages.spec import StageInputs, StageSpec


@dataclass
class PPOArgs(RLArgs):
    """ppo: the critic, GAE, the per-token KL penalty and its controller."""

    section: ClassVar[str] = "ppo"
    default_kl_coef: ClassVar[float] = 0.05
    ppo_value_clip: float = 0.2
    """Clip range of the value update (ppo)."""
    ppo_vf_coef: float = 0.1
    """ppo: weight c1 of the value loss."""
    ppo_gamma: float = 1.0
    """ppo: discount gamma of GAE."""
    ppo_lambda: float = 0.95
    """ppo: GAE lambda."""
    ppo_kl_estimator: str = "k1"
    """ppo: per-token KL estimator in the reward, k1 (log ratio) or k3 (grpo always uses k3 in its loss)."""
    ppo_target: float | None = None
    """ppo: target KL (nats per sequence) of the adaptive KL controller; unset keeps ppo_kl_coef fixed."""
    ppo_kl_horizon: int = 10000
    """ppo: horizon of the adaptive KL controller."""
    ppo_whiten_rewards: bool = False
    """ppo: whiten the per-token rewards before GAE."""
    advantage_estimator: str = "gae"
    """ppo: gae (with a critic), or critic-free grpo (group-normalised score), rloo (leave-one-out baseline) or reinforce_pp (REINFORCE++: batch-whitened returns)."""

    def resolve(self) -> None:
        """The KL default, and a group for the estimators that compare answers."""
        super().resolve()
        if self.num_generations is None:
            self.num_generations = 4 if self.advantage_estimator in GROUPED else 1

    @property
    def has_critic(self) -> bool:
        """GAE needs a value head; the critic-free estimators do not create one."""
        return self.advantage_estimator == "gae"

    def problems(self) -> list[tuple[str, str]]:
        """The shared RL checks, plus the critic's and GAE's ranges."""
        checks = [
            ("advantage_estimator", self.advantage_estimator not in ADVANTAGE_ESTIMATORS,
             choice_message("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)),
            ("num_generations", self.num_generations < 1 or (self.advantage_estimator in GROUPED and self.num_generations < 2),
             f"`num_generations: {self.num_generations}`: advantage_estimator {self.advantage_estimator} needs at least "
             f"{2 if self.advantage_estimator in GROUPED else 1} answers per prompt."),
            ("ppo_kl_estimator", self.ppo_kl_estimator not in KL_ESTIMATORS,
             choice_message("ppo_kl_estimator", self.ppo_kl_estimator, tuple(KL_ESTIMATORS))),
            ("ppo_value_clip", self.ppo_value_clip <= 0, "`ppo_clip` and `ppo_value_clip` must be positive."),
            ("ppo_target", self.ppo_target is not None and self.ppo_target <= 0, "`ppo_target` (target KL) must be positive."),
            ("ppo_gamma", not 0 <= self.ppo_gamma <= 1 or not 0 <= self.ppo_lambda <= 1,
             "`ppo_gamma` and `ppo_lambda` must be in [0, 1]."),
        ]
        return super().problems() + [(key, message) for key, failed, message in checks if failed]


class _ControllerState:
    """Checkpoint adapter for a KL controller: its current coefficient."""

    def __init__(self, controller: FixedKLController | AdaptiveKLController):
        self.controller = controller

    def state_dict(self) -> dict:
        """The coefficient now."""
        return {"value": self.controller.value}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved coefficient."""
        self.controller.value = state["value"]


def build_ppo(inputs: StageInputs) -> Stage:
    """PPO as the loop's Stage: the shared RL step around PPO's rollout maths and loss."""
    config = inputs.config
    return rl_stage(ppo_parts(inputs), config.train, config.method, config.sampling,
                    rollout_log(config.output, inputs.tokenizer))


def ppo_parts(inputs: StageInputs) -> RLParts:
    """Actor, critic (value head, from the reward model's when shapes agree; none for the critic-free
    estimators), reward and KL controller."""
    config, model = inputs.config, inputs.model
    args: PPOArgs = config.method
    group, critic = args.num_generations, args.has_critic
    scorer, reward_head = make_scorer(args, config.model, inputs.tokenizer, model, config.train.use_cpu)
    if critic:
        value_head = attach_value_head(model)
        if reward_head is not None and reward_head.summary.weight.shape == value_head.summary.weight.shape:
            value_head.load_state_dict(reward_head.state_dict())
    controller = (AdaptiveKLController(args.ppo_kl_coef, args.ppo_target, args.ppo_kl_horizon)
                  if args.ppo_target is not None else FixedKLController(args.ppo_kl_coef))
    settings = rollout_settings(config.sampling, config.train, inputs.tokenizer, group, args)
    stop_ids = stop_token_ids(config.data.template, inputs.tokenizer)
    estimator = KL_ESTIMATORS[args.ppo_kl_estimator]

    def rollout(model: torch.nn.Module, rows: list[dict], seeds: list[int]) -> tuple[Rollout, dict]:
        sampled = sample_and_score(model, rows, settings, scorer, stop_ids, group, with_values=critic,
                                   reference=inputs.reference, seeds=seeds)
        mask = sampled.mask
        kl = estimator(sampled.old_logps, sampled.ref_logps) * mask  # [samples, T]
        scores = sampled.scores if critic else baselined_scores(sampled.scores, group, args.advantage_estimator)
        rewards = token_rewards(scores, kl, mask, controller.value)
        if args.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=total)
        if critic:
            advantages, returns = gae_advantages(rewards, sampled.old_values, mask, args.ppo_gamma, args.ppo_lambda)
            advantages = masked_whiten(advantages, mask, total=total)
        else:
            advantages = critic_free_advantages(rewards, mask, args.ppo_gamma, args.advantage_estimator, total)
            returns = None
        sequence_kl = global_mean(kl.sum(1))
        metrics = {**rollout_metrics(sampled), "kl": sequence_kl, "kl_coef": controller.value,
                   "reward": global_mean(rewards.sum(1))}
        if critic:
            metrics["value"] = masked_mean(sampled.old_values, mask, total).item()
        controller.update(sequence_kl, int(global_count(len(sampled.response_ids))))
        return sampled.with_advantages(advantages, returns, kl), metrics

    def loss(model: torch.nn.Module, part: Rollout) -> tuple[torch.Tensor, dict]:
        logps, entropy, values = response_forward(model, part.prompt_ids, part.response_ids, with_values=critic,
                                                  entropy_grad=args.ppo_ent_coef != 0, **settings.forward)
        if not critic:
            policy, stats = policy_loss(logps, part.old_logps, part.policy_advantages(), part.mask, args.ppo_clip)
            return policy - args.ppo_ent_coef * masked_mean(entropy, part.mask), {"loss/policy": policy.detach(), **stats}
        out = ppo_loss(logps, part.old_logps, values, part.old_values, part.policy_advantages(), part.returns, entropy,
                       part.mask, args.ppo_clip, args.ppo_value_clip, args.ppo_vf_coef, args.ppo_ent_coef)
        return out.loss, {"loss/policy": out.policy.detach(), "loss/value": out.value.detach(), **out.stats}

    return RLParts(rollout, loss, lambda part: float(part.mask.sum()), group, scorer, stop_ids,
                   {"scores": scorer, "kl": _ControllerState(controller)})


def always(config: RunConfig) -> bool:
    """PPO's reward always carries the KL to the reference."""
    return True


STAGE = StageSpec(name="ppo", args=PPOArgs, build_data=build_rl_data, build=build_ppo, needs_reference=always,
                  check=rl_problems, plotted=("score", "kl", "loss/policy", "loss/value", "eval_score"))
