"""`tunesmith api cfg.yaml`: an OpenAI-compatible HTTP server (FastAPI), as LLaMA-Factory's `api` command.

    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, n, stop, stream (server-sent
                                events in OpenAI's chunk format, ending with `data: [DONE]`), usage
    POST /v1/score              reward models only: {"messages": [conversation, ...]} -> {"scores": [...]},
                                the shape `reward_model: http://...` expects in PPO/GRPO training

One worker thread owns the model and runs one request at a time, so requests never mix their outputs;
the others wait in a bounded queue (HTTP 429 once it is full). A streaming client that disconnects
cancels its request, which frees the worker at the next token; so does a non-streaming client that
disconnects while it waits. Checking a request and tokenising its prompt run in a thread pool, never on
the event loop. Errors use OpenAI's JSON shape (api_errors.py); the API key and the body limit are
checked before any route (api_guard.py); OpenAI's content-part lists and `developer` role are read as
text and `system` (api_messages.py); roles that do not alternate are shaped in data/conversation.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from tunesmith.errors import TunesmithError
from tunesmith.inference.api_errors import ApiError, add_error_handlers, error_body, server_failure
from tunesmith.inference.api_guard import Guard
from tunesmith.inference.api_messages import plain_messages
from tunesmith.inference.engine import Engine, TextStream, trained_folder

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

MAX_WAITING = 32  # queued requests beyond the running one
MAX_CHOICES = 16
MAX_MESSAGES = 1024  # a tokenizer template renders growing prefixes: cost grows with the square of the count
SEED_RANGE = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat.completions request that change what is generated; others are accepted."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None


class ScoreRequest(BaseModel):
    messages: list


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


class Choice:
    """One answer's text as it grows: cut at a stop string, and held back while it could still be the
    start of one, so a streamed answer never shows text the final answer does not contain."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.stream, self.stops = TextStream(engine), stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.text, self.released, self.stop_hit, self.done = "", 0, False, False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now final (none while it may still begin a stop string)."""
        self.text += self.stream.push(token)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stop_hit, self.done = self.text[:at], True, True
        end = len(self.text) if self.done else max(self.released, len(self.text) - self.hold)
        return self.release(end)

    def release(self, end: int | None = None) -> str:
        """The text not yet handed out, up to `end` (default: all of it, when the answer has ended)."""
        end = len(self.text) if end is None else end
        piece, self.released = self.text[self.released:end], end
        return piece


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`: routes, OpenAI-shaped errors, and the API-key check."""
    app = FastAPI(title="tunesmith")
    worker = Worker()
    add_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key)
    _add_chat_routes(app, engine, model_name, worker)
    _add_score_route(app, engine, worker)
    return app


def _add_chat_routes(app: FastAPI, engine: Engine, model_name: str, worker: Worker) -> None:
    """GET /v1/models and POST /v1/chat/completions (streamed or not), run on `worker`."""

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        plan = await run_in_threadpool(_plan, engine, body)
        if body.stream:
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
            job = Job(lambda cancelled: _complete(engine, plan, cancelled, lambda i, text: loop.call_soon_threadsafe(
                pieces.put_nowait, (i, text))))
            job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
            worker.submit(job)  # before the response starts, so a full queue is still a 429
            return StreamingResponse(_events(job, pieces, plan, model_name), media_type="text/event-stream")
        job = worker.submit(Job(lambda cancelled: _complete(engine, plan, cancelled)))
        choices, prompt_tokens = await _result(job, request)
        completion_tokens = sum(c["tokens"] for c in choices)
        return {"id": plan["id"], "object": "chat.completion", "created": plan["created"], "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["finish"]} for i, c in enumerate(choices)],
                "usage": _usage(prompt_tokens, completion_tokens)}


def _add_score_route(app: FastAPI, engine: Engine, worker: Worker) -> None:
    """POST /v1/score: a reward model's scores for whole conversations (a 400 for any other model)."""

    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request):
        if engine.reward_model is None:
            raise ApiError(400, "This server's model is not a reward model; start it on a `stage: rm` output "
                                "(a folder with value_head.safetensors) to score conversations.")
        conversations = [plain_messages(messages) for messages in body.messages]
        for index, messages in enumerate(conversations):
            try:
                engine.with_system(messages)
            except TunesmithError as err:
                raise ApiError(400, f"messages[{index}]: {err}", param="messages") from None
            if messages[-1]["role"] != "assistant":
                raise ApiError(400, f"messages[{index}] must end with the assistant answer to score.", param="messages")
        job = worker.submit(Job(lambda cancelled: engine.score(conversations)))
        return {"scores": await _result(job, request)}


async def _result(job: Job, request: Request) -> Any:
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


def _plan(engine: Engine, body: ChatRequest) -> dict[str, Any]:
    """The request checked and turned into what the worker runs; anything wrong is a 400 here."""
    defaults = engine.sampling
    messages = plain_messages(body.messages)
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages holds {len(messages)} messages; this server takes up to {MAX_MESSAGES}.",
                       param="messages")
    try:
        prompt_ids = engine.prompt_ids(messages)
    except TunesmithError as err:
        raise ApiError(400, str(err), param="messages") from None
    if body.seed is not None and body.seed not in SEED_RANGE:
        raise ApiError(400, f"seed must be between {SEED_RANGE.start} and {SEED_RANGE.stop - 1}.", param="seed")
    max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), defaults.max_new_tokens)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    if len(prompt_ids) + max_tokens > engine.cutoff_len:
        raise ApiError(400, f"This model's context is {engine.cutoff_len} tokens (cutoff_len); the messages take "
                            f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more. Shorten the messages "
                            "or lower max_tokens.", param="messages", code="context_length_exceeded")
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {body.n}.", param="n")
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_p = defaults.top_p if body.top_p is None else body.top_p
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}.", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings.", param="stop")
    settings = dataclasses.replace(defaults, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   do_sample=defaults.do_sample and temperature > 0)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "messages": messages,
            "prompt_tokens": len(prompt_ids), "settings": settings, "n": body.n, "stops": stops,
            "seed": body.seed, "include_usage": include_usage}


def _complete(engine: Engine, plan: dict[str, Any], cancelled: threading.Event,
              on_piece: Callable[[int, str], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Run one request: ([{text, finish, tokens}] per choice, prompt tokens). `on_piece(index, text)`
    receives streamed text as soon as it is final."""
    import torch

    choices = [Choice(engine, plan["stops"]) for _ in range(plan["n"])]
    stop_ids = set(engine.stop_ids)

    def on_step(tokens: list[int]) -> range | list[int]:
        if cancelled.is_set():
            return range(len(tokens))
        ended = []
        for index, (token, choice) in enumerate(zip(tokens, choices)):
            if choice.done:
                continue
            if token in stop_ids:
                choice.done = True
                piece = choice.release()
            else:
                piece = choice.push(token)
                if choice.done:
                    ended.append(index)
            if piece and on_piece is not None:
                on_piece(index, piece)
        return ended

    device = next(engine.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(plan["seed"]) if plan["seed"] is not None else None
    generation = engine.generate([plan["messages"]], plan["settings"], plan["n"], on_step, generator)
    results = []
    for index, choice in enumerate(choices):
        rest = choice.release()
        if rest and on_piece is not None:
            on_piece(index, rest)
        finish = "stop" if generation.stopped[index] or choice.stop_hit else "length"
        results.append({"text": choice.text, "finish": finish, "tokens": len(generation.response_ids[index])})
    return results, plan["prompt_tokens"]


async def _events(job: Job, pieces: asyncio.Queue, plan: dict[str, Any], model_name: str) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content chunks as text is final, a finish chunk per
    choice, optionally usage, then [DONE]. Leaving early (client gone) cancels the job."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        payload = {"id": plan["id"], "object": "chat.completion.chunk", "created": plan["created"],
                   "model": model_name, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(plan["n"])])
        while (item := await pieces.get()) is not None:
            index, text = item
            yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])
        error = job.future.exception() if not job.future.cancelled() else None
        if error is not None:
            message = str(error) if isinstance(error, TunesmithError) else server_failure(error)
            yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
            return
        choices, prompt_tokens = job.future.result()
        yield chunk([{"index": i, "delta": {}, "finish_reason": c["finish"]} for i, c in enumerate(choices)])
        if plan["include_usage"]:
            yield chunk([], _usage(prompt_tokens, sum(c["tokens"] for c in choices)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op when it finished; frees the worker when the client left


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def run_api(config: RunConfig, host: str, port: int, api_key: str | None,
            say: Callable[[str], None] = print) -> None:
    """Load the model the config names and serve it until interrupted (`tunesmith api`)."""
    import uvicorn

    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    engine = Engine.load(config)
    name = trained_folder(config.model).name
    say(f"[tunesmith] serving {name} on http://{host}:{port}/v1 (OpenAI API; docs at /docs)")
    uvicorn.run(create_app(engine, name, api_key), host=host, port=port, log_level="info")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A loud warning when the server listens beyond this machine with no API key: anyone who can reach
    the port can then use the model (and its GPU)."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"[tunesmith] WARNING: listening on {host} without API_KEY: anyone who can reach this port can use "
            "the model. Set API_KEY, or serve on 127.0.0.1 (the default) behind your own proxy.")
