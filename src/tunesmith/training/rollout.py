"""Rollouts for PPO and GRPO: sample responses to a batch of prompts, then score them token by token.

A `Rollout` holds, per response token, what the update needs: the log-prob under the policy that
sampled it (pi_old), under the reference (training/reference.py), the critic's value (PPO), and the
sequence's score from the reward source; the algorithm then fills in advantages (and returns). The
per-token numbers come from one packed forward per model over prompt + response (`response_forward`),
run in eval mode: the values a rollout remembers must not be one dropout sample. In fp32, pi_old and
the values come from the sampler itself (`sampler_statistics_are_exact`), which saves the policy's forward.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields, replace

import torch

from tunesmith.algorithms.importance import truncated_is_weights
from tunesmith.algorithms.logprobs import chunked_logprobs_entropy_at
from tunesmith.config import SamplingSettings
from tunesmith.data.packing import pack_answers
from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.model.forward import backbone_hidden, device_multiple
from tunesmith.model.lora import merged_for_inference
from tunesmith.sampling.generate import generate
from tunesmith.training import engine_rollout
from tunesmith.training.engine_rollout import engine_sample
from tunesmith.training.loop import eval_mode
from tunesmith.training.reference import Reference
from tunesmith.training.scoring import Scorer


@dataclass
class Rollout:
    """A batch of sampled responses; token tensors are [samples, longest response], right-padded.

    Samples are prompt-major: a prompt's group of answers (GRPO) sits together.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    mask: torch.Tensor
    """1.0 on real response tokens."""
    old_logps: torch.Tensor | None
    """log pi_old of each response token, at the sampling temperature; None where the update's own first
    forward gives it (`RolloutSettings.old_from_update`: `with_update_old` fills it in)."""
    entropy: torch.Tensor
    """Entropy of the distribution each token was drawn from (a statistic)."""
    stopped: torch.Tensor
    """[samples] whether the response ended with its stop token."""
    raw_scores: torch.Tensor
    """[samples] the reward source's scores."""
    scores: torch.Tensor
    """[samples] scores as training signals (EOS penalty, normalisation, clipping applied; GRPO adds its
    overlong penalty)."""
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    """With `rollout_dtype`: log-prob of each token under the sampler that drew it (not the learner's pi_old)."""
    is_weights: torch.Tensor | None = None
    """With `rollout_is_cap`: [samples, T] truncated importance weights min(pi_old / pi_sampler, cap), which
    scale each token's policy-gradient term (algorithms/importance.py)."""
    advantages: torch.Tensor | None = None
    """[samples, T] for PPO; [samples] (one per answer) for GRPO. Set by the algorithm."""
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    """[samples, T] the per-token KL estimate the algorithm used (for rollouts.jsonl). Set by the algorithm."""
    timings: dict = field(default_factory=dict)
    reward_parts: dict = field(default_factory=dict)
    """With several reward functions, each one's scores of these samples, by name (for the logs)."""

    def __len__(self) -> int:
        return len(self.response_ids)

    def policy_advantages(self) -> torch.Tensor:
        """The advantages of the policy-gradient term: with importance weights, w * A per token [samples, T]."""
        if self.is_weights is None:
            return self.advantages
        advantages = self.advantages if self.advantages.ndim == 2 else self.advantages[:, None]
        return advantages * self.is_weights.to(advantages.dtype)

    def with_update_old(self, logps: torch.Tensor, is_cap: float | None) -> Rollout:
        """This part with pi_old (and the importance weights against the sampler) taken from the update's
        forward `logps`, where the rollout left them to it: before the update's one optimizer step the
        learner is still pi_old, so its detached log-probs are pi_old exactly, as TRL's GRPOTrainer takes
        them with one update per generation. A part with pi_old already is returned as it is."""
        if self.old_logps is not None:
            return self
        old_logps = logps.detach()
        is_weights = None
        if is_cap is not None and self.sampler_logps is not None:
            is_weights = truncated_is_weights(old_logps, self.sampler_logps, self.mask, is_cap)
        return replace(self, old_logps=old_logps, is_weights=is_weights)

    def with_advantages(self, advantages: torch.Tensor, returns: torch.Tensor | None = None,
                        kl: torch.Tensor | None = None) -> Rollout:
        """The rollout with the algorithm's advantages (and, for PPO, the critic's returns and its KL) filled in."""
        return replace(self, advantages=advantages, returns=returns, kl=kl)

    def select(self, indices: list[int]) -> Rollout:
        """The samples at `indices`, token tensors cut to their own longest response."""
        width = max(len(self.response_ids[i]) for i in indices)
        index = torch.tensor(indices, device=self.mask.device)
        picked = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):
                picked[item.name] = [value[i] for i in indices]
            elif isinstance(value, torch.Tensor):
                value = value[index]
                picked[item.name] = value[:, :width] if value.ndim == 2 else value
        return replace(self, **picked)

