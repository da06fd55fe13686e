"""Where PPO and GRPO rewards come from: a reward model, a Python function, or an HTTP endpoint.

Every source is a callable from a batch of `Scored` items (the prompt conversation, the completion text
and the dataset's own answer) to one float per item:
- a reward model folder written by `stage: rm` (`RewardModel`, model/reward_model.py): the value head
  at the last token of the conversation, encoded with the reward model's own template;
- `reward_function: module:function` or `path/to/file.py:function`, called as
  function(prompts=[str], completions=[str], references=[str | None]) -> list of numbers, for
  verifiable rewards (the reference is the dataset's answer, e.g. the correct result, or None
  for a prompt-only record);
- an http(s) URL: POST {"messages": [[{"role", "content"}, ...], ...]} must answer {"scores": [...]},
  one number per conversation (the scoring endpoint of `tunesmith api` for a reward model).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import CONFIG_NAME


@dataclass
class Scored:
    messages: list[dict]
    """The prompt conversation, ending with the user turn."""
    completion: str
    reference: str | None


REWARD_MODEL_TYPES = ("lora", "full", "api")
RewardSource = Callable[[list[Scored]], list[float]]


def load_reward_function(spec: str) -> Callable:
    """The function named by `module:function` or `file.py:function`."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise TunesmithError(f"reward_function: {spec!r} must be `module:function` or `path/to/file.py:function`.")
    try:
        if location.endswith(".py"):
            path = Path(location)
            if not path.is_file():
                raise TunesmithError(f"reward_function: file {location} does not exist.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
    except ImportError as err:
        raise TunesmithError(f"reward_function: cannot import {location!r} ({err}). Check the module path, or "
                             "give a file path ending in .py.") from err
    except Exception as err:  # a syntax error or an exception while the module runs
        raise TunesmithError(f"reward_function: loading {location} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise TunesmithError(f"reward_function: {location} has no function {name!r}.")
    return function


def function_rewards(function: Callable, spec: str) -> RewardSource:
    """Call `function` with the keywords it takes among prompts, completions and references (all of
    them when it has **kwargs), so TRL-style `f(completions, **kwargs)` functions work too."""
    parameters = inspect.signature(function).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    offered = ("prompts", "completions", "references")
    wanted = [name for name in offered if takes_all or name in parameters]
    unknown = [name for name, p in parameters.items() if name not in offered and p.default is inspect.Parameter.empty
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    if unknown or "completions" not in wanted:
        raise TunesmithError(f"reward_function {spec} must take keyword arguments among prompts, completions and "
                             f"references (completions at least), e.g. def {function.__name__}(prompts, completions, "
                             f"references): ...; it asks for {', '.join(unknown) or 'no completions'}.")

    def score(items: list[Scored]) -> list[float]:
        given = {"prompts": [item.messages[-1]["content"] for item in items],
                 "completions": [item.completion for item in items],
                 "references": [item.reference for item in items]}
        try:
            values = function(**{name: given[name] for name in wanted})
        except Exception as err:
            raise TunesmithError(f"reward_function {spec} raised {type(err).__name__}: {err}") from err
        return _checked(values, len(items), f"reward_function {spec}")
    return score


def reward_function_specs(value: str) -> list[str]:
    """The comma-separated `module:function` / `file.py:function` entries of a reward_function value."""
    return [spec.strip() for spec in value.split(",") if spec.strip()]


class WeightedRewards:
    """Several reward functions as one source: the weighted sum of their scores. `last` keeps each
    function's scores of the latest batch, by function name, for the logs."""

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        if weights is not None and len(weights) != len(specs):
            raise TunesmithError(f"reward_weights has {len(weights)} weights for {len(specs)} reward functions "
                                 f"({', '.join(specs)}); give one weight per function, in the same order.")
        names = [spec.rpartition(":")[2] for spec in specs]
        names = names if len(set(names)) == len(names) else specs  # the spec itself when two names clash
        self.parts = [(name, function_rewards(load_reward_function(spec), spec)) for name, spec in zip(names, specs)]
        self.weights = weights or [1.0] * len(specs)
        self.last: dict[str, list[float]] = {}

    def __call__(self, items: list[Scored]) -> list[float]:
        totals = [0.0] * len(items)
        for (name, source), weight in zip(self.parts, self.weights):
            self.last[name] = source(items)
            totals = [total + weight * value for total, value in zip(totals, self.last[name])]
        return totals


def conversations(items: list[Scored]) -> list[list[dict]]:
    """Each prompt conversation with its completion as the assistant's answer."""
    return [item.messages + [{"role": "assistant", "content": item.completion}] for item in items]


class ModelRewards:
    """A reward model as a reward source; it keeps the model so a rollout can run a reward model that shares
    the policy's base beside the policy's rows (training/engine_rollout.py)."""

    def __init__(self, reward_model) -> None:
        self.reward_model = reward_model

    def __call__(self, items: list[Scored]) -> list[float]:
        return self.reward_model.score(conversations(items))


def http_rewards(url: str, timeout: float = 60.0) -> RewardSource:
    def score(items: list[Scored]) -> list[float]:
        request = urllib.request.Request(url, data=json.dumps({"messages": conversations(items)}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.loads(response.read())
        except (OSError, ValueError) as err:  # URLError, refused/reset connections, timeouts, bad JSON
            raise TunesmithError(f"reward_model {url}: the scoring request failed ({err}). The endpoint must accept "
                                 'POST {"messages": [[...], ...]} and answer {"scores": [...]}.') from err
        if not isinstance(body, dict) or "scores" not in body:
            raise TunesmithError(f'reward_model {url}: the answer has no "scores" list: {str(body)[:200]}')
        return _checked(body["scores"], len(items), f"reward_model {url}")
    return score


def _checked(values, expected: int, source: str) -> list[float]:
    """One finite float per item, or an error that says what came back."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise TunesmithError(f"{source} must return a list of numbers, got {str(values)[:200]}") from err
    if len(numbers) != expected:
        raise TunesmithError(f"{source} returned {len(numbers)} rewards for {expected} completions.")
    if not all(math.isfinite(n) for n in numbers):
        raise TunesmithError(f"{source} returned a non-finite reward: {numbers}")
    return numbers


def reward_model_type(reward_model: str, declared: str | None) -> str:
    """lora, full or api, from the reward_model value; a declared type must agree with it."""
    if reward_model.startswith(("http://", "https://")):
        found = "api"
    elif (Path(reward_model) / CONFIG_NAME).is_file():
        found = "lora"
    else:
        found = "full"
    if declared is not None and declared != found:
        raise TunesmithError(f"reward_model_type: {declared}, but reward_model {reward_model} is a {found} reward "
                             f"model; remove reward_model_type or set it to {found}.")
    return found
