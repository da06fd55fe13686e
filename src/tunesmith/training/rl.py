"""What PPO and GRPO share: their config keys, prompt data, and the RL training step.

A step, as in TRL and LLaMA-Factory, is one rollout batch of per_device_train_batch_size x
gradient_accumulation_steps x ppo_buffer_size prompts (times num_generations answers for GRPO), then
ppo_epochs passes over it; each optimizer update takes per_device_train_batch_size x
gradient_accumulation_steps prompts' samples, in micro-batches of per_device_train_batch_size prompts,
weighted by what each part's loss is a mean over, so accumulation equals one big batch. With an eval
split, the held-out metric is the mean score of greedy answers to its prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from tunesmith.algorithms.ppo import masked_mean
from tunesmith.config import DataArgs, ModelArgs, OptimArgs, RunConfig, SamplingSettings
from tunesmith.data.dataset import load_prompt_conversations, train_and_eval_rows
from tunesmith.data.encode import text_char_limit
from tunesmith.data.registry import resolve_dataset
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.model.value_head import ValueHead
from tunesmith.training.distributed import all_sum, sum_over_ranks
from tunesmith.training.loop import RunData, Stage, StepOutput, Updates
from tunesmith.training.rewards import REWARD_MODEL_TYPES
from tunesmith.training.rollout import Rollout, RolloutSettings
from tunesmith.training.rollout_log import RolloutLog
from tunesmith.training.scoring import Scorer, build_reward_source, check_reward_source


@dataclass
class RLArgs:
    """ppo and grpo: the reward source, the rollout batch and the clipped update."""

    section: ClassVar[str] = "rl"
    default_kl_coef: ClassVar[float] = 0.05
    reward_model: str | None = None
    """ppo/grpo: a `stage: rm` output folder (LoRA adapter or full model), or an http(s) URL that scores conversations."""
    reward_model_type: str | None = None
    """lora, full or api; read from reward_model when unset (LLaMA-Factory's key)."""
    reward_function: str | None = None
    """ppo/grpo: `module:function` or `path/to/file.py:function` giving one reward per completion (instead of reward_model); several, comma-separated, are summed."""
    reward_weights: list | None = None
    """ppo/grpo: one weight per reward_function (comma list, e.g. 1.0,0.5); default 1 each."""
    num_generations: int | None = None
    """Answers sampled per prompt: grpo's group size G (default 4); ppo: default 4 for advantage_estimator grpo and rloo (which compare them), else 1."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    ppo_buffer_size: int = 1
    """Rollouts per PPO step, in optimizer mini-batches (per_device_train_batch_size x gradient_accumulation_steps prompts each)."""
    ppo_clip: float = 0.2
    """Clip range eps of the policy ratio."""
    ppo_ent_coef: float = 0.0
    """Weight c2 of the entropy bonus."""
    ppo_kl_coef: float | None = None
    """Weight beta of the KL to the reference (initial value when adaptive). Default: 0.05 for ppo, 0.04 for grpo."""
    ppo_score_norm: bool = False
    """Normalise scores by their running mean and std."""
    ppo_score_clip: float | None = None
    """Clip (normalised) scores to [-clip, clip]."""
    ppo_missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that never produced its end-of-turn token."""
    rollout_engine: bool = False
    """Sample rollouts on the decode scheduler, the reference (LoRA off) and a reward model sharing the base running as rows beside the policy's, instead of `generate` and then a forward per model."""
    rollout_dtype: str | None = None
    """bf16 or fp16: sample rollouts under autocast to this dtype (as RL stacks sample with a bf16 engine); pi_old is then the learner's own forward. Pays only where the hardware computes that dtype fast."""
    rollout_is_cap: float | None = None
    """Truncated importance sampling: where the sampler is not the learner (rollout_dtype, or a bf16 run), weigh each token's policy-gradient term by min(pi_old / pi_sampler, cap); 2 is the usual cap. Unset: no correction."""

    def resolve(self) -> None:
        """The KL weight's default depends on the algorithm; reward weights are numbers."""
        if self.ppo_kl_coef is None:
            self.ppo_kl_coef = self.default_kl_coef
        if self.reward_weights is not None:
            try:
                self.reward_weights = [float(weight) for weight in self.reward_weights]
            except ValueError:
                pass  # problems() names the bad weight

    def problems(self) -> list[tuple[str, str]]:
        """One reward source, and update settings in range."""
        checks = [
            ("reward_model", (self.reward_model is None) == (self.reward_function is None),
             "reinforcement learning (stage ppo or grpo) needs exactly one of `reward_model` (a `stage: rm` output "
             "folder or an http URL) and `reward_function` (module:function)."),
            ("reward_model_type", self.reward_model_type is not None and self.reward_model_type not in REWARD_MODEL_TYPES,
             f"`reward_model_type: {self.reward_model_type}` is not supported; choose one of "
             f"{', '.join(REWARD_MODEL_TYPES)}."),
            ("reward_weights", self.reward_weights is not None and not all(
                isinstance(weight, float) for weight in self.reward_weights),
             f"`reward_weights` must be numbers, one per reward_function, got {self.reward_weights}."),
            ("reward_weights", self.reward_weights is not None and self.reward_function is None,
             "`reward_weights` weighs reward functions; set `reward_function` (comma-separated) too."),
            ("ppo_epochs", self.ppo_epochs < 1, "`ppo_epochs` must be at least 1."),
            ("ppo_buffer_size", self.ppo_buffer_size < 1, "`ppo_buffer_size` must be at least 1."),
            ("ppo_clip", self.ppo_clip <= 0, "`ppo_clip` and `ppo_value_clip` must be positive."),
            ("ppo_kl_coef", self.ppo_kl_coef < 0, f"`ppo_kl_coef` must not be negative, got {self.ppo_kl_coef}."),
            ("ppo_score_clip", self.ppo_score_clip is not None and self.ppo_score_clip <= 0,
             "`ppo_score_clip` must be positive."),
            ("rollout_dtype", self.rollout_dtype not in (None, *SAMPLER_DTYPES),
             f"`rollout_dtype: {self.rollout_dtype}` is not supported; choose {' or '.join(SAMPLER_DTYPES)}, or remove "
             "it to sample in the training precision."),
            ("rollout_is_cap", self.rollout_is_cap is not None and self.rollout_is_cap <= 0,
             f"`rollout_is_cap` must be positive (2 is usual), got {self.rollout_is_cap}."),
        ]
        return [(key, message) for key, failed, message in checks if failed]


def rl_problems(config: RunConfig, command: str) -> list[tuple[str, str]]:
    """What PPO and GRPO need from the other sections: a LoRA policy and a sampler that is the policy."""
    stage, sampling = config.stage, config.sampling
    checks = [
        ("repetition_penalty", command == "train" and sampling.repetition_penalty != 1,
         f"stage {stage} needs `repetition_penalty: 1`: a penalised sampler is not the policy whose log-probs are trained."),
        ("do_sample", not sampling.do_sample or sampling.temperature == 0,
         f"stage {stage} learns from sampled answers: set `do_sample: true` and a `temperature` above 0 "
         "(e.g. 1.0); greedy decoding would give every sample of a prompt the same answer."),
        ("finetuning_type", not config.adapter.is_lora,
         f"stage {stage} trains a LoRA adapter (the reference is the model with it switched off); set `finetuning_type: lora`."),
    ]
    return [(key, message) for key, failed, message in checks if failed]


def build_prompt_rows(dataset: list[str], data: DataArgs, max_new_tokens: int, tokenizer: object,
                      warn_unanswered: bool = False) -> list[dict]:
    """Each record's prompt (every turn before the last answer, or the whole conversation of a prompt-only
    record), encoded for generation, with its answer (None without one).

    The prompt keeps its last cutoff_len - max_new_tokens tokens, so the generation header survives.
    `warn_unanswered` (a reward function reads the answers as references) warns when no record has one.
    """
    template = get_template(data.template, tokenizer)
    budget = data.cutoff_len - max_new_tokens
    if budget < 1:
        raise TunesmithError(f"cutoff_len ({data.cutoff_len}) must exceed max_new_tokens ({max_new_tokens}): "
                             "the prompt and the sampled response share cutoff_len.")
    rows, cut, limit = [], 0, text_char_limit(tokenizer, data.cutoff_len)
    for messages in load_prompt_conversations(dataset, data.dataset_dir, data.max_samples, data.skip_bad_records):
        answered = messages[-1]["role"] == "assistant"
        prompt_messages = messages[:-1] if answered else messages
        # A prompt keeps its last tokens: a text far beyond cutoff_len keeps its end, so memory follows cutoff_len
        prompt_messages = [{**m, "content": m["content"][-limit:]} for m in prompt_messages]
        ids = template.encode_prompt(tokenizer, prompt_messages)
        cut += len(ids) > budget
        rows.append({"prompt_ids": ids[-budget:], "messages": prompt_messages,
                     "reference": messages[-1]["content"] if answered else None})
    if cut:
        warnings.warn(f"{cut} of {len(rows)} prompts are longer than cutoff_len - max_new_tokens = {budget} tokens and "
                      "keep only their last tokens (the start, with any system prompt, is cut); raise cutoff_len.",
                      stacklevel=2)
    from_pairs = any(resolve_dataset(name, data.dataset_dir).ranking for name in dataset)  # already told
    if warn_unanswered and not from_pairs and all(row["reference"] is None for row in rows):
        warnings.warn(f"No record of {', '.join(dataset)} has an answer, so the reward function's references "
                      "are all None. If the answers are there under another column name, map it as \"response\" "
                      "(alpaca) under \"columns\" in dataset_info.json.", stacklevel=2)
    return rows


def build_rl_data(config: RunConfig, tokenizer: object, device: torch.device) -> RunData:
    """Prompt rows (with an optional eval split for held-out rewards); the reward source is checked first."""
    rl, data, optim = config.method, config.data, config.train
    check_reward_source(rl.reward_model, rl.reward_model_type, rl.reward_function, rl.reward_weights)
    encode = partial(build_prompt_rows, data=data, max_new_tokens=config.sampling.max_new_tokens, tokenizer=tokenizer,
                     warn_unanswered=rl.reward_function is not None)
    rows, evaluation = train_and_eval_rows(encode, data.dataset, data.eval_dataset, data.val_size, optim.seed)
    for index, row in enumerate(rows):  # names the prompt in its answers' seeds (answer_seed)
        row["index"] = index
    if optim.batch_rows * rl.ppo_buffer_size > len(rows):
        warnings.warn(f"a PPO step asks for more prompts than the {len(rows)} the dataset has; steps will be smaller.",
                      stacklevel=2)
    return RunData(train=rows, eval=evaluation)


@dataclass
class RLParts:
    """What one algorithm (PPO, GRPO) adds to the shared RL step."""

    rollout: Callable[[torch.nn.Module, list[dict], list[int]], tuple[Rollout, dict]]
    """rollout(model, prompt rows, seeds) -> (Rollout with advantages, metrics): sample (answer k of the
    rows, prompt-major, from its own seed) and score, no gradient; statistics over every rank."""
    loss: Callable[[torch.nn.Module, Rollout], tuple[torch.Tensor, dict]]
    """loss(model, rollout part) -> (loss, metrics): the objective on a micro-batch of the rollout."""
    loss_items: Callable[[Rollout], float]
    """What a part's loss is a mean over (tokens for PPO, answers for GRPO)."""
    samples_per_prompt: int
    scorer: Scorer
    stop_ids: list[int]
    state: dict


def make_scorer(rl: RLArgs, base: ModelArgs, tokenizer: object, model: torch.nn.Module,
                use_cpu: bool = False) -> tuple[Scorer, ValueHead | None]:
    """The run's Scorer, and the reward model's value head (None for functions and endpoints)."""
    source, reward_head = build_reward_source(rl.reward_model, rl.reward_model_type, rl.reward_function, base,
                                              model, use_cpu, rl.reward_weights)
    return Scorer(source, tokenizer, rl.ppo_missing_eos_penalty, rl.ppo_score_norm, rl.ppo_score_clip), reward_head


SAMPLER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rollout_settings(sampling: SamplingSettings, optim: OptimArgs, tokenizer: object, group: int,
                     rl: RLArgs | None = None) -> RolloutSettings:
    """Sampling and forward settings of a run's rollouts (forwards in chunks of one micro-batch's samples)."""
    return RolloutSettings(sampling, tokenizer.pad_token_id, optim.logprob_chunk_size,
                           optim.per_device_train_batch_size * group, rl is not None and rl.rollout_engine,
                           None if rl is None or rl.rollout_dtype is None else SAMPLER_DTYPES[rl.rollout_dtype],
                           None if rl is None else rl.rollout_is_cap)


def stop_token_ids(template: str | None, tokenizer: object) -> list[int]:
    """The tokens that end an answer under the run's template."""
    return get_template(template, tokenizer).stop_token_ids(tokenizer)


def rl_stage(parts: RLParts, optim: OptimArgs, rl: RLArgs, sampling: SamplingSettings,
             log: RolloutLog | None = None) -> Stage:
    """The loop's Stage for PPO or GRPO: a step is one rollout, then ppo_epochs of updates on it; `log` keeps
    each step's first answers for rollouts.jsonl (written when the loop calls `log_samples`)."""
    group = parts.samples_per_prompt
    greedy = dataclasses.replace(sampling, do_sample=False)
    counter = StepCounter()

    def step(model: torch.nn.Module, rows: list[dict], updates: Updates) -> StepOutput:
        step_start = time.perf_counter()
        seeds = [answer_seed(optim.seed, counter.steps, row["index"], k) for row in rows for k in range(group)]
        counter.steps += 1
        with updates.autocast():
            rollout, metrics = parts.rollout(model, rows, seeds)
        if log is not None:
            log.keep(rollout, group)
        update_start = time.perf_counter()
        metrics.update(update(model, parts, rollout, rl.ppo_epochs, optim.batch_rows * group,
                              optim.per_device_train_batch_size * group, updates))
        metrics["time/update"] = time.perf_counter() - update_start
        metrics["step_seconds"] = time.perf_counter() - step_start
        tokens = sum(len(p) + len(r) for p, r in zip(rollout.prompt_ids, rollout.response_ids))
        metrics["tokens_per_second"] = tokens / metrics["step_seconds"]  # the step's own rate, not the window's
        return StepOutput(metrics, items=1, tokens=tokens)

    def evaluate(model: torch.nn.Module, rows: list[dict]) -> dict[str, float]:
        scores = []
        for first in range(0, len(rows), optim.per_device_eval_batch_size):
            scores += parts.scorer.greedy_scores(model, rows[first:first + optim.per_device_eval_batch_size], greedy,
                                                 parts.stop_ids)
        return {"eval_score": sum(scores) / max(len(scores), 1)}

    return Stage(rows_per_step=optim.batch_rows * rl.ppo_buffer_size, step=step, evaluate=evaluate,
                 headline=("score", "reward", "kl"), state={**parts.state, "sampling": counter},
                 log_samples=None if log is None else log.write)


class StepCounter:
    """RL steps taken, which seed each step's answers (kept by checkpoints, so a resume samples the same)."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict:
        """The step count."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count."""
        self.steps = state["steps"]


def answer_seed(seed: int, step: int, row_index: int, sample: int) -> int:
    """The seed of one sampled answer: a hash of the run's seed, the RL step, the prompt and the sample, so
    an answer is the same whichever rank samples it and whatever else is in its batch."""
    digest = hashlib.blake2b(f"{seed}/{step}/{row_index}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def update(model: torch.nn.Module, parts: RLParts, rollout: Rollout, epochs: int, update_size: int, micro_size: int,
           updates: Updates) -> dict:
    """`epochs` passes over the rollout in shuffled mini-batches; returns the mean loss statistics."""
    sums, count = {}, 0
    for _ in range(epochs):
        order = torch.randperm(len(rollout)).tolist()
        for first in range(0, len(order), update_size):
            chosen = order[first:first + update_size]
            pieces = [rollout.select(chosen[i:i + micro_size]) for i in range(0, len(chosen), micro_size)]
            items = [parts.loss_items(piece) for piece in pieces]
            global_items = updates.global_count(sum(items))  # over every rank's mini-batch
            if not global_items:  # every answer masked out (e.g. all groups dropped): nothing to learn
                continue
            for piece, piece_items in zip(pieces, items):
                with updates.autocast():
                    loss, stats = parts.loss(model, piece)
                share = piece_items / global_items  # the piece's loss is a mean over its items
                updates.backward(loss * share)
                for key, value in {"loss": loss.detach(), **stats}.items():  # this rank's share of the mean
                    sums[key] = sums.get(key, 0.0) + value * share * updates.parallel.proc.world_size
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + updates.step()
            count += 1
    return {key: float(value) / max(count, 1) for key, value in sums.items()}


def rollout_metrics(rollout: Rollout) -> dict:
    """The statistics every RL stage logs about its samples, over every rank's samples."""
    raw, mask = rollout.raw_scores, rollout.mask
    return {"score": global_mean(raw), "score_std": global_std(raw),
            "response_length": global_mean(mask.sum(1)), "eos_share": global_mean(rollout.stopped.float()),
            "entropy": masked_mean(rollout.entropy, mask, sum_over_ranks).item(), **rollout.timings,
            **sampler_metrics(rollout),
            **{f"rewards/{name}": global_mean(torch.tensor(values, dtype=torch.float64, device=raw.device))
               for name, values in rollout.reward_parts.items()}}


def sampler_metrics(rollout: Rollout, in_update: bool = False) -> dict:
    """Where the sampler is not the learner: how far apart they are (mean |log pi_old - log pi_sampler| per
    token) and the mean importance weight; over every rank's tokens, or with `in_update` as a loss's
    statistics over its own part (where pi_old comes from the update: `Rollout.with_update_old`)."""
    metrics = {}
    mean = (lambda values: masked_mean(values.detach(), rollout.mask)) if in_update else (  # noqa: E731
        lambda values: masked_mean(values, rollout.mask, sum_over_ranks).item())
    if rollout.sampler_logps is not None and rollout.old_logps is not None:
        metrics["rollout_is/log_ratio"] = mean((rollout.old_logps - rollout.sampler_logps).abs())
    if rollout.is_weights is not None:
        metrics["rollout_is/weight"] = mean(rollout.is_weights)
    return metrics


def global_mean(values: torch.Tensor) -> float:
    """The mean of `values` over every rank's (a plain mean in one process)."""
    values = values.detach().double().reshape(-1)
    sums = sum_over_ranks(torch.stack([values.sum(), values.new_tensor(values.numel())]))
    return (sums[0] / sums[1].clamp(min=1)).item()


def global_std(values: torch.Tensor) -> float:
    """The sample std (n - 1) of `values` over every rank's; 0 for a single value."""
    count = global_count(values.numel())
    if count < 2:
        return 0.0
    mean = global_mean(values)
    return (global_mean((values.detach().double() - mean) ** 2) * count / (count - 1)) ** 0.5


def global_count(count: int) -> float:
    """A count summed over ranks."""
    return float(all_sum([float(count)])[0])
