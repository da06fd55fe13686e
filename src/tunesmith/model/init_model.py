"""Write a random-init Qwen2 or Llama model folder, so tests, examples and benchmarks run offline.

Weights follow transformers' own init (normal, std = the preset's initializer_range; norms at 1), drawn
under `torch.manual_seed(seed)`, so the same seed gives identical weights. The folder is what
`from_pretrained` expects: config.json, model.safetensors (fp32), generation_config.json and the
tokenizer files. The tokenizer is trained on the bundled corpus (byte-level BPE, ChatML tokens)
unless `tokenizer_dir` names one to copy, e.g. the real Qwen2 tokenizer for the `qwen2-0.5b` shape.

Usage:
    path = init_model("runs/tiny", arch="qwen2", size="tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from tunesmith.errors import TunesmithError
from tunesmith.model.loading import load_tokenizer
from tunesmith.model.sizes import SIZE_PRESETS
from tunesmith.model.tokenizer_build import IM_END, corpus_texts, train_tokenizer

ARCHS = ("qwen2", "llama")  # transformers model_type names
# The bundled corpus yields ~3k merges; asking for more only costs training time.
TRAINED_VOCAB_CAP = 4096


def build_config(arch: str, size: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedConfig:
    """The transformers config for `arch` at preset `size`, with the tokenizer's special ids."""
    _check_choices(arch, size)
    preset = dict(SIZE_PRESETS[size])
    if tokenizer is not None:
        preset["vocab_size"] = max(preset["vocab_size"], len(tokenizer))
        preset.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    preset.setdefault("initializer_range", 0.02)
    return AutoConfig.for_model(arch, **preset)


def init_model(out_dir: str | os.PathLike, arch: str = "qwen2", size: str = "tiny", seed: int = 0,
               tokenizer_dir: str | None = None) -> Path:
    """Write a random-init `arch` model of preset `size` with its tokenizer to `out_dir`; return the path."""
    _check_choices(arch, size)  # before training a tokenizer for nothing
    out_dir = Path(out_dir)
    tokenizer = _tokenizer(size, tokenizer_dir)
    config = build_config(arch, size, tokenizer)
    torch.manual_seed(seed)
    # from_config builds the modules once and applies transformers' _init_weights (std 0.02).
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stop_ids = _stop_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _check_choices(arch: str, size: str) -> None:
    if arch not in ARCHS:
        raise TunesmithError(f"Unknown model arch {arch!r}. Choose one of {list(ARCHS)}.")
    if size not in SIZE_PRESETS:
        raise TunesmithError(f"Unknown model size {size!r}. Choose one of {list(SIZE_PRESETS)}.")


def _tokenizer(size: str, tokenizer_dir: str | None) -> PreTrainedTokenizerBase:
    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir)  # same pad-token rule as training will use
    return train_tokenizer(corpus_texts(), min(SIZE_PRESETS[size]["vocab_size"], TRAINED_VOCAB_CAP))


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos, plus `<|im_end|>` when the tokenizer has it: chat turns end there even when eos differs
    (the base Qwen2 tokenizer's eos is `<|endoftext|>`; Qwen2-Instruct stops on both)."""
    stop = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is not None and im_end != tokenizer.unk_token_id and im_end not in stop:
        stop.append(im_end)
    return stop
