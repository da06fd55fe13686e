"""Groups of a model the decode scheduler's slot decoder cannot run (not Llama-family, a 4/8-bit base): each
runs on its own through `generate`, with the per-row callbacks seeing what they would see in a batch."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.model.adapter_sets import adapter_set
from tunesmith.model.lora import disable_lora
from tunesmith.sampling.generate import generate
from tunesmith.sampling.rows import RowGroup
from tunesmith.sampling.slot_decoder import BASE, OWN

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def run_alone(model: PreTrainedModel, group: RowGroup) -> Any:
    """A group through `generate` (rows decoded together, one prompt each), for models the slot decoder
    cannot run; the per-row callbacks see what they would see in the batch."""
    requests = group.requests
    if any(request.follows is not None for request in requests):
        raise TunesmithError("rows that follow another row need a Llama-family model the slot decoder runs.")
    first = requests[0]
    device = next(model.parameters()).device
    done = [False] * len(requests)

    def on_step(tokens: list[int]) -> list[int]:
        ended = []
        for index, (token, request) in enumerate(zip(tokens, requests)):
            if done[index]:
                continue
            said = request.on_token is not None and request.on_token(token)  # the stop token too, as in a batch
            done[index] = token in request.stop_ids or group.cancelled.is_set() or bool(said)
            if done[index]:
                ended.append(index)
        return ended

    def on_logits(logits: torch.Tensor, tokens: torch.Tensor) -> None:
        for index, request in enumerate(requests):
            if not done[index] and request.on_logits is not None:
                request.on_logits(logits[index], int(tokens[index]))

    def on_prompt(states: torch.Tensor) -> None:
        for index, request in enumerate(requests):
            if request.on_prompt is not None:
                request.on_prompt(states[index, states.shape[1] - len(request.prompt):], 0)

    generators = [r.generator or torch.Generator(device).manual_seed(int(torch.randint(2**62, ()))) for r in requests]
    with adapter_scope(model, first.adapter):
        return generate(model, [r.prompt for r in requests], first.settings, first.stop_ids, 0, 1, generators,
                        on_step=on_step, on_logits=on_logits, on_prompt=on_prompt)


def adapter_scope(model: PreTrainedModel, adapter: str | None) -> contextlib.AbstractContextManager:
    """Run `model` as a row of `adapter` computes in the slot decoder: None and OWN as it runs now (its own
    LoRA), BASE with every adapter off, a side set's name with that set."""
    if adapter in (None, OWN):
        return contextlib.nullcontext()
    if adapter == BASE:
        return disable_lora(model)
    return adapter_set(model, adapter)
