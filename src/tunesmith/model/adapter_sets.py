"""Several LoRA adapters on one unmerged base, switched per request: how `tunesmith api` serves
`served_adapters` beside its default model with one copy of the base weights.

Every layer some adapter targets becomes a `LoRALinear` whose own LoRA weights stay unused; each adapter
set's A, B and scaling sit in the layer's `side` dict (the mechanism a LoRA reward model uses to share
the policy's base), and `active_side` names the set a forward runs (a layer the set does not adapt runs
its base). A set is one adapter, or a chain (the default model's adapter_name_or_path) whose updates add
up exactly as merging them in turn does, kept as one update of rank r_1 + ... + r_n:

    h = W x + sum_i s_i B_i A_i x = W x + [s_1 B_1, ..., s_n B_n] [A_1; ...; A_n] x

Switching sets sets one attribute per layer: nothing is read from disk or copied after loading.

Usage:
    add_adapter_set(model, "", ["saves/sft", "saves/dpo"])
    add_adapter_set(model, "kind", ["saves/kind"])
    select_adapter_set(model, "")          # what runs between requests
    with adapter_set(model, "kind"):
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import load_side_adapter, read_adapter_config
from tunesmith.model.lora import LoRALinear, lora_modules, select_linears


def add_adapter_set(model: nn.Module, name: str, chain: list[str | os.PathLike]) -> None:
    """Load the adapters in `chain` (checked tensor by tensor, safetensors only) as the set `name`."""
    for folder in chain:
        _wrap(model, select_linears(model, read_adapter_config(folder)["target_modules"]))
    keys = [f"{name}\0{index}" for index in range(len(chain))]  # one temporary side entry per adapter
    for key, folder in zip(keys, chain):
        if not load_side_adapter(model, folder, key):
            raise TunesmithError(f"{folder}: its target_modules match no layer of this model.")
    for _, layer in lora_modules(model):
        parts = [layer.side.pop(key) for key in keys if key in layer.side]
        if len(parts) == 1:
            layer.side[name] = parts[0]
        elif parts:
            layer.side[name] = (torch.cat([lora_A for lora_A, _, _ in parts]),
                                torch.cat([lora_B * scaling for _, lora_B, scaling in parts], dim=1), 1.0)


def _wrap(model: nn.Module, paths: list[str]) -> None:
    """Put a frozen `LoRALinear` around each Linear in `paths` that has none yet; its own weights
    (rank 1, B = 0) only hold the place: served layers always run a side set or the base."""
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            continue
        parent_name, _, child_name = path.rpartition(".")
        layer = LoRALinear(module, rank=1, alpha=1.0)
        layer.requires_grad_(False)
        layer.train(module.training)
        setattr(model.get_submodule(parent_name), child_name, layer)


def select_adapter_set(model: nn.Module, name: str) -> None:
    """Run every LoRA layer with the set `name` from now on."""
    for _, layer in lora_modules(model):
        layer.active_side = name


@contextmanager
def adapter_set(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model with the set `name` inside the block, then with whatever set ran before."""
    layers = [layer for _, layer in lora_modules(model)]
    before = [layer.active_side for layer in layers]
    for layer in layers:
        layer.active_side = name
    try:
        yield
    finally:
        for layer, previous in zip(layers, before):
            layer.active_side = previous
