"""LoRA adapters on disk in PEFT's format, so they move freely between tunesmith, PEFT, LLaMA-Factory and vLLM.

A PEFT LoRA folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors` with one pair of tensors per adapted layer:
    base_model.model.<module path>.lora_A.weight   # [r, in]
    base_model.model.<module path>.lora_B.weight   # [out, r]
"base_model.model." is the prefix PEFT's wrapper puts before the transformers model's own paths.

Loading reads safetensors only (a pickled `.bin` is refused: we never unpickle) and checks every tensor's
name and shape before copying, so a wrong adapter fails loudly instead of half-loading. DoRA, bias
training, modules_to_save, per-layer rank/alpha patterns and other PEFT extras are refused by name.

Usage:
    save_adapter(model, "out/checkpoint-100", "Qwen/Qwen2.5-0.5B", rank=8, alpha=16, dropout=0.0,
                 target_modules=["q_proj", "v_proj"], use_rslora=False)
    config = apply_adapters(model, ["out/sft", "out/dpo"], trainable_last=True)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.atomic_files import write_atomically
from tunesmith.model.lora import (
    find_lora_targets,
    inject_lora,
    lora_modules,
    lora_parameters,
    merge_and_unload,
    select_linears,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# adapter_config.json keys whose non-default values change the maths; we refuse them rather than load wrong.
# Each maps to the check that says the value is one we implement.
SUPPORTED_VALUES = {
    "use_dora": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "rank_pattern": lambda v: not v,
    "alpha_pattern": lambda v: not v,
    "layers_to_transform": lambda v: v is None,
    "layer_replication": lambda v: not v,
    "exclude_modules": lambda v: not v,
    "target_parameters": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
    "use_qalora": lambda v: not v,
    "use_bdlora": lambda v: not v,
}


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str],
    use_rslora: bool,
) -> None:
    """Write the model's LoRA weights and config to `out_dir` in PEFT's format."""
    modules = dict(lora_modules(model))
    if not modules:
        raise TunesmithError(f"Cannot save an adapter to {out_dir}: the model has no LoRA layers.")
    if target_modules == "all":
        # PEFT has no "all" of its own: write the short names that "all" selected here.
        target_modules = sorted({name.rsplit(".", 1)[-1] for name in modules})
    elif isinstance(target_modules, str):
        target_modules = [target_modules]
    config = _peft_config(base_model_name_or_path, rank, alpha, dropout, target_modules, use_rslora)
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(out / CONFIG_NAME, lambda tmp: tmp.write_text(text))


def _peft_config(base_model_name_or_path: str, rank: int, alpha: float, dropout: float,
                 target_modules: list[str], use_rslora: bool) -> dict[str, object]:
    """adapter_config.json as PEFT writes it for a plain LoRA, every extra spelled out at its off value."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(target_modules),
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate `adapter_config.json`; refuse anything this LoRA cannot reproduce exactly."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise TunesmithError(
            f"No {CONFIG_NAME} in adapter folder {adapter_dir}. Point adapter_name_or_path at a folder "
            f"saved by tunesmith or PEFT's save_pretrained."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{path} is not valid JSON ({e}); re-save the adapter.") from e
    if config.get("peft_type") != "LORA":
        raise TunesmithError(
            f"{path} has peft_type {config.get('peft_type')!r}; tunesmith loads only LoRA adapters "
            f"(peft_type 'LORA'). Merge this adapter with PEFT first, or train a LoRA adapter."
        )
    for key, supported in SUPPORTED_VALUES.items():
        if key in config and not supported(config[key]):
            raise TunesmithError(
                f"{path} sets {key} = {config[key]!r}, which tunesmith's LoRA does not support "
                f"(plain LoRA/rsLoRA on Linear layers only). Merge the adapter into the base model "
                f"with PEFT's merge_and_unload and fine-tune that instead."
            )
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise TunesmithError(
            f"{path} lacks {', '.join(missing)}; re-save the adapter with PEFT or tunesmith."
        )
    targets = config["target_modules"]
    if targets == "all-linear":
        config["target_modules"] = "all"
    elif isinstance(targets, str) or not targets:
        raise TunesmithError(
            f"{path} has target_modules = {targets!r}; tunesmith needs a list of module names "
            '(e.g. ["q_proj", "v_proj"]) or "all-linear", not a regular expression.'
        )
    return config


