"""What a training stage declares, in one place: the registry (stages/__init__.py) lists these.

A stage module (sft.py, rm.py, dpo.py, ppo.py, grpo.py) defines `STAGE = StageSpec(...)`: its name,
its own config section, how it builds its data, how it builds the loop's `Stage` once the model is
loaded, the metrics it plots, whether it trains a fresh adapter and needs a reference model, and its
checks across config sections. config loading, run.py and the adapter setup read these fields and
keep no lists of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunesmith.config import RunConfig
from tunesmith.training.loop import RunData, Stage
from tunesmith.training.reference import Reference


@dataclass
class StageInputs:
    """What `StageSpec.build` gets once the model is loaded and its trainable weights are set."""

    model: torch.nn.Module
    config: RunConfig
    tokenizer: object
    data: RunData
    device: torch.device
    reference: Reference | None
    """The starting model, when the stage declares it needs one (`needs_reference`)."""


def no_problems(config: RunConfig, command: str) -> list[tuple[str, str]]:
    """The check of a stage that has nothing to add to the sections' own checks."""
    return []


def never(config: RunConfig) -> bool:
    """`needs_reference` of a stage that has no reference model."""
    return False


@dataclass(frozen=True)
class StageSpec:
    """One training method, as the rest of tunesmith sees it."""

    name: str
    """The `stage:` value."""
    build_data: Callable[[RunConfig, object, torch.device], RunData]
    """build_data(config, tokenizer, device): rows, built before the model loads (cheap errors first)."""
    build: Callable[[StageInputs], Stage]
    """The loop's Stage for the loaded model (attach a value head, set up scoring...)."""
    args: type | None = None
    """The stage's own config section (a dataclass of flat keys; see config/schema.py), or None."""
    plotted: tuple[str, ...] = ("loss", "eval_loss")
    """Curves plot_loss draws (training_<key>.png) when the log has them."""
    fresh_adapter: bool = True
    """LoRA: merge every given adapter and train a new one (False: resume training the last one, as SFT)."""
    needs_reference: Callable[[RunConfig], bool] = never
    """Whether the run holds the policy to its starting model (then `StageInputs.reference` is set)."""
    precomputes_reference: Callable[[RunConfig], bool] = never
    """Whether every reference result is computed before the first update (then full fine-tuning needs no
    frozen copy of the model: the live model is the reference until then)."""
    check: Callable[[RunConfig, str], list[tuple[str, str]]] = no_problems
    """(key, message) problems across sections, for a command (train, chat, export, api)."""
    packs_samples: bool = False
    """Whether `packing: true` applies (the other stages batch their rows their own way)."""
    saves_value_head: bool = False
    """The result is a reward model: its value head is saved beside the adapter or model."""