def response_mask(response_ids: list[list[int]], device: torch.device) -> torch.Tensor:
    """[samples, longest response] 1.0 on each response's real tokens."""
    width = max(len(r) for r in response_ids)
    lengths = torch.tensor([len(r) for r in response_ids], device=device)
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def response_forward(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                     chunk_size: int, temperature: float, with_values: bool, entropy_grad: bool = True):
    """(log-probs, entropies, values or None) of every response token, each [samples, longest response].

    The sequences run as one packed row (attention per sequence, no padding computed), and a GRPO group's
    answers share one run of their prompt (`pack_answers`) where the model takes tunesmith's attention;
    only the positions that predict a response token are projected through lm_head and the value head.
    `entropy_grad=False` when the loss has no entropy term: the entropies are then statistics only.
    """
    device = next(model.parameters()).device
    share = shares_prompts(model)
    row = pack_answers(prompt_ids, response_ids, pad_id, device_multiple(device), share_prompts=share).to(device)
    rows = backbone_hidden(model, row)[0, row.predict_positions]  # [response tokens, hidden]
    logps, entropy = chunked_logprobs_entropy_at(rows, model.get_output_embeddings(), row.targets,
                                                 chunk_size, temperature, entropy_grad)
    mask = response_mask(response_ids, device).bool()
    grid = lambda flat: flat.new_zeros(mask.shape).masked_scatter(mask, flat)  # noqa: E731  [samples, T]
    values = grid(model.v_head(rows)) if with_values else None
    return grid(logps), grid(entropy), values


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether answers to one prompt may read a single run of it: the model takes tunesmith's attention
    and is one of transformers' own classes (remote code may drop the per-segment arguments; DPO then
    stops with an error, but RL answers are as right unshared, only slower)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return attention == VARLEN_SDPA and type(model).__module__.startswith("transformers.models.")


def chunked_response_forward(model, prompt_ids: list[list[int]], response_ids: list[list[int]], samples: int,
                             **kwargs):
    """`response_forward` over `samples` sequences at a time (a rollout can be far larger than a
    micro-batch; on a GPU one packed row's attention mask grows with the square of its length)."""
    parts = [response_forward(model, prompt_ids[i:i + samples], response_ids[i:i + samples], **kwargs)
             for i in range(0, len(response_ids), samples)]
    width = max(len(r) for r in response_ids)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return tuple(None if part[0] is None else torch.cat([pad(p) for p in part]) for part in zip(*parts))