def _read_lora_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors on CPU; refuse pickle files with instructions to convert them."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        hint = ""
        if (adapter_dir / PICKLE_WEIGHTS_NAME).is_file():
            hint = (
                f" It has {PICKLE_WEIGHTS_NAME}, a pickle file that tunesmith never loads (unpickling can run "
                f'code). If you trust it, convert it once: python -c "import torch; from safetensors.torch '
                f"import save_file; save_file(torch.load('{PICKLE_WEIGHTS_NAME}'), '{WEIGHTS_NAME}')\"."
            )
        raise TunesmithError(f"No {WEIGHTS_NAME} in adapter folder {adapter_dir}.{hint}")
    with safe_open(path, framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _check_tensors(adapter_dir: Path, tensors: dict[str, torch.Tensor],
                   expected: dict[str, tuple[int, int]]) -> None:
    """Every expected tensor present with its shape, and nothing else: name the first offender."""
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    wrong = [k for k in expected.keys() & tensors.keys() if tuple(tensors[k].shape) != expected[k]]
    where = f"{adapter_dir / WEIGHTS_NAME}"
    if missing:
        raise TunesmithError(
            f"{where} lacks tensor {missing[0]} ({len(missing)} missing in all) that its {CONFIG_NAME} "
            f"target_modules imply for this model; the adapter was trained for another model or is incomplete."
        )
    if extra:
        raise TunesmithError(
            f"{where} has tensor {extra[0]} ({len(extra)} unexpected in all) that no targeted LoRA layer "
            f"of this model owns; check that base_model_name_or_path matches the adapter's base model."
        )
    if wrong:
        k = sorted(wrong)[0]
        raise TunesmithError(
            f"{where} tensor {k} has shape {tuple(tensors[k].shape)} but this model needs {expected[k]}; "
            f"the adapter was trained on a model of another size or with another rank."
        )


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, trainable: bool) -> dict[str, Any]:
    """Inject LoRA as the adapter's config says, load its weights, and return the config.

    Every tensor's name and shape is checked before the model is touched, so a bad adapter leaves it as it was.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_lora_tensors(adapter_dir)
    rank = config["r"]
    expected = {}
    for name in find_lora_targets(model, config["target_modules"]):
        base = model.get_submodule(name)
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, base.in_features)  # A: [r, in]
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (base.out_features, rank)  # B: [out, r]
    _check_tensors(adapter_dir, tensors, expected)
    inject_lora(
        model,
        config["target_modules"],
        rank=rank,
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        use_rslora=config.get("use_rslora", False),
    )
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    for p in lora_parameters(model):
        p.requires_grad_(trainable)
    return config


def apply_adapters(model: nn.Module, adapter_dirs: list[str], trainable_last: bool) -> dict[str, Any]:
    """LLaMA-Factory's rule for several adapters: merge all but the last into the base, keep the last live.

    The last adapter stays a LoRA layer (trainable if `trainable_last`, to resume its training);
    every other parameter is frozen. Returns the last adapter's config.
    """
    if not adapter_dirs:
        raise TunesmithError(
            "apply_adapters needs at least one adapter folder; adapter_name_or_path is empty."
        )
    merge_adapters(model, adapter_dirs[:-1])
    return load_adapter(model, adapter_dirs[-1], trainable=trainable_last)


def merge_adapters(model: nn.Module, adapter_dirs: list[str]) -> None:
    """Fold each adapter into the base weights in turn; the model is left without LoRA layers."""
    for adapter_dir in adapter_dirs:
        load_adapter(model, adapter_dir, trainable=False)
        merge_and_unload(model)


def load_side_adapter(model: nn.Module, adapter_dir: str | os.PathLike, name: str) -> bool:
    """Attach a LoRA adapter as the frozen side adapter `name` of the model's existing LoRA layers.

    This is how a LoRA reward model shares the policy's base weights during PPO. Returns False, leaving
    the model untouched, when some layer the adapter targets has no LoRA layer of its own here (the
    policy adapts fewer modules); the caller then loads the adapter on a copy of the base instead.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_lora_tensors(adapter_dir)
    layers = dict(lora_modules(model))
    wanted = set(select_linears(model, config["target_modules"]))
    if not wanted or not wanted <= layers.keys():
        return False
    rank = config["r"]
    expected = {}
    for path in wanted:
        base = layers[path].base_layer
        expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (rank, base.in_features)
        expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (base.out_features, rank)
    _check_tensors(adapter_dir, tensors, expected)
    alpha = config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    for path in wanted:
        device = layers[path].base_layer.weight.device
        layers[path].side[name] = (tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"].float().to(device),
                                   tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"].float().to(device), scaling)
    return True

