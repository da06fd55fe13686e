"""POST /v1/completions: OpenAI's legacy completions endpoint, raw text in and text out (no chat template).

`prompt` is a string, a list of strings (several prompts, each answered `n` times; choice index
prompt * n + sample), or token ids (a list of ints, or a list of such lists). Text is tokenised as text:
special-token strings in it stay characters (data/plain_text.py), and the tokenizer's BOS goes first when
it adds one. `echo` puts the prompt in front of each answer; `logprobs: N` (0-5) adds OpenAI's legacy
object {tokens, token_logprobs, top_logprobs, text_offset}, with echo from the prompt's first token
(whose log-prob is null). Streaming sends OpenAI's `text_completion` chunks, then `data: [DONE]`; echo
cannot stream (OpenAI refuses it too). Generation runs on the engine's decode scheduler (api_worker.py).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from tunesmith.data.plain_text import PlainText
from tunesmith.inference.api_choices import Choice, Emit, finish, token_callback
from tunesmith.inference.api_errors import ApiError
from tunesmith.inference.api_logprobs import PromptLogprobs, StepLogprobs, TokenNames, legacy_logprobs
from tunesmith.inference.api_sampling import SamplingRequest, request_settings, top_logprobs
from tunesmith.inference.api_worker import Job, Worker, answer, failure_event
from tunesmith.inference.engine import Engine
from tunesmith.inference.served_models import ServedModel, ServedModels


class CompletionRequest(SamplingRequest):
    """OpenAI's legacy completions request: the shared generation fields, the prompt, echo and log-probs."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


def add_completions_route(app: FastAPI, served: ServedModels, worker: Worker) -> None:
    """POST /v1/completions (streamed or not), run on `worker` with the weights of the model it names."""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        chosen = served.pick(body.model)
        model_name = chosen.name
        plan = await run_in_threadpool(plan_completion, chosen.engine, body)
        result = await answer(worker, request, body.stream,
                              lambda cancelled, emit=None: run_completion(chosen, plan, cancelled, emit),
                              lambda job, pieces: _events(job, pieces, plan, model_name))
        return result if body.stream else completion_body(plan, result, model_name)


def prompt_ids(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Each prompt's token ids: text tokenised as text (BOS first when the tokenizer adds one), ids checked."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts:
        raise ApiError(400, "prompt must not be empty.", param="prompt")
    tokenizer, vocab = engine.tokenizer, engine.model.get_output_embeddings().weight.shape[0]
    bos = tokenizer.bos_token_id
    start = [bos] if bos is not None and tokenizer.encode("", add_special_tokens=True)[:1] == [bos] else []
    ids = []
    for index, one in enumerate(prompts):
        if isinstance(one, str):
            plain = PlainText(tokenizer)
            one = start + plain.encode(plain.protect(one))
        if not one or any(not 0 <= token < vocab for token in one):
            raise ApiError(400, f"prompt[{index}] must be non-empty text, or token ids between 0 and {vocab - 1}.",
                           param="prompt")
        ids.append(list(one))
    return ids


def plan_completion(engine: Engine, body: CompletionRequest) -> dict[str, Any]:
    """The request checked and turned into what the worker runs; anything wrong is a 400 here."""
    for text in [body.prompt] if isinstance(body.prompt, str) else body.prompt:
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate: JSON allows it, a tokenizer does not
                raise ApiError(400, f"prompt is not valid Unicode text (character {err.start}).",
                               param="prompt") from None
    prompts = prompt_ids(engine, body.prompt)
    settings, stops = request_settings(engine, body, max(map(len, prompts)), len(prompts) * body.n, "prompt")
    if body.echo and body.stream:
        raise ApiError(400, "echo cannot be combined with stream; ask for the whole answer.", param="echo")
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    echoes = [t if isinstance(t, str) else engine.decode(ids) for t, ids in zip(texts, prompts)] if body.echo else None
    return {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "prompts": prompts,
            "settings": settings, "n": body.n, "stops": stops, "seed": body.seed, "echoes": echoes,
            "logprobs": top_logprobs(body.logprobs, "logprobs", "completions"), "names": TokenNames(engine.tokenizer),
            "include_usage": bool((body.stream_options or {}).get("include_usage"))}


def run_completion(chosen: ServedModel, plan: dict[str, Any], cancelled: threading.Event,
                   emit: Emit | None = None) -> list[dict[str, Any]]:
    """The request's job: every choice's {text, finish, tokens, entries} (with echo and log-probs, the
    prompt's entries first, their offsets into the prompt text)."""
    engine, top = chosen.engine, plan["logprobs"]
    choices = [Choice(engine, plan["stops"]) for _ in range(len(plan["prompts"]) * plan["n"])]
    steps = StepLogprobs(top) if top is not None else None
    echoed = PromptLogprobs(engine.model.get_output_embeddings(), plan["prompts"], top, plan["n"]) \
        if top is not None and plan["echoes"] is not None else None
    generation = engine.continue_ids(plan["prompts"], plan["settings"], plan["n"], plan["seed"],
                                     adapter=chosen.adapter_set, on_logits=steps, on_prompt=echoed,
                                     on_token=token_callback(choices, engine.stop_ids, emit, steps),
                                     cancelled=cancelled)
    results = finish(choices, generation, emit)
    for row, result in enumerate(results):
        prompt = row // plan["n"]
        if plan["echoes"] is not None:
            shift = len(plan["echoes"][prompt])
            result["text"] = plan["echoes"][prompt] + result["text"]
            result["entries"] = [(offset + shift, entry) for offset, entry in result["entries"]]
        if echoed is not None:
            ids = plan["prompts"][prompt]
            offsets = [len(engine.decode(ids[:at])) for at in range(len(ids))]
            result["entries"] = list(zip(offsets, echoed.entries[prompt])) + result["entries"]
    return results


def completion_body(plan: dict[str, Any], results: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """OpenAI's `text_completion` object with usage (each prompt counted once, however many choices)."""
    choices = [{"index": i, "text": r["text"], "logprobs": _logprobs(plan, r["entries"]), "finish_reason": r["finish"]}
               for i, r in enumerate(results)]
    return {"id": plan["id"], "object": "text_completion", "created": plan["created"], "model": model_name,
            "choices": choices, "usage": _usage(plan, results)}


def _logprobs(plan: dict[str, Any], entries: list) -> dict | None:
    if plan["logprobs"] is None:
        return None
    return legacy_logprobs([entry for _, entry in entries], [offset for offset, _ in entries], plan["names"])


def _usage(plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, int]:
    prompt_tokens, completion_tokens = sum(map(len, plan["prompts"])), sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _events(job: Job, pieces: Any, plan: dict[str, Any], model_name: str) -> AsyncIterator[str]:
    """Server-sent events: a text chunk as each piece is final, a finish chunk per choice, optionally
    usage, then [DONE]. JobStream cancels the job when the response ends."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        payload = {"id": plan["id"], "object": "text_completion", "created": plan["created"], "model": model_name,
                   "choices": choices, **({"usage": usage} if usage is not None else {})}
        return f"data: {json.dumps(payload)}\n\n"

    while (item := await pieces.get()) is not None:
        index, text, entries = item
        yield chunk([{"index": index, "text": text, "logprobs": _logprobs(plan, entries), "finish_reason": None}])
    last = failure_event(job)
    if last is not None:
        if last:
            yield last
        return
    results = job.future.result()
    yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": r["finish"]}
                 for i, r in enumerate(results)])
    if plan["include_usage"]:
        yield chunk([], _usage(plan, results))
    yield "data: [DONE]\n\n"
