"""How `tunesmith api` runs a request's work, and how a route waits on it.

Each request's job runs on a thread of its own; the jobs meet in the engine's decode scheduler, which
decodes every running answer together (sampling/scheduler.py). At most `limit` jobs run or wait at once
(the scheduler's rows plus MAX_WAITING): beyond that a request is HTTP 429 at once, before a stream
starts. A client that disconnects cancels its job, which frees its rows at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tunesmith.errors import TunesmithError
from tunesmith.inference.api_errors import ApiError, error_body, server_failure

MAX_WAITING = 32  # requests waiting beyond the rows the scheduler decodes


@dataclass
class Job:
    """One request's work: run `work(cancelled)`; its result or exception lands in `future`."""

    work: object
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


class Worker:
    """Runs jobs on threads, at most `limit` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = threading.BoundedSemaphore(limit)
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="tunesmith-request")

    def submit(self, job: Job) -> Job:
        """Start `job` without waiting; when `limit` jobs already run or wait, the client's 429."""
        if not self.free.acquire(blocking=False):
            raise ApiError(429, f"The server is busy ({self.limit} requests running or waiting); retry later.",
                           "rate_limit_error")
        self.pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():  # the client left before its job started
                job.future.cancel()  # done callbacks run: a stream's end marker is queued
                return
            # False when the request was cancelled while waiting (asyncio cancels the future it awaited)
            if not job.future.set_running_or_notify_cancel():
                return
            try:
                result = job.work(job.cancelled)
            except BaseException as err:  # noqa: B036 - the request must learn why, the thread must live
                job.future.set_exception(err)
            else:
                job.future.set_result(result)
        finally:
            self.free.release()


class Outbox:
    """Hands items from other threads to asyncio queues on one event loop, waking the loop once per batch:
    a decode step streams a token to every running request, and one wake-up (not one per request) keeps
    the loop's share of the GIL small while the decode thread works."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # the registry below is keyed by the loop: no strong ref back to it
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()

    def put(self, target: asyncio.Queue, item: object) -> None:
        """Queue `item` for `target` from any thread."""
        loop = self.loop()
        if loop is None or loop.is_closed():
            return  # nobody will read it (and holding it would keep the queue and its loop alive)
        with self.lock:
            self.items.append((target, item))
            wake = len(self.items) == 1
        if wake:
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for target, item in items:
            target.put_nowait(item)


_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


def submit_streamed(worker: Worker, work: Callable[..., Any]) -> tuple[Job, asyncio.Queue]:
    """Queue `work(cancelled, emit)` for a streamed answer: each `emit(*item)` lands in the returned queue
    as a tuple, and None follows the last one. Call it before the response starts, so a full queue is a 429."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    outbox = _OUTBOXES.setdefault(loop, Outbox(loop))
    job = Job(lambda cancelled: work(cancelled, lambda *item: outbox.put(pieces, item)))
    job.future.add_done_callback(lambda _: outbox.put(pieces, None))
    return worker.submit(job), pieces


async def answer(worker: Worker, request: Request, stream: bool, work: Callable[..., Any],
                 events: Callable[[Job, asyncio.Queue], Any]) -> Any:
    """What a generating route returns: for a stream, `JobStream` of `events(job, pieces)` over `work(cancelled,
    emit)`; else `work(cancelled)`'s result, awaited (a client that leaves cancels it)."""
    if stream:
        job, pieces = submit_streamed(worker, work)
        return JobStream(job, events(job, pieces))
    return await job_result(worker.submit(Job(work)), request)


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


class JobStream(StreamingResponse):
    """Server-sent events of `job`'s answer; however the response ends (done, client gone, even before its
    first byte, when the event generator never starts and so never runs its own cleanup), the job is
    cancelled: a no-op when it finished, its rows freed at the next token when not."""

    def __init__(self, job: Job, events: Any) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()


def failure_event(job: Job) -> str | None:
    """None when the finished `job` has answers to stream; else the stream's last event: OpenAI's error
    JSON when it failed (a TunesmithError's own words, else no internals), "" when it was cancelled."""
    if job.future.cancelled():  # the client left before the job ran: nobody reads this
        return ""
    error = job.future.exception()
    if error is None:
        return None
    message = str(error) if isinstance(error, TunesmithError) else server_failure(error)
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"

