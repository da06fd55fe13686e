"""RL rollouts on the decode scheduler: the policy's answers and, in the same passes over the base
weights, the reference model's and the reward model's hidden states over them.

Each answer is one group of rows (sampling/rows.py). The policy's row draws, under the policy's own LoRA
(`OWN`). A reference row follows it with every adapter off (`BASE`, the reference of a LoRA policy), and
a reward row, for a LoRA reward model that shares the policy's base (a side adapter), follows it under
that adapter and reads on past the answer to the end of the assistant turn as the reward model's template
writes it. So no forward over the answers runs afterwards: the reference log-probs come from the reference
row's states, the score from the reward row's last state through the value head, and (fp32) pi_old,
entropy and PPO's values from the policy row's own draws.

A reward row needs the reward model to encode the conversation as exactly the policy's tokens followed by
its turn's end (same tokenizer and template, nothing cut). Where it does not, the row ends `diverged`
(or is never added) and that answer is scored by the reward model's own forward, as without the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunesmith.algorithms.logprobs import chunked_logprobs_entropy_at
from tunesmith.config import SamplingSettings
from tunesmith.sampling import cached_decoder
from tunesmith.sampling.generate import token_statistics
from tunesmith.sampling.rows import RowGroup, RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import BASE, OWN


@dataclass
class EngineSample:
    """A rollout's answers and what came out of decoding them, per answer (prompt-major)."""

    response_ids: list[list[int]]
    stopped: list[bool]
    logps: list[torch.Tensor] | None
    """[answer tokens] log pi_old at the sampling temperature, from the policy row's logits (None: not exact)."""
    entropy: list[torch.Tensor] | None
    hidden: list[torch.Tensor] | None
    """[answer tokens, hidden] the states the policy row drew from (for the critic's values)."""
    ref_logps: list[torch.Tensor] | None
    """[answer tokens] log-probs under the reference (None: no reference row ran)."""
    raw_scores: list[float | None] | None
    """The reward model's score where a reward row read the answer; None where it did not."""


@dataclass(frozen=True)
class RewardRows:
    """A reward model sharing the policy's base: its side adapter, value head, and how it encodes answers."""

    adapter: str
    head: torch.nn.Module
    encode: Callable[[list[dict]], list[int]]
    """Token ids of a conversation ending with the answer, as the reward model scores it."""
    decode: Callable[[list[int]], str]
    """The answer's text, as the scorer hands it to the reward model."""


def can_run(model: torch.nn.Module, rows: list[dict], sampling: SamplingSettings) -> bool:
    """Whether the slot decoder runs this model over these prompts and answers (not one whose weights are
    sharded over ranks: it reads whole weights)."""
    if any(type(param).__name__ == "DTensor" for param in model.parameters()):
        return False
    longest = max(len(row["prompt_ids"]) for row in rows) + sampling.max_new_tokens + 8
    return cached_decoder.supports(model, longest)


def engine_sample(model: torch.nn.Module, rows: list[dict], sampling: SamplingSettings, stop_ids: list[int],
                  group: int, generators: list[torch.Generator] | None, statistics: bool, with_reference: bool,
                  reward: RewardRows | None, chunk_size: int) -> EngineSample:
    """`group` answers per prompt through the decode scheduler, with reference and reward rows beside them;
    `statistics`: keep pi_old, entropy and states from the draws (exact in fp32)."""
    answers, in_step = [], in_step_pays(model)
    for index, row in enumerate(rows):
        for sample in range(group):
            generator = None if generators is None else generators[index * group + sample]
            answers.append(_Answer(row, sampling, stop_ids, generator, statistics, with_reference, reward, in_step))
    requests = [answer.requests() for answer in answers]
    scheduler = _scheduler(model, requests)
    for answer, submitted in zip(answers, scheduler.run_here(requests)):
        answer.collect(submitted)
    head = model.get_output_embeddings()
    return EngineSample(
        [a.response for a in answers], [a.stopped for a in answers],
        [a.draws.logps() for a in answers] if statistics else None,
        [a.draws.entropy() for a in answers] if statistics else None,
        [a.draws.states() for a in answers] if statistics else None,
        _reference_logps(answers, head, sampling.temperature, chunk_size) if with_reference else None,
        [a.score(reward) for a in answers] if reward is not None else None)


def in_step_pays(model: torch.nn.Module) -> bool:
    """Whether followers read in step with their leader (see `RowRequest.in_step`): on accelerators. On this
    project's 2-core CPU (40M model, 4 answers x 64 tokens) reading in step took 2.9 s against 0.7 s of
    sampling + 0.3 s of separate forwards; read whole after the answer, their tokens batch as one chunk."""
    return model.get_output_embeddings().weight.device.type != "cpu"


def _scheduler(model: torch.nn.Module, requests: list[list[RowRequest]]) -> DecodeScheduler:
    """A scheduler sized to run every row of this rollout at once (a fresh one per rollout: its cache is
    small next to the model, and nothing outlives the step)."""
    rows = sum(len(parts) for parts in requests)
    longest = max(request.reserved + 1 for parts in requests for request in parts)
    positions = sum(request.reserved + 1 for parts in requests for request in parts)  # all read in one pass
    return DecodeScheduler(model, max_rows=rows, max_cached_tokens=rows * longest, prefill_tokens=positions,
                           merged=OWN)  # the policy's rows are the most: its LoRA is folded into the weights


