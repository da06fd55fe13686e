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

Everything is written into a hidden staging folder beside export_dir first (`atomic_files.staging_folder`)
and renamed into place at the end, so a run that fails midway leaves no folder that looks like a finished
export; a killed run's staging folder is removed by the next export to the same place. The export lists
what it wrote in `tunesmith_export.json`. Export never deletes a file it did not write: a non-empty
export_dir is refused unless it holds an earlier export, and with `overwrite_output_dir` only the files
that export listed are replaced (the list covers old and new files while they are swapped, so a kill
midway loses track of nothing). Files and folders get the modes the umask asks for. Left out on
purpose: quantization, hub upload and .bin weights (LLaMA-Factory's export_legacy_format).

Usage:
    path = export_model(load_config("cfg.yaml", command="export"))
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, PreTrainedTokenizerBase

from tunesmith.config import DataArgs, InferenceArgs, ModelArgs, RunConfig
from tunesmith.data.templates import FormatTemplate, get_template
from tunesmith.errors import TunesmithError
from tunesmith.inference.engine import tokenizer_folder, trained_folder
from tunesmith.inference.gguf_export import gguf_file_name, gguf_pre_tokenizer, ollama_modelfile, write_gguf
from tunesmith.model.adapters import merge_adapters, read_adapter_config
from tunesmith.model.atomic_files import (
    follow_umask,
    remove_interrupted_writes,
    staging_folder,
    write_atomically,
)
from tunesmith.model.gguf_import import local_model_source
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.reward_model import TRAIN_CONFIG, training_settings
from tunesmith.model.value_head import VALUE_HEAD_FILE, load_value_head, save_value_head

GB = 10**9  # Hugging Face's "5GB" shard size is decimal
MARKER = "tunesmith_export.json"
"""Lists the files an export wrote: the only ones a later export into the same folder may remove."""


def export_model(config: RunConfig, say: Callable[[str], None] = print) -> Path:
    """Merge adapter_name_or_path into model_name_or_path and save to export_dir."""
    model_args, inference = config.model, config.inference
    export_dir = Path(inference.export_dir).expanduser()
    adapters = model_args.adapter_name_or_path or []
    _check_destination(export_dir, model_args, config.output.overwrite_output_dir)
    for leftover in remove_interrupted_writes(export_dir.parent, target=export_dir.name):
        say(f"[tunesmith] removed {leftover}, left by an export that was killed")
    for adapter in adapters:  # cheap checks before the slow model load
        read_adapter_config(adapter)
    source = trained_folder(model_args)
    settings = training_settings(source) if source.is_dir() else {}
    tokenizer_path = tokenizer_folder(model_args)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=model_args.trust_remote_code)
    template_name = config.data.template or settings.get("template")
    stop_ids = _stop_token_ids(tokenizer, template_name, say)
    as_gguf = inference.export_format == "gguf"
    if as_gguf and (source / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(f"{source} is a reward model (it has {VALUE_HEAD_FILE}); GGUF has no place for its "
                             "value head. Export it without export_format (a Hugging Face folder).")
    model = _merged_model(model_args, inference, say, cast=not as_gguf)
    _add_stop_tokens(model.generation_config, stop_ids, tokenizer.pad_token_id)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(export_dir)
    try:
        if as_gguf:
            _write_gguf_files(staging, export_dir, model, tokenizer, model_args, inference.export_gguf_type,
                              template_name, stop_ids, say)
        else:
            dtype_name = str(model.dtype).removeprefix("torch.")
            say(f"[tunesmith] writing {dtype_name} safetensors (shards of at most {inference.export_size:g} GB) "
                f"and the tokenizer of {tokenizer_path}")
            model.save_pretrained(staging, max_shard_size=int(inference.export_size * GB))
            tokenizer.save_pretrained(staging)
        if (source / VALUE_HEAD_FILE).is_file():
            say(f"[tunesmith] adding the reward model's value head from {source}")
            _write_reward_files(staging, source, model.config.hidden_size, settings, template_name, export_dir)
        _write_marker(staging, sorted(path.name for path in staging.iterdir()))
        follow_umask(staging)  # safetensors writes its files 0600
        _move_into_place(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
    say(f"[tunesmith] exported to {export_dir}")
    return export_dir


def _merged_model(config: ModelArgs, inference: InferenceArgs, say: Callable[[str], None],
                  cast: bool = True) -> torch.nn.Module:
    """The base with every adapter folded in, merged in float32 on the CPU, then (`cast`) cast to the export
    dtype."""
    say(f"[tunesmith] loading {config.model_name_or_path} in float32 on the CPU")
    # Plain sdpa, not tunesmith's packed-batch attention: config.json must name one vanilla transformers knows.
    model = load_model(config.model_name_or_path, torch.float32, torch.device("cpu"),
                       trust_remote_code=config.trust_remote_code, attn_implementation="sdpa")
    adapters = config.adapter_name_or_path or []
    if adapters:
        say(f"[tunesmith] merging {len(adapters)} adapter(s) in order: {', '.join(adapters)}")
        merge_adapters(model, adapters)
    return model.to(_export_dtype(config, inference.infer_dtype)) if cast else model


def _write_gguf_files(staging: Path, export_dir: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      config: ModelArgs, gguf_type: str, template_name: str | None, stop_ids: list[int],
                      say: Callable[[str], None]) -> None:
    """<name>.<TYPE>.gguf with the tokenizer and chat template, and an Ollama Modelfile beside it."""
    template = get_template(template_name, tokenizer) if template_name or tokenizer.chat_template else None
    builtin = template if isinstance(template, FormatTemplate) else None
    chat_template = builtin.to_jinja(tokenizer) if builtin else tokenizer.chat_template
    name = gguf_file_name(export_dir, gguf_type)
    say(f"[tunesmith] writing {name} ({gguf_type}) with the tokenizer and "
        f"{'the ' + builtin.name + ' template' if builtin else 'the tokenizer chat template' if chat_template else 'no chat template'}")
    pre_tokenizer = gguf_pre_tokenizer(config.model_name_or_path)
    if pre_tokenizer is None and model.config.model_type != "qwen2":
        say("[tunesmith] note: the base did not come from a GGUF, so the file names llama.cpp's `default` "
            "pre-tokenizer; if the model's own splits digits or punctuation differently (Llama 3: llama-bpe, "
            "SmolLM: smollm), llama.cpp will tokenize some text differently than training did.")
    write_gguf(model, tokenizer, staging / name, gguf_type, pre_tokenizer=pre_tokenizer, chat_template=chat_template)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    (staging / "Modelfile").write_text(ollama_modelfile(name, builtin, tokenizer, stops), encoding="utf-8")


def _check_destination(export_dir: Path, config: ModelArgs, overwrite: bool) -> None:
    """Refuse a file, a folder that holds the model or an adapter being read, a non-empty folder that is not
    an earlier export, and an earlier export unless `overwrite`."""
    if export_dir.exists() and not export_dir.is_dir():
        raise TunesmithError(f"export_dir {export_dir} is a file. Set export_dir to a folder path.")
    target = export_dir.resolve()
    for source in [config.model_name_or_path, *(config.adapter_name_or_path or [])]:
        path = Path(source).expanduser()
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise TunesmithError(
                f"export_dir {export_dir} is or contains {source}, which this export reads; exporting there "
                "would replace what it reads. Set export_dir to a new folder, e.g. next to it.")
    found = sorted(path.name for path in export_dir.iterdir()) if export_dir.is_dir() else []
    if not found:
        return
    if _written_before(export_dir) is None:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise TunesmithError(
            f"export_dir {export_dir} is not empty ({shown}) and holds no earlier tunesmith export (no {MARKER}). "
            "Export never deletes files it did not write: choose a new or empty export_dir, or move those files "
            "away first.")
    if not overwrite:
        raise TunesmithError(
            f"export_dir {export_dir} holds an earlier export. Set `overwrite_output_dir: true` to replace it "
            f"(only the files listed in its {MARKER} are removed; anything else there stays), or choose "
            "another export_dir.")


def _written_before(export_dir: Path) -> list[str] | None:
    """The names an earlier export listed in export_dir's marker; None when there is no marker."""
    path = export_dir / MARKER
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["files"]
        valid = isinstance(names, list) and all(
            isinstance(name, str) and name not in ("", ".", "..", MARKER) and "/" not in name and "\\" not in name
            for name in names)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise TunesmithError(
            f'{path} is not the list tunesmith writes ({{"files": [file names]}}), so export cannot tell which '
            f"files of {export_dir} are its own and removes none. Restore the file, or choose another export_dir.")
    return names


def _write_marker(folder: Path, names: list[str]) -> None:
    text = json.dumps({"written_by": "tunesmith export", "files": names}, indent=2) + "\n"
    write_atomically(folder / MARKER, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _export_dtype(config: ModelArgs, infer_dtype: str) -> torch.dtype:
    """The named infer_dtype; for "auto" the dtype the base model's config.json records, else float32."""
    if infer_dtype != "auto":
        return getattr(torch, infer_dtype)
    recorded = AutoConfig.from_pretrained(local_model_source(config.model_name_or_path),
                                          trust_remote_code=config.trust_remote_code).dtype
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
    """A new export_dir is the staging folder renamed (atomic). Into an existing one (empty, or an earlier
    export) the files move one by one, replacing only what the earlier export listed."""
    if not export_dir.exists():
        os.rename(staging, export_dir)
        return
    old = _written_before(export_dir) or []
    new = sorted(path.name for path in staging.iterdir() if path.name != MARKER)
    clashes = sorted({path.name for path in export_dir.iterdir()} & set(new) - set(old))
    if clashes:
        raise TunesmithError(
            f"export_dir {export_dir} holds {', '.join(clashes)}, which this export writes but an earlier one did "
            f"not (not listed in {MARKER}); export does not overwrite files it did not write. Move them away, or "
            "choose another export_dir.")
    _write_marker(export_dir, sorted({*old, *new}))  # a kill from here on leaves every file listed
    # config.json goes first and comes back last: without it the folder does not load as a model halfway
    for name in sorted(old, key=lambda name: name != "config.json"):
        path = export_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name in sorted(new, key=lambda name: name == "config.json"):
        os.replace(staging / name, export_dir / name)
    os.replace(staging / MARKER, export_dir / MARKER)
