"""A request's generation fields checked against OpenAI's ranges and turned into `SamplingSettings`:
what /v1/chat/completions and /v1/completions share. Anything out of range is a 400 naming the field."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict

from tunesmith.config import SamplingSettings
from tunesmith.inference.api_errors import ApiError
from tunesmith.inference.engine import Engine


class SamplingRequest(BaseModel):
    """The generation fields /v1/chat/completions and /v1/completions share; fields not listed are accepted
    and ignored, as OpenAI's clients send more than a server uses."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None


MAX_CHOICES = 16  # answers per request: n, times the prompts of /v1/completions
SEED_RANGE = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes
MAX_TOP_LOGPROBS = {"chat": 20, "completions": 5}  # OpenAI's limits for top_logprobs and legacy logprobs


def request_settings(engine: Engine, body: object, prompt_tokens: int, rows: int,
                     prompt_param: str = "messages") -> tuple[SamplingSettings, list[str]]:
    """(settings, stop strings) for a request's max_tokens, temperature, top_p, n, seed and stop;
    `prompt_tokens` is its longest prompt, `rows` the answers it asks for."""
    defaults = engine.sampling
    if body.seed is not None and body.seed not in SEED_RANGE:
        raise ApiError(400, f"seed must be between {SEED_RANGE.start} and {SEED_RANGE.stop - 1}.", param="seed")
    asked = (getattr(body, "max_completion_tokens", None), body.max_tokens)
    max_tokens = next((v for v in asked if v is not None), defaults.max_new_tokens)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    if prompt_tokens + max_tokens > engine.cutoff_len:
        raise ApiError(400, f"This model's context is {engine.cutoff_len} tokens (cutoff_len); the {prompt_param} "
                            f"take {prompt_tokens} and max_tokens asks for {max_tokens} more. Shorten the "
                            f"{prompt_param} or lower max_tokens.", param=prompt_param, code="context_length_exceeded")
    most = min(MAX_CHOICES, engine.scheduler.max_rows)  # a request's answers decode together
    if not 1 <= body.n <= most or rows > most:
        raise ApiError(400, f"n must be between 1 and {most} (times the prompts; max_num_seqs is "
                            f"{engine.scheduler.max_rows}), got {body.n}.", param="n")
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
    return settings, stops


def top_logprobs(count: int | None, param: str, endpoint: str) -> int | None:
    """The number of alternatives asked for (None: no log-probs), within OpenAI's range for `endpoint`."""
    most = MAX_TOP_LOGPROBS[endpoint]
    if count is not None and not 0 <= count <= most:
        raise ApiError(400, f"{param} must be between 0 and {most}, got {count}.", param=param)
    return count


def chat_top_logprobs(logprobs: bool | None, top: int | None) -> int | None:
    """Chat's `logprobs: true` and `top_logprobs: N` as one count (None: none asked for)."""
    if top is not None and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    return top_logprobs(top or 0, "top_logprobs", "chat") if logprobs else None
