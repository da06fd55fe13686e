"""What the decode scheduler runs: one answer per row, rows submitted in groups (one request's answers).

A `RowRequest` is everything one answer needs, so rows of different requests share a batch: its prompt
ids, its sampling settings and generator, its adapter, its stop tokens, and callbacks that see its tokens
as they are drawn (streaming, stop strings, log-probs, a client gone). A `RowGroup` is the rows submitted
together; its `result()` is their `Generation` once every row has ended.
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
    """Sees the prompt's final hidden states as they are computed: ([positions, hidden], first position)."""

    @property
    def reserved(self) -> int:
        """Cache positions the row may need: its prompt and every answer token but the last."""
        return len(self.prompt) + self.settings.max_new_tokens - 1


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

    def accept(self, token: int, logits: torch.Tensor) -> None:
        """Take the token drawn from `logits` [vocab]; end the row at a stop token, its length limit, or
        when its callback says so."""
        request = self.request
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
