"""What the decode scheduler runs: one answer per row, rows submitted in groups (one request's answers).

A `RowRequest` is everything one answer needs, so rows of different requests share a batch: its prompt
ids, its sampling settings and generator, its adapter, its stop tokens, and callbacks that see its tokens
as they are drawn (streaming, stop strings, log-probs, a client gone). A `RowGroup` is the rows submitted
together; its `result()` is their `Generation` once every row has ended.

A row may follow another row of its group instead of drawing (`follows`): it reads the same prompt, then
each token its leader draws, in the pass that feeds the token back to the leader, under its own adapter.
That is how an RL rollout gets the reference model's and the reward model's hidden states over the
policy's answer in the same passes over the base weights, with no forward of their own afterwards.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tunesmith.config import SamplingSettings
from tunesmith.sampling.generate import Generation


@dataclass
class RowRequest:
    """One answer to generate."""

    prompt: list[int]
    settings: SamplingSettings
    stop_ids: list[int]
    """Tokens that end the answer (it keeps the stop token, as `generate` does)."""
    generator: torch.Generator | None = None
    """The row's own random stream (None: a fresh one seeded from torch's global generator)."""
    adapter: str | None = None
    """The LoRA adapter the row runs (slot_decoder: a side set's name, OWN or BASE); None: the model as it runs now."""
    on_token: Callable[[int], bool | None] | None = None
    """Sees each token drawn (the stop token too); True ends the row there (it counts as not stopped)."""
    on_logits: Callable[[torch.Tensor, int], None] | None = None
    """Sees each step's float32 [vocab] model logits (before penalty and temperature) and the token, first."""
    on_prompt: Callable[[torch.Tensor, int], None] | None = None
    """Sees the final hidden states of what the row reads as they are computed: ([positions, hidden], first
    position); the prompt's, and for a follower its leader's answer too."""
    on_hidden: Callable[[torch.Tensor], None] | None = None
    """Sees the final hidden state [hidden] each drawn token was drawn from, first (RL's values)."""
    follows: int | None = None
    """Index in its group of an earlier row whose answer this row reads instead of drawing its own tokens."""
    answer_of: Callable[[list[int]], list[int] | None] | None = None
    """A follower's tokens after the prompt, given its leader's whole answer (None: the answer). They must
    start with the answer but its last token, else (or when it returns None) the row ends where it is,
    `diverged`."""
    extra_positions: int = 0
    """Positions a follower may read past its leader's longest answer (`answer_of`'s additions)."""
    in_step: bool = True
    """A follower reads each token in the pass that feeds it to its leader (where a pass's weights stream
    from memory, extra rows are nearly free: GPUs); False: it reads the answer whole once its leader has
    ended, in one chunk (on a CPU the weights sit in cache and a row costs what it computes, so few-row
    passes are the dear way to read tokens)."""
    states_from: int = 0
    """With `on_prompt`: the first position whose state it needs. Positions before it may be copied from
    another row that read the same tokens (shared_prefix.py); a row without `on_prompt` needs none."""

    @property
    def reserved(self) -> int:
        """Cache positions the row may need: its prompt and every answer token but the last (a follower:
        all of them, and its extra positions)."""
        answer = self.settings.max_new_tokens + (1 + self.extra_positions if self.follows is not None else 0)
        return len(self.prompt) + answer - 1


class RowGroup:
    """Rows submitted together; `result()` waits for all of them. `cancel()` ends them at the next step."""

    def __init__(self, requests: list[RowRequest], cancelled: threading.Event | None = None) -> None:
        self.requests = requests
        self.future: Future = Future()
        self.cancelled = cancelled or threading.Event()
        self.rows: list[Row] = []

    def cancel(self) -> None:
        """End every row at the next step (a client gone); a group still waiting never starts."""
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> Generation:
        """The rows' answers, once every row has ended."""
        return self.future.result(timeout)

    def fail(self, error: Exception) -> None:
        """End every row of the group and hand out `error` instead of answers."""
        for row in self.rows:
            row.end()
        if not self.future.done():
            self.future.set_exception(error)

    def finish_if_done(self) -> None:
        """Hand out the answers once the last row has ended."""
        if all(row.done for row in self.rows) and not self.future.done():
            self.future.set_result(Generation([row.tokens for row in self.rows], [row.stopped for row in self.rows]))


_SERIALS = itertools.count()


class Row:
    """A row's state while the scheduler runs it."""

    def __init__(self, request: RowRequest, group: RowGroup, vocab: int, device: torch.device) -> None:
        self.request, self.group = request, group
        self.serial = next(_SERIALS)  # arrival order, and an identity no later row reuses (id() can be)
        self.length = 0  # cache positions written: the prompt read so far, then every answer token fed back
        self.tokens: list[int] = []
        self.stopped = self.done = False
        self.leader: Row | None = None  # the row a follower reads (set by the scheduler)
        self.diverged = False  # a follower whose leader's answer_of did not extend what it had read
        self.final: list[int] | None = None  # a follower's whole stream once its leader has ended
        self.kin: list[tuple[Row, int]] = []  # rows beside it that start alike: (row, tokens shared); shared_prefix.py
        self.stop_ids = set(request.stop_ids)
        self.generator = request.generator
        if self.generator is None and not request.settings.greedy:
            seed = int(torch.randint(2**62, (), dtype=torch.long))
            self.generator = torch.Generator(device).manual_seed(seed)
        self.seen = None  # [vocab] bool: tokens in the context, for the repetition penalty
        if request.settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(request.prompt, device=device)] = True

    @property
    def prefilling(self) -> bool:
        """Whether part of the prompt is still to be read."""
        return self.length < len(self.request.prompt)

    def pending(self) -> int:
        """A follower's tokens available and not yet read (its leader's answer so far, or its whole stream)."""
        return len(self.stream()) - self.length

    def stream(self) -> list[int]:
        """What a follower reads: the prompt, then its leader's answer as drawn so far; once the leader has
        ended, the prompt and `answer_of` the answer (checked once: it must extend what was read)."""
        prompt, leader = self.request.prompt, self.leader
        if not leader.done:
            return prompt + leader.tokens if self.request.in_step else prompt
        if self.final is None:
            answer = leader.tokens if self.request.answer_of is None else self.request.answer_of(leader.tokens)
            final = None if answer is None else prompt + list(answer)
            read = (prompt + leader.tokens)[:self.length]
            self.diverged = final is None or final[:self.length] != read or len(final) > self.request.reserved + 1
            self.final = read if self.diverged else final
        return self.final

    def accept(self, token: int, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Take the token drawn from `logits` [vocab] (at final hidden state `hidden`); end the row at a stop
        token, its length limit, or when its callback says so."""
        request = self.request
        if hidden is not None and request.on_hidden is not None:
            try:
                request.on_hidden(hidden)
            except Exception as err:  # noqa: BLE001 - as below
                self.group.fail(err)
                return
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
        self.stopped = token in self.stop_ids
        ended = False
        try:
            if request.on_logits is not None:
                request.on_logits(logits, token)
            if request.on_token is not None:
                ended = request.on_token(token)
        except Exception as err:  # noqa: BLE001 - its own request fails; the rows beside it go on
            self.group.fail(err)
        self.done = self.done or self.stopped or bool(ended) or len(self.tokens) >= request.settings.max_new_tokens

    def read(self, states: torch.Tensor, start: int) -> None:
        """Hand prompt states to the request's `on_prompt` (a failure fails its own group only)."""
        if self.request.on_prompt is None:
            return
        try:
            self.request.on_prompt(states, start)
        except Exception as err:  # noqa: BLE001 - as in accept
            self.group.fail(err)

    def end(self) -> None:
        """Stop here (a cancelled group)."""
        self.done = True


def can_follow(request: RowRequest, index: int, requests: list[RowRequest]) -> bool:
    """Whether `request` (row `index`) may follow the row it names: an earlier, drawing row whose stream fits
    the follower's cache room."""
    if not 0 <= request.follows < index:
        return False
    leader = requests[request.follows]
    return (leader.follows is None and leader.prompt == request.prompt
            and leader.settings.max_new_tokens <= request.settings.max_new_tokens)
