"""`tunesmith export`: a base model plus LoRA adapters as one plain Hugging Face model folder.

The folder loads with vanilla transformers (no tunesmith, no PEFT), vLLM or llama.cpp's converter:
    W <- W + scaling * B A      for every adapter of adapter_name_or_path, in order
computed in float32 on the CPU and cast once to the export dtype at the end, so stacked adapters are
not rounded in between (at the cost of 4 bytes of RAM per parameter while exporting). It holds
config.json, safetensors shards of at most `export_size` GB (with model.safetensors.index.json when
there are several), the tokenizer, and a generation_config.json whose eos_token_id also lists the chat
template's end-of-turn tokens, so plain `model.generate` stops at the end of an answer. A reward model
(`stage: rm` output) also gets value_head.safetensors and a train_config.yaml, so
`RewardModel.load(export_dir)` loads it as a full reward model.

Everything is written into a hidden sibling folder first and renamed into place at the end: a run that
fails midway leaves no folder that looks like a finished export. Left out on purpose: quantization,
hub upload and .bin weights (LLaMA-Factory's export_legacy_format).

Usage:
    path = export_model(load_config("cfg.yaml", command="export"))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, PreTrainedTokenizerBase

from tunesmith.config import DataArgs, InferenceArgs, ModelArgs, RunConfig
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.inference.engine import tokenizer_folder, trained_folder
from tunesmith.model.adapters import merge_adapters, read_adapter_config
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.reward_model import TRAIN_CONFIG, _training_settings
from tunesmith.model.value_head import VALUE_HEAD_FILE, load_value_head, save_value_head

GB = 10**9  # Hugging Face's "5GB" shard size is decimal


def export_model(config: RunConfig, say: Callable[[str], None] = print) -> Path:
    """Merge adapter_name_or_path into model_name_or_path and save to export_dir."""
    model_args, inference = config.model, config.inference
    export_dir = Path(inference.export_dir).expanduser()
    adapters = model_args.adapter_name_or_path or []
    _check_destination(export_dir, model_args, config.output.overwrite_output_dir)
    for adapter in adapters:  # cheap checks before the slow model load
        read_adapter_config(adapter)
    source = trained_folder(model_args)
    settings = _training_settings(source) if source.is_dir() else {}
    tokenizer_path = tokenizer_folder(model_args)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=model_args.trust_remote_code)
    template_name = config.data.template or settings.get("template")
    stop_ids = _stop_token_ids(tokenizer, template_name, say)
    model = _merged_model(model_args, inference, say)
    _add_stop_tokens(model.generation_config, stop_ids, tokenizer.pad_token_id)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=export_dir.parent, prefix=f".{export_dir.name}.partial-"))
    try:
        dtype_name = str(model.dtype).removeprefix("torch.")
        say(f"[tunesmith] writing {dtype_name} safetensors (shards of at most {inference.export_size:g} GB) "
            f"and the tokenizer of {tokenizer_path}")
        model.save_pretrained(staging, max_shard_size=int(inference.export_size * GB))
        tokenizer.save_pretrained(staging)
        if (source / VALUE_HEAD_FILE).is_file():
            say(f"[tunesmith] adding the reward model's value head from {source}")
            _write_reward_files(staging, source, model.config.hidden_size, settings, template_name, export_dir)
        _move_into_place(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"[tunesmith] exported to {export_dir}")
    return export_dir


def _merged_model(config: ModelArgs, inference: InferenceArgs, say: Callable[[str], None]) -> torch.nn.Module:
    """The base with every adapter folded in, merged in float32 on the CPU, then cast to the export dtype."""
    say(f"[tunesmith] loading {config.model_name_or_path} in float32 on the CPU")
    # Plain sdpa, not tunesmith's packed-batch attention: config.json must name one vanilla transformers knows.
    model = load_model(config.model_name_or_path, torch.float32, torch.device("cpu"),
                       trust_remote_code=config.trust_remote_code, attn_implementation="sdpa")
    adapters = config.adapter_name_or_path or []
    if adapters:
        say(f"[tunesmith] merging {len(adapters)} adapter(s) in order: {', '.join(adapters)}")
        merge_adapters(model, adapters)
    return model.to(_export_dtype(config, inference.infer_dtype))


def _check_destination(export_dir: Path, config: ModelArgs, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder unasked, or one that holds the model or an adapter being read."""
    if export_dir.exists() and not export_dir.is_dir():
        raise TunesmithError(f"export_dir {export_dir} is a file. Set export_dir to a folder path.")
    target = export_dir.resolve()
    for source in [config.model_name_or_path, *(config.adapter_name_or_path or [])]:
        path = Path(source).expanduser()
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise TunesmithError(
                f"export_dir {export_dir} is or contains {source}, which this export reads; exporting there "
                "would delete it. Set export_dir to a new folder, e.g. next to it.")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite:
        raise TunesmithError(
            f"export_dir {export_dir} already exists and is not empty. Set `overwrite_output_dir: true` to "
            "replace it (its current contents are deleted, so no stale weight shards remain), or choose "
            "another export_dir.")


def _export_dtype(config: ModelArgs, infer_dtype: str) -> torch.dtype:
    """The named infer_dtype; for "auto" the dtype the base model's config.json records, else float32."""
    if infer_dtype != "auto":
        return getattr(torch, infer_dtype)
    recorded = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code).dtype
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase, template_name: str | None,
                    say: Callable[[str], None]) -> list[int]:
    """The chat template's end-of-turn ids plus eos; none when there is no template to ask."""
    if template_name is None and not getattr(tokenizer, "chat_template", None):
        say("[tunesmith] no template and no tokenizer chat_template: generation_config keeps the base's eos")
        return []
    return get_template(template_name, tokenizer).stop_token_ids(tokenizer)


def _add_stop_tokens(generation_config, stop_ids: list[int], pad_token_id: int | None) -> None:
    """eos_token_id := the base's eos ids + the template's stop ids, so generate() ends at the end of a turn."""
    eos = generation_config.eos_token_id
    base_eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    ids = [i for i in dict.fromkeys([*base_eos, *stop_ids]) if i is not None]
    if ids:
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if generation_config.pad_token_id is None:  # else generate() warns and pads with eos
        generation_config.pad_token_id = pad_token_id


def _write_reward_files(staging: Path, source: Path, hidden_size: int, settings: dict,
                        template_name: str | None, export_dir: Path) -> None:
    """value_head.safetensors (checked against the model) and the settings RewardModel.load reads: the
    folder is now a full reward model, scored with the template and cutoff_len it was trained with."""
    save_value_head(load_value_head(source, hidden_size), staging)
    recorded = {
        "stage": "rm", "finetuning_type": "full", "model_name_or_path": str(export_dir.resolve()),
        "template": template_name, "cutoff_len": settings.get("cutoff_len") or DataArgs.cutoff_len,
    }
    (staging / TRAIN_CONFIG).write_text(yaml.safe_dump(recorded, sort_keys=False))


def _move_into_place(staging: Path, export_dir: Path) -> None:
    """Rename the finished folder to export_dir; an existing one (already allowed) is swapped out, then deleted."""
    if not export_dir.exists():
        os.rename(staging, export_dir)
        return
    old = staging.with_name(staging.name.replace(".partial-", ".old-"))
    os.rename(export_dir, old)
    os.rename(staging, export_dir)
    shutil.rmtree(old)