@dataclass(frozen=True)
class RolloutSettings:
    """How a stage samples and scores: the sampler's settings and the per-token forward's."""

    sampling: SamplingSettings
    pad_id: int
    chunk_size: int
    micro_samples: int
    """Samples per forward chunk (a rollout can be far larger than a micro-batch)."""
    engine: bool = False
    """Sample on the decode scheduler, the reference and reward rows beside the policy's (`rollout_engine`)."""
    sampler_dtype: torch.dtype | None = None
    """Sample under autocast to this dtype (`rollout_dtype`); pi_old is then the learner's own forward."""
    is_cap: float | None = None
    """Truncated importance sampling's cap (`rollout_is_cap`): weigh tokens by min(pi_old / pi_sampler, cap)."""
    old_from_update: bool = False
    """Where the sampler is not the learner, leave pi_old to the update's first forward instead of a forward
    of its own (GRPO with one optimizer step per rollout and no dropout: `update_sees_pi_old`)."""

    def sampler_is_learner(self, model: torch.nn.Module) -> bool:
        """Whether the sampler's statistics are the learner's pi_old (fp32, no autocast, no rollout_dtype)."""
        return self.sampler_dtype is None and sampler_statistics_are_exact(model)

    def leaves_pi_old_to_update(self, model: torch.nn.Module, with_values: bool) -> bool:
        """Whether the rollout leaves pi_old to the update's first forward (`old_from_update`, where the
        sampler is not the learner; not with a critic's values, which need a forward of their own)."""
        return self.old_from_update and not with_values and not self.sampler_is_learner(model)

    def sampling_precision(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Autocast to `sampler_dtype` around the sampler (nothing without one)."""
        if self.sampler_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(model.parameters()).device.type, dtype=self.sampler_dtype)

    @property
    def forward(self) -> dict:
        """`response_forward`'s settings: log-probs at the sampling temperature."""
        return dict(pad_id=self.pad_id, chunk_size=self.chunk_size, temperature=self.sampling.temperature)


@torch.no_grad()
def sample_and_score(model: torch.nn.Module, rows: list[dict], settings: RolloutSettings, scorer: Scorer,
                     stop_ids: list[int], group: int, with_values: bool, reference: Reference | None,
                     seeds: list[int] | None = None) -> Rollout:
    """Sample `group` answers per prompt, then the policy's log-probs (and values), the reference's, and scores.
    `seeds` (one per answer, prompt-major) give each answer its own random stream.

    All in eval mode. With `settings.engine` (and a model the slot decoder runs) the answers come from the
    decode scheduler with the reference and a shared-base reward model's rows beside them
    (training/engine_rollout.py); otherwise from `generate`, then a forward per model over the answers.
    """
    generators = None if seeds is None else [torch.Generator().manual_seed(seed) for seed in seeds]
    prompt_ids = [row["prompt_ids"] for row in rows for _ in range(group)]  # one per answer
    with eval_mode(model):
        start = time.perf_counter()
        if settings.engine and engine_rollout.can_run(model, rows, settings.sampling):
            sampled = _on_engine(model, rows, prompt_ids, settings, scorer, stop_ids, group, with_values, reference,
                                 generators)
        else:
            sampled = _then_forward(model, rows, prompt_ids, settings, stop_ids, group, with_values, reference,
                                    generators)
        stopped = torch.tensor(sampled.stopped, device=sampled.entropy.device)
        responses = sampled.response_ids
        mask = response_mask(responses, stopped.device)
        is_weights = None  # with pi_old left to the update, the update weighs (Rollout.with_update_old)
        if settings.is_cap is not None and sampled.sampler_logps is not None and sampled.old_logps is not None:
            is_weights = truncated_is_weights(sampled.old_logps, sampled.sampler_logps, mask, settings.is_cap)
        raw, scores = scorer(rows, responses, stopped, sampled.scores)
        timings = {"time/generation": sampled.generated_at - start,
                   "time/scoring": time.perf_counter() - sampled.generated_at}
    return Rollout(prompt_ids, responses, mask, sampled.old_logps, sampled.entropy, stopped, raw, scores,
                   ref_logps=sampled.ref_logps, old_values=sampled.old_values, sampler_logps=sampled.sampler_logps,
                   is_weights=is_weights, timings=timings, reward_parts=scorer.parts())


@dataclass
class _Sampled:
    """What a rollout's sampling leaves before scoring."""

    response_ids: list[list[int]]
    stopped: list[bool]
    old_logps: torch.Tensor | None
    entropy: torch.Tensor
    old_values: torch.Tensor | None
    ref_logps: torch.Tensor | None
    scores: list[float | None] | None
    """Scores the sampling already gave (a reward row), None where the scorer must score."""
    generated_at: float
    sampler_logps: torch.Tensor | None = None
    """The sampler's own log-probs, where they are not pi_old (`rollout_dtype`, or a bf16 learner)."""


def _then_forward(model: torch.nn.Module, rows: list[dict], prompt_ids: list[list[int]], settings: RolloutSettings,
                  stop_ids: list[int], group: int, with_values: bool, reference: Reference | None,
                  generators: list[torch.Generator] | None) -> _Sampled:
    """`generate` on merged weights, then the policy's forward (unless the sampler's statistics are pi_old,
    or the update gives pi_old) and the reference's over the answers."""
    from_sampler = settings.sampler_is_learner(model)
    deferred = settings.leaves_pi_old_to_update(model, with_values)
    record = from_sampler or deferred or settings.is_cap is not None  # the sampler's own log-probs
    with merged_for_inference(model):  # the policy's no-grad passes share one set of merged weights
        with settings.sampling_precision(model):
            generation = generate(model, [row["prompt_ids"] for row in rows], settings.sampling, stop_ids,
                                  settings.pad_id, num_samples=group, generator=generators, record=record)
        generated_at = time.perf_counter()
        responses = generation.response_ids
        if from_sampler:
            old_logps, entropy = generation.logps, generation.entropy
            mask = response_mask(responses, old_logps.device)
            old_values = model.v_head(generation.hidden) * mask if with_values else None
        elif deferred:  # pi_old from the update; the sampler's entropy is the statistic
            old_logps, entropy, old_values = None, generation.entropy, None
        else:
            old_logps, entropy, old_values = _policy_forward(model, prompt_ids, responses, settings, with_values)
    ref_logps = _reference_forward(reference, prompt_ids, responses, settings)
    sampler_logps = None if from_sampler or not record else generation.logps.float()
    return _Sampled(responses, generation.stopped, old_logps, entropy, old_values, ref_logps, None, generated_at,
                    sampler_logps)


def _on_engine(model: torch.nn.Module, rows: list[dict], prompt_ids: list[list[int]], settings: RolloutSettings,
               scorer: Scorer, stop_ids: list[int], group: int, with_values: bool, reference: Reference | None,
               generators: list[torch.Generator] | None) -> _Sampled:
    """The answers, the reference's log-probs and a shared-base reward model's scores from one run of the
    decode scheduler; pi_old, entropy and values from its draws where they are the learner's, else from the
    policy's forward."""
    exact = settings.sampler_is_learner(model)
    deferred = settings.leaves_pi_old_to_update(model, with_values)
    # followers run in the sampler's precision: with rollout_dtype the reference and reward keep their own forwards
    learner_precision = settings.sampler_dtype is None
    follow_reference = (reference is not None and reference.adapter_off and reference.frozen is None
                        and learner_precision)
    reward_rows = scorer.reward_rows(model) if learner_precision else None
    with settings.sampling_precision(model):
        sample = engine_sample(model, rows, settings.sampling, stop_ids, group, generators,
                               exact or deferred or settings.is_cap is not None, follow_reference, reward_rows,
                               settings.chunk_size)
    generated_at = time.perf_counter()
    responses = sample.response_ids
    sampler_logps = None
    if exact:
        old_logps, entropy = padded(sample.logps), padded(sample.entropy)
        old_values = None
        if with_values:
            values = model.v_head(torch.cat(sample.hidden)).split([len(r) for r in responses])
            old_values = padded(list(values))
    elif deferred:  # pi_old from the update; the sampler's entropy is the statistic
        old_logps, entropy, old_values = None, padded(sample.entropy), None
        sampler_logps = padded(sample.logps).float()
    else:
        with merged_for_inference(model):
            old_logps, entropy, old_values = _policy_forward(model, prompt_ids, responses, settings, with_values)
        sampler_logps = None if sample.logps is None else padded(sample.logps).to(old_logps.dtype)
    if follow_reference:
        ref_logps = padded(sample.ref_logps).float()
    else:
        ref_logps = _reference_forward(reference, prompt_ids, responses, settings)
    return _Sampled(responses, sample.stopped, old_logps, entropy, old_values, ref_logps, sample.raw_scores,
                    generated_at, sampler_logps)


def _policy_forward(model: torch.nn.Module, prompt_ids: list[list[int]], responses: list[list[int]],
                    settings: RolloutSettings, with_values: bool) -> tuple:
    """The policy's (log-probs, entropies, values or None) of the answers from its own forward: pi_old where
    the sampler's statistics are not the learner's."""
    return chunked_response_forward(model, prompt_ids, responses, settings.micro_samples, with_values=with_values,
                                    **settings.forward)


def _reference_forward(reference: Reference | None, prompt_ids: list[list[int]], responses: list[list[int]],
                       settings: RolloutSettings) -> torch.Tensor | None:
    """The reference's log-probs of the answers from its own forward (None without a reference)."""
    if reference is None:
        return None
    with reference.use() as ref_model:
        return chunked_response_forward(ref_model, prompt_ids, responses, settings.micro_samples, with_values=False,
                                        **settings.forward)[0]


def update_sees_pi_old(model: torch.nn.Module, ppo_epochs: int, ppo_buffer_size: int) -> bool:
    """Whether the update's first forward over each answer runs the very policy that the rollout's pi_old
    forward would: one pass (ppo_epochs 1) of one optimizer step (ppo_buffer_size 1: its micro-batches
    accumulate into that step), with no dropout anywhere (the update runs in train mode, the rollout in
    eval mode)."""
    config = getattr(model, "config", None)
    module_dropout = [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    return (ppo_epochs == 1 and ppo_buffer_size == 1 and not any(module_dropout)
            and not any(_train_noise(config.to_dict() if config is not None else {})))


def _train_noise(settings: dict) -> list[float]:
    """A model config's settings (nested configs included) that draw randomness in train mode only:
    dropout (`attention_dropout`, GPT-2's `attn_pdrop`) and a router's jitter (Mixtral's `router_jitter_noise`)."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += _train_noise(value)
        elif (any(word in str(key) for word in ("dropout", "pdrop", "jitter")) and isinstance(value, (int, float))
              and not isinstance(value, bool)):
            found.append(value)
    return found


def padded(per_answer: list[torch.Tensor]) -> torch.Tensor:
    """[answers, longest answer] (or [answers, longest, ...]) from one tensor per answer, zero past each end."""
    return torch.nn.utils.rnn.pad_sequence(per_answer, batch_first=True)


def sampler_statistics_are_exact(model: torch.nn.Module) -> bool:
    """Whether pi_old, entropy and values may come from the sampler (`generate(record=True)`) instead of
    a forward over the responses: in fp32 with no autocast they agree to float rounding (tested), and a
    forward pass per rollout is saved. In bf16/fp16 the decode's one-row matmuls round differently
    from the batched forward the update runs, so the forward's own numbers are pi_old there."""
    weight = model.get_output_embeddings().weight
    return weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)


