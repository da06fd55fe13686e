"""Decide which weights train: LoRA adapters, every weight (full), or the last layers (freeze).

For SFT, LoRA follows LLaMA-Factory's rule for `adapter_name_or_path`: all listed adapters but the
last are merged into the base, the last is loaded and its training resumed; without one, a fresh
adapter is injected. Stages that declare `fresh_adapter` (rm, dpo, ppo, grpo) merge every listed adapter
and train a fresh one: for DPO, PPO and GRPO the merged model (typically base + SFT adapter) is then
exactly the reference, reached by disabling the new adapter. Trainable weights are kept in float32 even when the frozen base is bf16/fp16, so AdamW's
small updates are not rounded away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.config import AdapterArgs, ModelArgs
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapters, merge_adapters
from tunesmith.model.lora import inject_lora


@dataclass
class AdapterSettings:
    """The LoRA hyper-parameters an adapter is saved with (PEFT's adapter_config.json)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    use_rslora: bool


def prepare_for_training(model: torch.nn.Module, model_args: ModelArgs, adapter: AdapterArgs, fresh_adapter: bool,
                         gradient_checkpointing: bool) -> AdapterSettings | None:
    """Set requires_grad per finetuning_type; returns the adapter settings for LoRA runs.

    `fresh_adapter` (the stage's declaration): merge every given adapter and train a new one, instead
    of resuming the last given adapter."""
    settings = None
    if adapter.finetuning_type == "lora":
        settings = _prepare_lora(model, model_args.adapter_name_or_path or [], adapter, fresh_adapter)
    elif adapter.finetuning_type == "full":
        model.requires_grad_(True)
    else:
        _prepare_freeze(model, adapter.freeze_trainable_layers, adapter.freeze_trainable_modules)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if gradient_checkpointing:
        # transformers >= 5 renamed it; older releases (which we also support) only have the old name.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return settings


def trainable_summary(model: torch.nn.Module) -> str:
    """PEFT's one-line count of trainable and total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _prepare_lora(model: torch.nn.Module, given: list[str], config: AdapterArgs, fresh_adapter: bool) -> AdapterSettings:
    if given and fresh_adapter:
        merge_adapters(model, given)
    elif given:
        saved = apply_adapters(model, given, trainable_last=True)
        targets = saved["target_modules"]
        return AdapterSettings(saved["r"], saved["lora_alpha"], saved.get("lora_dropout", 0.0),
                               sorted(targets) if isinstance(targets, list) else targets,
                               saved.get("use_rslora", False))
    target = "all" if config.lora_target == ["all"] else config.lora_target
    paths = inject_lora(model, target, config.lora_rank, config.lora_alpha, config.lora_dropout, config.use_rslora)
    names = sorted({path.rsplit(".", 1)[-1] for path in paths})
    return AdapterSettings(config.lora_rank, config.lora_alpha, config.lora_dropout, names, config.use_rslora)


def _prepare_freeze(model, trainable_layers: int, modules: list[str]) -> None:
    """Train the last N decoder layers (first -N when negative), optionally only the named sub-modules."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TunesmithError("finetuning_type: freeze needs a decoder with a `layers` list; use lora or full.")
    if trainable_layers == 0 or abs(trainable_layers) > len(layers):
        raise TunesmithError(
            f"freeze_trainable_layers: {trainable_layers} must be between -{len(layers)} and {len(layers)}, "
            "not 0 (the model has that many decoder layers).")
    chosen = layers[-trainable_layers:] if trainable_layers > 0 else layers[:-trainable_layers]
    model.requires_grad_(False)
    matched = 0
    for layer in chosen:
        for name, param in layer.named_parameters():
            if modules == ["all"] or any(part in modules for part in name.split(".")):
                param.requires_grad_(True)
                matched += 1
    if matched == 0:
        names = sorted({n.split(".")[0] for n, _ in chosen[0].named_parameters()})
        raise TunesmithError(f"freeze_trainable_modules: {modules} matches nothing in a decoder layer; "
                             f"its modules are {', '.join(names)} (or use `all`).")
