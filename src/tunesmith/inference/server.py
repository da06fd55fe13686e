"""`tunesmith api cfg.yaml`: an OpenAI-compatible HTTP server (FastAPI), as LLaMA-Factory's `api` command.

    GET  /v1/models             the default model and each of `served_adapters` (served_models.py)
    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, n, stop, stream (server-sent
                                events in OpenAI's chunk format, ending with `data: [DONE]`), logprobs
                                and top_logprobs (api_logprobs.py), usage
    POST /v1/completions        raw text (no template), echo, legacy logprobs (completions.py)
    POST /v1/score              reward models only: {"messages": [conversation, ...]} -> {"scores": [...]},
                                the shape `reward_model: http://...` expects in PPO/GRPO training

Every request's answers are rows of the engine's decode scheduler (sampling/scheduler.py), which decodes
all running rows together (continuous batching: rows join and leave at token boundaries), each with its
own adapter and sampling settings, and each answering as it would alone. At most max_num_seqs rows run;
32 more requests may wait, and beyond that a request is HTTP 429 (api_worker.py). A client that
disconnects, streaming or not, cancels its request, which frees its rows at the next token. Answers grow, stop at stop strings and carry their
log-probs in api_choices.py; the generation fields are checked in api_sampling.py. Checking a request and tokenising its prompt run in a thread pool, never on
the event loop. Errors use OpenAI's JSON shape (api_errors.py); the API key and the body limit are
checked before any route (api_guard.py); OpenAI's content-part lists and `developer` role are read as
text and `system` (api_messages.py); roles that do not alternate are shaped in data/conversation.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tunesmith.errors import TunesmithError
from tunesmith.inference.api_choices import Choice, Emit, finish, token_callback
from tunesmith.inference.api_errors import ApiError, add_error_handlers
from tunesmith.inference.api_guard import Guard
from tunesmith.inference.api_logprobs import StepLogprobs, TokenNames, chat_logprobs
from tunesmith.inference.api_messages import plain_messages
from tunesmith.inference.api_sampling import SamplingRequest, chat_top_logprobs, request_settings
from tunesmith.inference.api_worker import (
    MAX_WAITING,
    Job,
    Worker,
    answer,
    failure_event,
    job_result,
)
from tunesmith.inference.completions import add_completions_route
from tunesmith.inference.engine import Engine
from tunesmith.inference.served_models import ServedModel, ServedModels, load_served
from tunesmith.model.heap import freeze_heap
from tunesmith.sampling.pass_threads import PassThreads

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

MAX_MESSAGES = 1024  # a tokenizer template renders growing prefixes: cost grows with the square of the count


class ChatRequest(SamplingRequest):
    """OpenAI's chat.completions request: the shared generation fields, the messages and chat's log-probs."""

    messages: list
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ScoreRequest(BaseModel):
    messages: list


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               served: ServedModels | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name` (and `served`'s adapters, served_models.py): routes,
    OpenAI-shaped errors, and the API-key check."""
    app = FastAPI(title="tunesmith")
    engine.scheduler.callers_drive = False  # request threads come and go: the loop keeps a thread of its own
    worker = Worker(engine.scheduler.max_rows + MAX_WAITING)
    add_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key)
    served = served or ServedModels.single(engine, model_name)
    _add_chat_routes(app, served, worker)
    add_completions_route(app, served, worker)
    _add_score_route(app, engine, worker)
    return app


def _add_chat_routes(app: FastAPI, served: ServedModels, worker: Worker) -> None:
    """GET /v1/models and POST /v1/chat/completions (streamed or not), run on `worker` with the weights
    of the model the request names."""

    @app.get("/v1/models")
    async def models():
        return served.listing()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        chosen = served.pick(body.model)
        model_name = chosen.name
        plan = await run_in_threadpool(_plan, chosen.engine, body)
        result = await answer(worker, request, body.stream,
                              lambda cancelled, emit=None: _complete(chosen, plan, cancelled, emit),
                              lambda job, pieces: _events(job, pieces, plan, model_name))
        if body.stream:
            return result
        choices, prompt_tokens = result
        completion_tokens = sum(c["tokens"] for c in choices)
        return {"id": plan["id"], "object": "chat.completion", "created": plan["created"], "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                             "logprobs": chat_logprobs(c["entries"], plan["names"]), "finish_reason": c["finish"]}
                            for i, c in enumerate(choices)],
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
        return {"scores": await job_result(job, request)}


