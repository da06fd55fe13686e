"""Graceful stops: what schedulers send before they pre-empt a job, and the first Ctrl-C.

SIGTERM, SIGUSR1 and the first SIGINT only set a flag. The loop reads it after each optimizer step (on
every rank, through one all-reduce, so all ranks stop after the same step), writes a checkpoint and
raises `TrainingStopped`; the command then exits with STOPPED_EXIT_CODE (75, EX_TEMPFAIL: "try again
later"), and `resume_from_checkpoint: true` continues the run exactly. A second SIGINT aborts at once.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from tunesmith.errors import STOPPED_EXIT_CODE, TrainingStopped

__all__ = ["GRACEFUL_SIGNALS", "STOPPED_EXIT_CODE", "StopRequest", "TrainingStopped", "graceful_stops"]
GRACEFUL_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopRequest:
    """The signal that asked the run to stop (None while none has)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        """Whether a graceful stop was asked for."""
        return self.signal_name is not None

    def handle(self, signum: int, frame: object) -> None:
        """Record the first request; a second SIGINT interrupts immediately."""
        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or name


@contextmanager
def graceful_stops():
    """Inside the block, SIGTERM/SIGUSR1/SIGINT request a stop instead of killing the process."""
    request = StopRequest()
    previous = {}
    try:
        for name in GRACEFUL_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, request.handle)
    except ValueError:  # not the main thread (a test harness): stops are not catchable here
        previous = {}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