class _Draws:
    """What the policy row's draws leave: each token's log-prob and entropy at the sampling temperature (of
    the model's own logits, as a forward gives them), and the state it was drawn from."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.token_logps, self.entropies, self.hidden = [], [], []

    def on_logits(self, logits: torch.Tensor, token: int) -> None:
        token_logp, entropy = token_statistics(logits[None], torch.tensor([token], device=logits.device),
                                               self.temperature)
        self.token_logps.append(token_logp[0])
        self.entropies.append(entropy[0])

    def logps(self) -> torch.Tensor:
        return torch.stack(self.token_logps)

    def entropy(self) -> torch.Tensor:
        return torch.stack(self.entropies)

    def states(self) -> torch.Tensor:
        return torch.stack(self.hidden)


class _Tape:
    """A follower's final hidden states from position `first` on (None: none kept), and its last one."""

    def __init__(self, first: int | None) -> None:
        self.first, self.parts, self.last = first, [], None

    def __call__(self, states: torch.Tensor, start: int) -> None:
        self.last = states[-1].clone()  # copies: a view would keep the pass's whole [tokens, hidden] alive
        if self.first is None:
            return
        skip = max(0, self.first - start)
        if skip < states.shape[0]:
            self.parts.append(states[skip:].clone())

    def states(self) -> torch.Tensor:
        return torch.cat(self.parts)


class _Answer:
    """One answer's rows: the policy's, and the reference and reward rows that follow it."""

    def __init__(self, row: dict, sampling: SamplingSettings, stop_ids: list[int], generator: torch.Generator | None,
                 statistics: bool, with_reference: bool, reward: RewardRows | None, in_step: bool) -> None:
        self.prompt, self.messages, self.in_step = row["prompt_ids"], row["messages"], in_step
        self.sampling, self.stop_ids, self.generator = sampling, stop_ids, generator
        self.draws = _Draws(sampling.temperature) if statistics else None
        self.reference = _Tape(len(self.prompt) - 1) if with_reference else None
        self.reward_tape: _Tape | None = None
        self.reward_extra = self._reward_extra(reward) if reward is not None else None
        self.reward_rows = reward
        self.response: list[int] = []
        self.stopped = False
        self.reward_read = False

    def _reward_extra(self, reward: RewardRows) -> int | None:
        """Positions the reward row may read past the answer's length: its turn's end, and a margin for an
        encoding longer than the answer's tokens (in step a small one, as the encoding must be the answer's
        tokens; read after the answer, the reward model's own encoding of its text, up to twice as long).
        None when the reward model does not encode this prompt as the policy does."""
        empty = reward.encode(self.messages + [{"role": "assistant", "content": ""}])
        if empty[:len(self.prompt)] != self.prompt:
            return None
        return len(empty) - len(self.prompt) + (2 if self.in_step else self.sampling.max_new_tokens)

    def requests(self) -> list[RowRequest]:
        draws = self.draws
        parts = [RowRequest(self.prompt, self.sampling, self.stop_ids, self.generator, OWN,
                            on_logits=None if draws is None else draws.on_logits,
                            on_hidden=None if draws is None else draws.hidden.append)]
        if self.reference is not None:
            parts.append(RowRequest(self.prompt, self.sampling, [], adapter=BASE, follows=0, on_prompt=self.reference,
                                    answer_of=lambda answer: answer[:-1], in_step=self.in_step,
                                    states_from=self.reference.first))
        if self.reward_extra is not None:
            self.reward_tape = _Tape(None)
            parts.append(RowRequest(self.prompt, self.sampling, [], adapter=self.reward_rows.adapter, follows=0,
                                    on_prompt=self.reward_tape, answer_of=self._reward_answer,
                                    extra_positions=self.reward_extra, in_step=self.in_step,
                                    states_from=len(self.prompt)))
        return parts

    def _reward_answer(self, answer: list[int]) -> list[int] | None:
        """The reward model's tokens after the prompt for this answer; None when they do not start with it."""
        conversation = self.messages + [{"role": "assistant", "content": self.reward_rows.decode(answer)}]
        ids = self.reward_rows.encode(conversation)
        return ids[len(self.prompt):] if ids[:len(self.prompt)] == self.prompt else None

    def collect(self, submitted: RowGroup) -> None:
        generation = submitted.result()
        self.response, self.stopped = generation.response_ids[0], generation.stopped[0]
        if self.reward_tape is not None:
            self.reward_read = not submitted.rows[-1].diverged

    def score(self, reward: RewardRows) -> float | None:
        """The reward model's score of this answer, from the reward row's last state; None if none read it."""
        if not self.reward_read:
            return None
        last = self.reward_tape.last
        return float(reward.head(last[None].to(next(reward.head.parameters()).dtype))[0])


def _reference_logps(answers: list[_Answer], head: torch.nn.Linear, temperature: float,
                     chunk_size: int) -> list[torch.Tensor]:
    """Each answer's token log-probs under the reference, from its reference row's states (one head pass)."""
    states = torch.cat([answer.reference.states() for answer in answers])
    targets = torch.tensor([t for answer in answers for t in answer.response], device=states.device)
    logps, _ = chunked_logprobs_entropy_at(states, head, targets, chunk_size, temperature, entropy_grad=False)
    return list(logps.split([len(answer.response) for answer in answers]))