def _plan(engine: Engine, body: ChatRequest) -> dict[str, Any]:
    """The request checked and turned into what the worker runs; anything wrong is a 400 here."""
    messages = plain_messages(body.messages)
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages holds {len(messages)} messages; this server takes up to {MAX_MESSAGES}.",
                       param="messages")
    try:
        prompt_ids = engine.prompt_ids(messages)
    except TunesmithError as err:
        raise ApiError(400, str(err), param="messages") from None
    settings, stops = request_settings(engine, body, len(prompt_ids), body.n)
    top = chat_top_logprobs(body.logprobs, body.top_logprobs)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "prompt_ids": prompt_ids,
            "prompt_tokens": len(prompt_ids), "settings": settings, "n": body.n, "stops": stops,
            "seed": body.seed, "include_usage": include_usage, "top_logprobs": top,
            "names": TokenNames(engine.tokenizer) if top is not None else None}


def _complete(chosen: ServedModel, plan: dict[str, Any], cancelled: threading.Event,
              on_piece: Emit | None = None) -> tuple[list[dict[str, Any]], int]:
    """Run one request: ([{text, finish, tokens, entries}] per choice, prompt tokens). `on_piece(index,
    text, entries)` receives streamed text (and its tokens' log-probs) as soon as it is final."""
    engine = chosen.engine
    choices = [Choice(engine, plan["stops"]) for _ in range(plan["n"])]
    steps = StepLogprobs(plan["top_logprobs"]) if plan["top_logprobs"] is not None else None
    generation = engine.continue_ids([plan["prompt_ids"]], plan["settings"], plan["n"], plan["seed"],
                                     adapter=chosen.adapter_set, on_logits=steps, cancelled=cancelled,
                                     on_token=token_callback(choices, engine.stop_ids, on_piece, steps))
    return finish(choices, generation, on_piece), plan["prompt_tokens"]


async def _events(job: Job, pieces: asyncio.Queue, plan: dict[str, Any], model_name: str) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content chunks as text is final, a finish chunk per
    choice, optionally usage, then [DONE]. JobStream cancels the job when the response ends."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        payload = {"id": plan["id"], "object": "chat.completion.chunk", "created": plan["created"],
                   "model": model_name, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(plan["n"])])
    while (item := await pieces.get()) is not None:
        index, text, entries = item
        yield chunk([{"index": index, "delta": {"content": text}, "logprobs": chat_logprobs(entries, plan["names"]),
                      "finish_reason": None}])
    last = failure_event(job)
    if last is not None:
        if last:
            yield last
        return
    choices, prompt_tokens = job.future.result()
    yield chunk([{"index": i, "delta": {}, "finish_reason": c["finish"]} for i, c in enumerate(choices)])
    if plan["include_usage"]:
        yield chunk([], _usage(prompt_tokens, sum(c["tokens"] for c in choices)))
    yield "data: [DONE]\n\n"


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
    served = load_on_decode_thread(config)
    name = served.default.name
    scheduler = served.default.engine.scheduler
    if scheduler.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # light passes run on every core or leave one to the HTTP loop, whichever decodes faster on this
        # machine under this load (sampling/pass_threads.py); passes that read more of a prompt use every core
        threads = torch.get_num_threads()
        scheduler.pass_threads = PassThreads((threads, max(1, threads - 1)))
    say(f"[tunesmith] serving {', '.join([name, *served.adapters])} on http://{host}:{port}/v1 (OpenAI API; "
        "docs at /docs)")
    uvicorn.run(create_app(served.default.engine, name, api_key, served), host=host, port=port, log_level="info")


def load_on_decode_thread(config: RunConfig) -> ServedModels:
    """Load the served models on a thread that then runs the decode loop for good, so that one thread runs
    every torch op: on a CPU, a second thread's OpenMP pool slows both (`DecodeScheduler.run_here`)."""
    loaded: Future = Future()

    def load_then_serve() -> None:
        try:
            served = load_served(config)
            freeze_heap()
        except BaseException as err:  # noqa: B036 - the main thread reports it
            loaded.set_exception(err)
            return
        served.default.engine.scheduler.serve_here(ready=lambda: loaded.set_result(served))

    threading.Thread(target=load_then_serve, name="tunesmith-decode", daemon=True).start()
    return loaded.result()


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
