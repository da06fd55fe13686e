"""Scores for RL rollouts: the reward source a run names, and the scores made into training signals.

A run's reward comes from exactly one of a reward model (a `stage: rm` folder: LoRA adapter or full
model, or an http(s) endpoint) and a reward function (`module:function` or `file.py:function`); see
training/rewards.py for each. A LoRA reward model trained on the policy's own base becomes a side
adapter of the policy model: one copy of the base weights for actor, reference, critic and reward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.algorithms.ppo import RunningMoments
from tunesmith.config import ModelArgs, SamplingSettings
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import merged_for_inference
from tunesmith.model.value_head import VALUE_HEAD_FILE, ValueHead
from tunesmith.sampling.generate import generate
from tunesmith.training import rewards as reward_sources
from tunesmith.training.distributed import sum_over_ranks
from tunesmith.training.engine_rollout import RewardRows


def check_reward_source(reward_model: str | None, reward_model_type: str | None, reward_function: str | None,
                        reward_weights: list[float] | None = None) -> None:
    """A missing reward model folder or function stops the run before the policy model loads."""
    if reward_function:
        function_source(reward_function, reward_weights)  # loads each function and checks its signature
        return
    kind = reward_sources.reward_model_type(reward_model, reward_model_type)
    if kind != "api" and not (Path(reward_model) / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(f"reward_model: {reward_model} is not a reward model folder (no {VALUE_HEAD_FILE}). "
                             "Point it at the output_dir of a `stage: rm` run, or at an http(s) scoring URL.")


def function_source(reward_function: str, reward_weights: list[float] | None = None) -> reward_sources.RewardSource:
    """One reward function, or several (comma-separated) summed with their weights."""
    specs = reward_sources.reward_function_specs(reward_function)
    if len(specs) == 1 and reward_weights is None:
        return reward_sources.function_rewards(reward_sources.load_reward_function(specs[0]), specs[0])
    return reward_sources.WeightedRewards(specs, reward_weights)


def build_reward_source(reward_model: str | None, reward_model_type: str | None, reward_function: str | None,
                        base: ModelArgs, model: torch.nn.Module | None = None, use_cpu: bool = False,
                        reward_weights: list[float] | None = None
                        ) -> tuple[reward_sources.RewardSource, ValueHead | None]:
    """(scoring callable, the reward model's value head for the critic or None).

    A LoRA reward model trained on `base` becomes a side adapter of `model`; any other reward model is
    loaded on its own copy of its base.
    """
    if reward_function:
        return function_source(reward_function, reward_weights), None
    kind = reward_sources.reward_model_type(reward_model, reward_model_type)
    if kind == "api":
        return reward_sources.http_rewards(reward_model), None
    from tunesmith.model.reward_model import RewardModel  # loads torch models; only when one is used
    loaded = None
    if kind == "lora" and model is not None:
        loaded = RewardModel.sharing_base(model, reward_model, base.model_name_or_path, base.adapter_name_or_path)
    if loaded is None:
        loaded = RewardModel.load(reward_model, trust_remote_code=base.trust_remote_code, use_cpu=use_cpu)
    return reward_sources.ModelRewards(loaded), loaded.head


class Scorer:
    """Scores, made into training signals: missing-EOS penalty, running normalisation, clipping."""

    def __init__(self, source: Callable, tokenizer: object, missing_eos_penalty: float | None, normalise: bool,
                 clip: float | None):
        self.source, self.tokenizer = source, tokenizer
        self.missing_eos_penalty, self.normalise, self.clip = missing_eos_penalty, normalise, clip
        self.moments = RunningMoments()

    def __call__(self, rows: list[dict], responses: list[list[int]], stopped: torch.Tensor,
                 known: list[float | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, training scores), each [samples]; responses are prompt-major (a prompt's group together).
        `known` scores (a reward row's, see engine_rollout.py) are taken as they are; the source scores the rest."""
        raw = torch.tensor(self.raw(rows, responses, known), dtype=torch.float32, device=stopped.device)
        scores = raw.clone()
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~stopped).float()
        if self.normalise:
            self.moments.update(scores, sum_over_ranks)  # the whole global batch's moments
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return raw, scores

    def raw(self, rows: list[dict], responses: list[list[int]], known: list[float | None] | None = None) -> list[float]:
        """The reward source's scores of the responses (a prompt's samples are consecutive), but where `known`."""
        per_prompt = len(responses) // len(rows)
        values = list(known) if known is not None else [None] * len(responses)
        missing = [i for i, value in enumerate(values) if value is None]
        if missing:
            scored = self.source([reward_sources.Scored(rows[i // per_prompt]["messages"], self.decode(responses[i]),
                                                        rows[i // per_prompt]["reference"]) for i in missing])
            for i, value in zip(missing, scored):
                values[i] = value
        return values

    def decode(self, response: list[int]) -> str:
        """An answer's text as the reward source sees it."""
        return self.tokenizer.decode(response, skip_special_tokens=True)

    def reward_rows(self, policy: torch.nn.Module) -> RewardRows | None:
        """The reward model as rows beside the policy's in a rollout, when it is a side adapter of `policy`."""
        reward_model = getattr(self.source, "reward_model", None)
        if reward_model is None or reward_model.side is None or reward_model.model is not policy:
            return None
        return RewardRows(reward_model.side, reward_model.head, reward_model.encode, self.decode)

    def parts(self) -> dict[str, list[float]]:
        """Each reward function's scores of the latest batch, by name (empty for a single source)."""
        return dict(getattr(self.source, "last", {}))

    def greedy_scores(self, model: torch.nn.Module, rows: list[dict], sampling: SamplingSettings,
                      stop_ids: list[int]) -> list[float]:
        """Raw scores of the greedy answers to `rows`' prompts (the held-out reward)."""
        with merged_for_inference(model):
            generation = generate(model, [row["prompt_ids"] for row in rows], sampling, stop_ids,
                                  self.tokenizer.pad_token_id)
        return self.raw(rows, generation.response_ids)

    def state_dict(self) -> dict:
        """The running score moments (a resumed run normalises as the uninterrupted one did)."""
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the running score moments."""
        self.moments.load_state_dict(state)
