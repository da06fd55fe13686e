"""The one thread that runs `tunesmith api`'s model work, and how a route waits on it.

One worker thread owns the model and runs one job at a time, so requests never mix their outputs; the
others wait in a bounded queue (HTTP 429 once it is full). A client that disconnects cancels its job,
which frees the worker at the next token. Every route that generates (chat, completions) goes through here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tunesmith.inference.api_errors import ApiError

MAX_WAITING = 32  # queued requests beyond the running one


@dataclass
class Job:
    """One request for the worker: run `work(cancelled)`; its result or exception lands in `future`."""

    work: object
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


class Worker:
    """The one thread that touches the model; jobs run in arrival order."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=MAX_WAITING)
        self.thread = threading.Thread(target=self._run, name="tunesmith-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue `job` without waiting; a full queue is the client's 429, not a stalled request."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"The server is busy ({MAX_WAITING} requests waiting); retry later.",
                           "rate_limit_error") from None
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            # False when the request was cancelled while waiting (asyncio cancels the future it awaited)
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                continue
            try:
                result = job.work(job.cancelled)
            except BaseException as err:  # noqa: B036 - the request must learn why, the worker must live
                job.future.set_exception(err)
            else:
                job.future.set_result(result)


def submit_streamed(worker: Worker, work: Callable[..., Any]) -> tuple[Job, asyncio.Queue]:
    """Queue `work(cancelled, emit)` for a streamed answer: each `emit(*item)` lands in the returned queue
    as a tuple, and None follows the last one. Call it before the response starts, so a full queue is a 429."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(lambda cancelled: work(cancelled, lambda *item: loop.call_soon_threadsafe(pieces.put_nowait, item)))
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    return worker.submit(job), pieces


async def job_result(job: Job, request: Request) -> Any:
    """The job's result; a client that disconnects while waiting cancels it, as a stream's does."""
    waiter = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        raise ApiError(499, "The client closed the request.")  # nobody reads it; the job stops below
    finally:
        gone.cancel()
        if not job.future.done():
            job.cancelled.set()


async def _disconnect(request: Request) -> None:
    """Return when the client goes: the body was read, so the server's next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
