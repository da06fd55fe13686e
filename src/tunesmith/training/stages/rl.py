"""PPO and GRPO stages: prompt data, the rollout (sample, score, advantages) and the loss on a rollout part.

PPO (`stage: ppo`, the book's Algorithm 7.1, as in Ziegler et al. 2019 and TRL's PPO):
    roles   actor = the LoRA adapter; reference = the same model with the adapter off; critic = a value
            head on the actor's last hidden state (initialised from the reward model's head when
            there is one); reward = reward model, function or endpoint
    rollout sample, then r_t = -beta KL_t (+ score on the last token), GAE -> advantages (whitened), returns
    update  ppo_epochs passes of clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy
GRPO (`stage: grpo`): num_generations answers per prompt from one prefilled prompt, group-relative
advantages, no critic, k3 KL to the reference inside the loss. Scores can be normalised (running mean
and std), clipped, and penalised when a response never produced its end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tunesmith.algorithms.gae import gae_advantages
from tunesmith.algorithms.grpo import group_advantages, grpo_loss
from tunesmith.algorithms.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    masked_mean,
    masked_whiten,
    ppo_loss,
    token_rewards,
)
from tunesmith.config import TrainConfig
from tunesmith.data.dataset import load_prompt_conversations, split_train_eval
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.inference.generate import generate, sampling_settings
from tunesmith.model.lora import disable_lora, merged_for_inference
from tunesmith.model.value_head import VALUE_HEAD_FILE, attach_value_head
from tunesmith.training import rewards as reward_sources
from tunesmith.training.loop import RunData, eval_mode
from tunesmith.training.rollout import Rollout, chunked_response_forward, response_forward, response_mask


@dataclass
class RLStage:
    """What the RL loop (training/rl_loop.py) needs from PPO or GRPO."""

    rollout: object
    """rollout(model, prompt rows) -> (Rollout, metrics): sample and score with no gradient."""
    loss: object
    """loss(model, Rollout part) -> (loss, metrics): the objective on a mini-batch of the rollout."""
    samples_per_prompt: int
    """Answers sampled per prompt (1 for PPO, num_generations for GRPO)."""
    controllers: dict
    """Objects with state_dict/load_state_dict that a checkpoint must keep (KL coefficient, score moments)."""
    greedy_scores: object
    """greedy_scores(model, prompt rows) -> raw scores of greedy answers (the held-out evaluation)."""
    loss_items: object
    """loss_items(Rollout part) -> what the part's loss is a mean over (tokens for PPO, answers for GRPO), so
    micro-batches combine into the mean over the whole update, as one big batch would give."""


def build_prompt_rows(config: TrainConfig, tokenizer) -> list[dict]:
    """Each record's prompt (every turn before the last answer, or the whole conversation of a prompt-only
    record), encoded for generation, with its answer (None without one).

    The prompt keeps its last cutoff_len - max_new_tokens tokens, so the generation header survives.
    """
    template = get_template(config.template, tokenizer)
    budget = config.cutoff_len - config.max_new_tokens
    if budget < 1:
        raise TunesmithError(f"cutoff_len ({config.cutoff_len}) must exceed max_new_tokens ({config.max_new_tokens}): "
                             "the prompt and the sampled response share cutoff_len.")
    rows, cut = [], 0
    for messages in load_prompt_conversations(config.dataset, config.dataset_dir, config.max_samples,
                                              config.skip_bad_records):
        answered = messages[-1]["role"] == "assistant"
        prompt_messages = messages[:-1] if answered else messages
        ids = template.encode_prompt(tokenizer, prompt_messages)
        cut += len(ids) > budget
        rows.append({"prompt_ids": ids[-budget:], "messages": prompt_messages,
                     "reference": messages[-1]["content"] if answered else None})
    if cut:
        warnings.warn(f"{cut} of {len(rows)} prompts are longer than cutoff_len - max_new_tokens = {budget} tokens and "
                      "keep only their last tokens (the start, with any system prompt, is cut); raise cutoff_len.",
                      stacklevel=2)
    if config.reward_function and all(row["reference"] is None for row in rows):
        warnings.warn(f"No record of {', '.join(config.dataset)} has an answer, so the reward function's references "
                      "are all None. If the answers are there under another column name, map it as \"response\" "
                      "(alpaca) under \"columns\" in dataset_info.json.", stacklevel=2)
    return rows


def build_reward_source(config: TrainConfig, model=None):
    """(scoring callable, the reward model's value head for the critic or None).

    A LoRA reward model trained on the policy's own base becomes a side adapter of the policy model
    (one copy of the base weights for actor, reference, critic and reward); any other reward model
    is loaded on its own copy of its base.
    """
    if config.reward_function:
        function = reward_sources.load_reward_function(config.reward_function)
        return reward_sources.function_rewards(function, config.reward_function), None
    kind = reward_sources.reward_model_type(config.reward_model, config.reward_model_type)
    if kind == "api":
        return reward_sources.http_rewards(config.reward_model), None
    from tunesmith.model.reward_model import RewardModel  # loads torch models; only when one is used
    reward_model = None
    if kind == "lora" and model is not None:
        reward_model = RewardModel.sharing_base(model, config.reward_model, config.model_name_or_path,
                                                config.adapter_name_or_path)
    if reward_model is None:
        reward_model = RewardModel.load(config.reward_model, trust_remote_code=config.trust_remote_code)
    return reward_sources.model_rewards(reward_model), reward_model.head


class Scorer:
    """Scores, made into training signals: missing-EOS penalty, running normalisation, clipping."""

    def __init__(self, source, tokenizer, config: TrainConfig):
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.moments = RunningMoments()

    def __call__(self, rows: list[dict], responses: list[list[int]], stopped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, training scores), each [samples]; responses are prompt-major (a prompt's group together)."""
        config = self.config
        raw = torch.tensor(self.raw(rows, responses), dtype=torch.float32, device=stopped.device)
        scores = raw.clone()
        if config.ppo_missing_eos_penalty is not None:
            scores = scores - config.ppo_missing_eos_penalty * (~stopped).float()
        if config.ppo_score_norm:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        if config.ppo_score_clip is not None:
            scores = scores.clamp(-config.ppo_score_clip, config.ppo_score_clip)
        return raw, scores

    def raw(self, rows: list[dict], responses: list[list[int]]) -> list[float]:
        """The reward source's scores of the responses (a prompt's samples are consecutive)."""
        per_prompt = len(responses) // len(rows)
        return self.source([reward_sources.Scored(rows[i // per_prompt]["messages"],
                                                  self.tokenizer.decode(response, skip_special_tokens=True),
                                                  rows[i // per_prompt]["reference"])
                            for i, response in enumerate(responses)])

    def greedy_scores(self, model, rows: list[dict], stop_ids: list[int]) -> list[float]:
        settings = sampling_settings(self.config, do_sample=False)
        with merged_for_inference(model):
            generation = generate(model, [row["prompt_ids"] for row in rows], settings, stop_ids,
                                  self.tokenizer.pad_token_id)
        return self.raw(rows, generation.response_ids)

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)


def _forward_args(config: TrainConfig, tokenizer) -> dict:
    """The `response_forward` settings every pass of a run shares (log-probs at the sampling temperature)."""
    return dict(pad_id=tokenizer.pad_token_id, chunk_size=config.logprob_chunk_size, temperature=config.temperature)


@dataclass
class Sampled:
    """What both algorithms take from a batch of prompts before their own maths: the samples and their scores."""

    prompt_ids: list[list[int]]
    responses: list[list[int]]
    mask: torch.Tensor
    old_logps: torch.Tensor
    entropy: torch.Tensor
    old_values: torch.Tensor | None
    ref_logps: torch.Tensor | None
    stopped: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    timings: dict


@torch.no_grad()
def sample_and_score(model, rows: list[dict], config: TrainConfig, tokenizer, scorer: Scorer, stop_ids: list[int],
                     group: int, with_values: bool, with_reference: bool) -> Sampled:
    """Sample `group` answers per prompt, then the policy's log-probs (and values), the reference's, and scores.

    All in eval mode. The policy's no-grad passes share one set of merged weights (one matmul per adapted
    layer); the reward model may share this model (a side adapter), so it scores in eval mode too.
    """
    forward = _forward_args(config, tokenizer)
    micro = config.per_device_train_batch_size * group
    from_sampler = sampler_statistics_are_exact(model)
    with eval_mode(model):
        with merged_for_inference(model):
            start = time.perf_counter()
            generation = generate(model, [row["prompt_ids"] for row in rows], sampling_settings(config), stop_ids,
                                  tokenizer.pad_token_id, num_samples=group, record=from_sampler)
            generated_at = time.perf_counter()
            prompt_ids = [row["prompt_ids"] for row in rows for _ in range(group)]
            responses = generation.response_ids
            if from_sampler:
                old_logps, entropy = generation.logps, generation.entropy
                mask = response_mask(responses, old_logps.device)
                old_values = model.v_head(generation.hidden) * mask if with_values else None
            else:
                old_logps, entropy, old_values = chunked_response_forward(model, prompt_ids, responses, micro,
                                                                          with_values=with_values, **forward)
        ref_logps = None
        if with_reference:
            with disable_lora(model):
                ref_logps = chunked_response_forward(model, prompt_ids, responses, micro, with_values=False,
                                                     **forward)[0]
        stopped = torch.tensor(generation.stopped, device=old_logps.device)
        raw, scores = scorer(rows, responses, stopped)
        timings = {"time/generation": generated_at - start, "time/scoring": time.perf_counter() - generated_at}
    return Sampled(prompt_ids, responses, response_mask(responses, old_logps.device), old_logps, entropy, old_values,
                   ref_logps, stopped, raw, scores, timings)


def sampler_statistics_are_exact(model) -> bool:
    """Whether pi_old, entropy and values may come from the sampler (`generate(record=True)`) instead of
    a forward over the responses: in fp32 with no autocast they agree to float rounding (tested), and a
    forward pass per rollout is saved. In bf16/fp16 the decode's one-row matmuls round differently
    from the batched forward the update runs, so the forward's own numbers are pi_old there."""
    weight = model.get_output_embeddings().weight
    return weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)


def _rollout_metrics(sampled: Sampled) -> dict:
    raw, mask = sampled.raw_scores, sampled.mask
    return {"score": raw.mean().item(), "score_std": raw.std().item() if len(raw) > 1 else 0.0,
            "response_length": mask.sum(1).mean().item(), "eos_share": sampled.stopped.float().mean().item(),
            "entropy": masked_mean(sampled.entropy, mask).item(), **sampled.timings}


def build_ppo_stage(model, config: TrainConfig, tokenizer) -> RLStage:
    source, reward_head = build_reward_source(config, model)
    critic = attach_value_head(model)
    if reward_head is not None and reward_head.summary.weight.shape == critic.summary.weight.shape:
        critic.load_state_dict(reward_head.state_dict())
    scorer = Scorer(source, tokenizer, config)
    controller = (AdaptiveKLController(config.ppo_kl_coef, config.ppo_target, config.ppo_kl_horizon)
                  if config.ppo_target is not None else FixedKLController(config.ppo_kl_coef))
    stop_ids = get_template(config.template, tokenizer).stop_token_ids(tokenizer)
    forward = _forward_args(config, tokenizer)
    estimator = KL_ESTIMATORS[config.ppo_kl_estimator]

    def rollout(model, rows: list[dict]) -> tuple[Rollout, dict]:
        sampled = sample_and_score(model, rows, config, tokenizer, scorer, stop_ids, 1, with_values=True,
                                   with_reference=True)
        mask, values = sampled.mask, sampled.old_values
        kl = estimator(sampled.old_logps, sampled.ref_logps) * mask  # [samples, T]
        rewards = token_rewards(sampled.scores, kl, mask, controller.value)
        if config.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, config.ppo_gamma, config.ppo_lambda)
        advantages = masked_whiten(advantages, mask)
        sequence_kl = kl.sum(1).mean().item()
        metrics = {**_rollout_metrics(sampled), "kl": sequence_kl, "kl_coef": controller.value,
                   "reward": rewards.sum(1).mean().item(), "value": masked_mean(values, mask).item()}
        controller.update(sequence_kl, len(sampled.responses))
        return Rollout(sampled.prompt_ids, sampled.responses, mask, sampled.old_logps, advantages, sampled.ref_logps,
                       values, returns), metrics

    def loss(model, part: Rollout) -> tuple[torch.Tensor, dict]:
        logps, entropy, values = response_forward(model, part.prompt_ids, part.response_ids, with_values=True,
                                                  entropy_grad=config.ppo_ent_coef != 0, **forward)
        out = ppo_loss(logps, part.old_logps, values, part.old_values, part.advantages, part.returns, entropy,
                       part.mask, config.ppo_clip, config.ppo_value_clip, config.ppo_vf_coef, config.ppo_ent_coef)
        stats = {"loss/policy": out.policy.detach(), "loss/value": out.value.detach(), **out.stats}
        return out.loss, stats

    return RLStage(rollout, loss, 1, {"scores": scorer, "kl": _ControllerState(controller)},
                   partial(scorer.greedy_scores, stop_ids=stop_ids), lambda part: float(part.mask.sum()))


def build_grpo_stage(model, config: TrainConfig, tokenizer) -> RLStage:
    source, _ = build_reward_source(config, model)
    scorer = Scorer(source, tokenizer, config)
    stop_ids = get_template(config.template, tokenizer).stop_token_ids(tokenizer)
    forward = {**_forward_args(config, tokenizer), "with_values": False, "entropy_grad": False}
    group = config.num_generations

    def rollout(model, rows: list[dict]) -> tuple[Rollout, dict]:
        sampled = sample_and_score(model, rows, config, tokenizer, scorer, stop_ids, group, with_values=False,
                                   with_reference=config.ppo_kl_coef > 0)
        advantages, zero_std = group_advantages(sampled.scores, group, config.grpo_scale_rewards)
        metrics = {**_rollout_metrics(sampled), "reward": sampled.scores.mean().item(),
                   "zero_std_share": zero_std.float().mean().item()}
        return Rollout(sampled.prompt_ids, sampled.responses, sampled.mask, sampled.old_logps, advantages,
                       sampled.ref_logps), metrics

    def loss(model, part: Rollout) -> tuple[torch.Tensor, dict]:
        logps, _, _ = response_forward(model, part.prompt_ids, part.response_ids, **forward)
        return grpo_loss(logps, part.old_logps, part.ref_logps, part.advantages, part.mask, config.ppo_clip,
                         config.ppo_kl_coef)

    return RLStage(rollout, loss, group, {"scores": scorer}, partial(scorer.greedy_scores, stop_ids=stop_ids), len)


class _ControllerState:
    """Checkpoint adapter for a KL controller: its current coefficient."""

    def __init__(self, controller):
        self.controller = controller

    def state_dict(self) -> dict:
        return {"value": self.controller.value}

    def load_state_dict(self, state: dict) -> None:
        self.controller.value = state["value"]


BUILDERS = {"ppo": build_ppo_stage, "grpo": build_grpo_stage}


def _check_reward_source(config: TrainConfig) -> None:
    """A missing reward model folder or function stops the run before the policy model loads."""
    if config.reward_function:
        function = reward_sources.load_reward_function(config.reward_function)
        reward_sources.function_rewards(function, config.reward_function)  # checks its signature
        return
    kind = reward_sources.reward_model_type(config.reward_model, config.reward_model_type)
    if kind != "api" and not (Path(config.reward_model) / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(f"reward_model: {config.reward_model} is not a reward model folder (no {VALUE_HEAD_FILE}). "
                             "Point it at the output_dir of a `stage: rm` run, or at an http(s) scoring URL.")


def build_rl(config: TrainConfig, tokenizer, device: torch.device):
    """Prompt rows (with an optional eval split for held-out rewards), and the stage for the loaded model."""
    _check_reward_source(config)
    rows = build_prompt_rows(config, tokenizer)
    evaluation = []
    if config.eval_dataset:
        evaluation = build_prompt_rows(_with_dataset(config, config.eval_dataset), tokenizer)
    elif config.val_size > 0:
        rows, evaluation = split_train_eval(rows, config.val_size, config.seed)
    if config.per_device_train_batch_size * config.gradient_accumulation_steps * config.ppo_buffer_size > len(rows):
        warnings.warn(f"a PPO step asks for more prompts than the {len(rows)} the dataset has; steps will be smaller.",
                      stacklevel=2)

    def make_stage(model, data: RunData) -> RLStage:
        return BUILDERS[config.stage](model, config, tokenizer)

    return RunData(train=rows, eval=evaluation, collate=None), make_stage


def _with_dataset(config: TrainConfig, dataset: list[str]) -> TrainConfig:
    return dataclasses.replace(config, dataset=dataset)
