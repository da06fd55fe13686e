"""How many CPU threads a server's decode passes run on, chosen by timing them while it serves.

A pass that only decodes is a few small matmuls. On a small CPU the process also runs the HTTP loop, and
whether the matmuls' threads should take every core or leave one to the loop depends on the machine: on
one 2-core Sapphire Rapids VM, 16 streaming clients got 1053 tokens/s with one thread and 841 with two; on
another of the same kind, 910-990 with one and 1057-1064 with two. So the server does not guess: for a
few passes at a time it runs them on each candidate in turn (both see the same load), keeps the one that
decoded more rows per second, and tries again every `RETRIAL_PASSES` passes, as the load may change. Only
passes that decode and read no prompt are timed (the scheduler records those): one prompt's chunk in a
trial would weigh on whichever candidate it fell to.
"""

from __future__ import annotations

import torch

LIGHT_PASS = 64
"""Tokens in a pass up to which it is light (decoding); heavier ones (reading prompts) take every thread."""
TRIAL_PASSES = 24
"""Passes timed per candidate in a trial."""
RETRIAL_PASSES = 1000
"""Timed passes on the chosen candidate before the next trial."""


class PassThreads:
    """Picks one of `candidates` (thread counts) for each light pass; `record` tells it how the pass went."""

    def __init__(self, candidates: tuple[int, ...], trial_passes: int = TRIAL_PASSES,
                 retrial_passes: int = RETRIAL_PASSES) -> None:
        self.candidates = tuple(dict.fromkeys(candidates))
        self.trial_passes, self.retrial_passes = trial_passes, retrial_passes
        self.chosen: int | None = None
        """The candidate in use between trials (None: a trial is running)."""
        self.since_trial = 0
        self.seconds = dict.fromkeys(self.candidates, 0.0)
        self.rows = dict.fromkeys(self.candidates, 0)
        self.timed = 0  # passes of the running trial

    def set_for(self, tokens: int) -> int | None:
        """Set torch's threads for a pass of `tokens` tokens: for a light one the pick, returned to be
        `record`ed; for a heavier one the most of the candidates (None)."""
        light = tokens <= LIGHT_PASS
        wanted = self.pick() if light else max(self.candidates)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted if light else None

    def pick(self) -> int:
        """The thread count for the next pass: in a trial the candidates in turn, else the chosen one."""
        if self.chosen is not None and self.since_trial >= self.retrial_passes:
            self.chosen = None  # a new trial
        return self.chosen if self.chosen is not None else self.candidates[self.timed % len(self.candidates)]

    def record(self, threads: int, seconds: float, rows: int) -> None:
        """A pass of `rows` decoded rows took `seconds` on `threads` threads."""
        if self.chosen is not None:
            self.since_trial += 1
            return
        self.seconds[threads] += seconds
        self.rows[threads] += rows
        self.timed += 1
        if self.timed >= self.trial_passes * len(self.candidates):
            self.chosen = min(self.candidates, key=lambda c: self.seconds[c] / max(self.rows[c], 1))
            self.since_trial, self.timed = 0, 0
            self.seconds = dict.fromkeys(self.candidates, 0.0)
            self.rows = dict.fromkeys(self.candidates, 0)
