"""`tunesmith train`: from a validated config to a trained adapter or model folder, then `do_predict`.

Order matters for users: everything that can fail cheaply (config, output folder, data) fails before
the slow parts (model load, training). The stage table is the one place a new method plugs in.
With `do_predict`, inference/predict.py answers eval_dataset's prompts after training (with the model
just written to output_dir), or on its own with `do_train: false`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import TrainConfig, save_config
from tunesmith.errors import TunesmithError
from tunesmith.inference.predict import run_prediction
from tunesmith.model.adapters import save_adapter
from tunesmith.model.finetune import (
    FRESH_ADAPTER_STAGES,
    AdapterSettings,
    prepare_for_training,
    trainable_summary,
)
from tunesmith.model.loading import load_model, load_tokenizer, resolve_device_and_dtype, with_compute_dtype
from tunesmith.model.value_head import ATTRIBUTE as VALUE_HEAD_ATTRIBUTE
from tunesmith.model.value_head import save_value_head, without_value_head
from tunesmith.training import checkpoint, loop, rl_loop
from tunesmith.training.distributed import ProcessInfo, process_info
from tunesmith.training.memory import pin_mmap_threshold, reuse_freed_memory
from tunesmith.training.stages.dpo import build_dpo
from tunesmith.training.stages.rl import RLStage, build_rl
from tunesmith.training.stages.rm import build_rm
from tunesmith.training.stages.sft import build_sft
from tunesmith.training.tracking import LOG_FILE, plot_metrics, require_reporter

# stage -> builder(config, tokenizer, device) -> (RunData, make_stage(model, data) -> loop.Stage). The data is
# built before the model loads (cheap errors first); make_stage runs once the model is loaded and prepared
# (to attach a value head, set up a reference model, cache reference log-probs).
STAGE_BUILDERS = {"sft": build_sft, "rm": build_rm, "dpo": build_dpo, "ppo": build_rl, "grpo": build_rl}
CONFIG_FILE = "train_config.yaml"
# plot_loss draws these curves (training_<key>.png, "/" written as "_") when the log has them.
PLOTTED = {
    "sft": ("loss", "eval_loss"),
    "rm": ("loss", "eval_loss", "accuracy", "eval_accuracy"),
    "dpo": ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies",
            "eval_rewards/margins"),
    "ppo": ("score", "kl", "loss/policy", "loss/value", "eval_score"),
    "grpo": ("score", "kl", "loss", "zero_std_share", "eval_score"),
}


@dataclass
class Prepared:
    """A run ready for the loop: what `prepare_training` builds, shared by `run_training` and the benchmark."""

    config: TrainConfig
    device: torch.device
    compute_dtype: torch.dtype
    tokenizer: object
    model: torch.nn.Module
    adapter: AdapterSettings | None
    stage: loop.Stage | RLStage
    data: loop.RunData


def prepare_training(config: TrainConfig) -> Prepared:
    """Device and dtype, tokenizer, data (before the slow model load, so data errors come first), model."""
    if config.gradient_checkpointing:  # the memory-saving mode: also return freed activations to the OS
        pin_mmap_threshold()
    else:  # the speed mode: reuse freed activation memory, do not fault in fresh pages each step
        reuse_freed_memory()
    device, compute_dtype = resolve_device_and_dtype(config.bf16, config.fp16)
    config = with_compute_dtype(config, compute_dtype)
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    data, make_stage = STAGE_BUILDERS[config.stage](config, tokenizer, device)
    if not data.train:
        raise TunesmithError(f"dataset {','.join(config.dataset)} produced no training samples after loading.")
    # Frozen weights can live in the compute dtype; full fine-tuning keeps fp32 master weights (autocast).
    load_dtype = torch.float32 if config.finetuning_type == "full" else compute_dtype
    model = load_model(config.model_name_or_path, load_dtype, device, trust_remote_code=config.trust_remote_code)
    adapter = prepare_for_training(model, config)
    stage = make_stage(model, data)
    return Prepared(config, device, compute_dtype, tokenizer, model, adapter, stage, data)


def run_training(config: TrainConfig, say=print) -> dict:
    """Train and/or predict as `config` says; returns the final metrics (also written to all_results.json)."""
    proc = process_info()
    output_dir = Path(config.output_dir)
    resume_from = None
    if config.do_train:
        resume_from = checkpoint.resolve_resume(config.resume_from_checkpoint, output_dir)
    _check_output_dir(output_dir, config, resume_from)
    metrics = _train(config, output_dir, resume_from, proc, say) if config.do_train else {}
    if config.do_predict and proc.is_main:
        # A fresh load of what training wrote (the training model is dropped when _train returns), so the
        # predictions equal those of a later `do_train: false` run on the same folder.
        model_config = trained_model_config(config) if config.do_train else config
        metrics = {**metrics, **run_prediction(model_config, say)}
        _write_results(output_dir, metrics)
    return metrics


def trained_model_config(config: TrainConfig) -> TrainConfig:
    """`config` pointed at what training wrote to output_dir: the new adapter after the ones merged under
    it (sft trains on its last given adapter, the other stages on a fresh one), or the full model."""
    if config.finetuning_type != "lora":
        return dataclasses.replace(config, model_name_or_path=config.output_dir, adapter_name_or_path=None)
    merged = config.adapter_name_or_path or []
    if config.stage not in FRESH_ADAPTER_STAGES:
        merged = merged[:-1]
    return dataclasses.replace(config, adapter_name_or_path=[*merged, config.output_dir])


def _train(config: TrainConfig, output_dir: Path, resume_from: Path | None, proc: ProcessInfo, say) -> dict:
    require_reporter(config.report_to)
    torch.manual_seed(config.seed)
    run = prepare_training(config)
    config, model, tokenizer, adapter, stage, data = run.config, run.model, run.tokenizer, run.adapter, run.stage, run.data
    say(f"[tunesmith] {config.stage} on {run.device} ({run.compute_dtype}), {len(data.train)} train / "
        f"{len(data.eval)} eval rows; {trainable_summary(model)}")
    if proc.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_FILE)
        if resume_from is None:  # a fresh run in a reused folder: old logs and checkpoints would mislead
            (output_dir / LOG_FILE).unlink(missing_ok=True)
            checkpoint.remove_checkpoints(output_dir)

    def save_artifact(folder: Path) -> None:
        _save_result(model, tokenizer, adapter, config, folder)

    train = rl_loop.train if isinstance(stage, RLStage) else loop.train
    metrics = train(model, stage, data, config, output_dir, save_artifact, proc, resume_from)
    if proc.is_main:
        save_artifact(output_dir)
        _write_results(output_dir, metrics)
        if config.plot_loss:
            plot_metrics(output_dir, PLOTTED[config.stage])
    return metrics


def _write_results(output_dir: Path, metrics: dict) -> None:
    (output_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))


def _save_result(model, tokenizer, adapter: AdapterSettings | None, config: TrainConfig, folder: Path) -> None:
    """A PEFT adapter for LoRA runs, a full Hugging Face model folder otherwise; the tokenizer always."""
    if adapter is not None:
        save_adapter(model, folder, config.model_name_or_path, adapter.rank, adapter.alpha, adapter.dropout,
                     adapter.target_modules, adapter.use_rslora)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=without_value_head(model.state_dict()))
    head = getattr(model, VALUE_HEAD_ATTRIBUTE, None)
    if head is not None and config.stage == "rm":  # a reward model: the head goes beside the adapter or model (value_head.safetensors)
        save_value_head(head, folder)
    tokenizer.save_pretrained(folder)


def _check_output_dir(output_dir: Path, config: TrainConfig, resume_from: Path | None) -> None:
    if resume_from is not None or config.overwrite_output_dir or not output_dir.exists():
        return
    if any(output_dir.iterdir()):
        raise TunesmithError(
            f"output_dir {output_dir} already exists and is not empty. Set `overwrite_output_dir: true` to "
            "write into it, `resume_from_checkpoint: true` to continue its latest checkpoint, or choose another folder.")
