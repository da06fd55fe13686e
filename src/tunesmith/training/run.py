"""`tunesmith train`: from a validated config to a trained adapter or model folder.

Order matters for users: everything that can fail cheaply (config, output folder, data) fails before
the slow parts (model load, training). The stage's registry entry (training/stages/) says how its data
and its loop Stage are built, whether it trains a fresh adapter and needs a reference model, and what
it plots; nothing here branches on the stage's name. `do_predict` is driven from the command level
(cli.py) after this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.algorithms.linear import adopt_gemm_choices
from tunesmith.config import RunConfig, save_config
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import save_adapter
from tunesmith.model.atomic_files import follow_umask, remove_interrupted_writes
from tunesmith.model.finetune import AdapterSettings, prepare_for_training, trainable_summary
from tunesmith.model.loading import load_model, load_tokenizer, resolve_device_and_dtype
from tunesmith.model.quantize import Quantization
from tunesmith.model.value_head import ATTRIBUTE as VALUE_HEAD_ATTRIBUTE
from tunesmith.model.value_head import (
    VALUE_HEAD_FILE,
    save_value_head,
    value_head_from_state,
    without_value_head,
)
from tunesmith.training import checkpoint, distributed, loop
from tunesmith.training.distributed import process_info
from tunesmith.training.heartbeat import console_echo, run_status
from tunesmith.training.interrupt import graceful_stops
from tunesmith.training.memory import pin_mmap_threshold, reuse_freed_memory, trim_heap
from tunesmith.training.parallel import Parallel, choose, shard
from tunesmith.training.reference import Reference
from tunesmith.training.run_files import CONFIG_FILE, CONSOLE_FILE, RESULTS_FILE
from tunesmith.training.stages import STAGES, StageInputs, StageSpec
from tunesmith.training.tracking import LOG_FILE, plot_metrics, require_reporter, strict_json
from tunesmith.training.updates import Updates


@dataclass
class Prepared:
    """A run ready for the loop: what `prepare_training` builds, shared by `run_training` and the benchmarks."""

    config: RunConfig
    device: torch.device
    compute_dtype: torch.dtype
    tokenizer: object
    model: torch.nn.Module
    adapter: AdapterSettings | None
    stage: loop.Stage
    data: loop.RunData
    reference: Reference | None
    """The starting model the stage holds the policy to, when it needs one."""


def prepare_training(config: RunConfig, parallel: Parallel | None = None) -> Prepared:
    """Device and dtype, tokenizer, data (before the slow model load, so data errors come first), model;
    under several ranks, each rank's device, identical starting weights, and fsdp's sharding."""
    parallel = parallel or Parallel()
    spec = STAGES[config.stage]
    # The memory-saving modes (gradient checkpointing, fsdp, whose per-layer gathers come and go every step,
    # a quantized base, whose layers dequantize a weight-sized block per matmul) return freed memory to the OS
    if config.train.gradient_checkpointing or parallel.sharded or config.model.quantization_bit:
        pin_mmap_threshold()
    else:  # the speed mode: reuse freed activation memory, do not fault in fresh pages each step
        reuse_freed_memory()
    optim = config.train
    device, compute_dtype = resolve_device_and_dtype(optim.bf16, optim.fp16, optim.use_cpu)
    device = distributed.rank_device(device, parallel.proc)
    # The precision actually used (a CPU without bf16 units falls back to fp32), so the loop's autocast
    # and the saved train_config.yaml tell the truth.
    config = config.replace(bf16=compute_dtype == torch.bfloat16, fp16=compute_dtype == torch.float16)
    tokenizer = load_tokenizer(config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    data = spec.build_data(config, tokenizer, device)
    if not data.train:
        raise TunesmithError(f"dataset {','.join(config.data.dataset)} produced no training samples after loading.")
    # Frozen weights can live in the compute dtype; full fine-tuning keeps fp32 master weights (autocast).
    load_dtype = torch.float32 if config.adapter.finetuning_type == "full" else compute_dtype
    model = load_model(config.model.model_name_or_path, load_dtype, device,
                       trust_remote_code=config.model.trust_remote_code,
                       quantization=Quantization.from_args(config.model))
    trim_heap()  # loading's temporaries go back to the OS before training's own blocks settle in the heap
    adapter = prepare_for_training(model, config.model, config.adapter, spec.fresh_adapter,
                                   config.train.gradient_checkpointing)
    distributed.broadcast_trainable(model)
    reference = reference_for(spec, config, model)
    stage = spec.build(StageInputs(model, config, tokenizer, data, device, reference))
    distributed.broadcast_trainable(model)  # a value head the stage attached
    if parallel.sharded:
        shard(model, config.distributed, device, compute_dtype)
    return Prepared(config, device, compute_dtype, tokenizer, model, adapter, stage, data, reference)


def reference_for(spec: StageSpec, config: RunConfig, model: torch.nn.Module) -> Reference | None:
    """The starting model, for stages that need one: a frozen copy only when the weights themselves train
    and their reference results are not all computed before the first update."""
    if not spec.needs_reference(config):
        return None
    return Reference.of(model, loop.autocast_dtype(config.train) or torch.float32,
                        keep_copy=not spec.precomputes_reference(config))


def run_training(config: RunConfig, say=print) -> dict:
    """Train as `config` says; returns the final metrics (also written to all_results.json). Under torchrun
    every rank runs this; rank 0 writes the files."""
    if not config.task.do_train:
        raise TunesmithError("`do_train: false`: run_training trains; use inference.predict.train_and_predict "
                             "(what `tunesmith train` runs) to only predict.")
    proc = process_info()
    output_dir = Path(config.output.output_dir)
    resume_from = checkpoint.resolve_resume(config.output.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, config, resume_from)
    require_reporter(config.output.report_to)
    parallel = choose(config.distributed, proc, config.adapter.finetuning_type, config.train.fp16)
    say = console_echo(output_dir, say, proc.is_main)
    try:
        run = _prepare_on_this_rank(config, parallel, resume_from, say)
        with run_status(output_dir, proc.is_main):  # from here a watcher sees the run: its folder exists
            return _train_and_save(run, parallel, resume_from)
    finally:
        distributed.stop()


def _prepare_on_this_rank(config: RunConfig, parallel: Parallel, resume_from: Path | None, say) -> Prepared:
    """Join the other ranks and prepare; rank 0 then writes the run folder's config (a run that fails
    before this point leaves no folder behind). Every rank runs this."""
    proc, output_dir = parallel.proc, Path(config.output.output_dir)
    if proc.is_main:
        for leftover in remove_interrupted_writes(output_dir):  # of a save killed in an earlier run
            say(f"[tunesmith] removed {leftover.name}, left in {output_dir} by an interrupted save")
    device, _ = resolve_device_and_dtype(config.train.bf16, config.train.fp16, config.train.use_cpu)
    distributed.start(proc, device, config.distributed.ddp_timeout, cpu_collectives=config.distributed.offload)
    if resume_from is not None:  # round as the run it continues: its GEMM choices, not this process's timings
        adopt_gemm_choices(checkpoint.read_state(resume_from).get("gemm", {}))
    torch.manual_seed(config.train.seed)
    run = prepare_training(config, parallel)
    if proc.distributed:  # each rank its own dropout masks (starting weights were broadcast from rank 0)
        torch.manual_seed(config.train.seed + 1_000_003 * proc.rank)
    if proc.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.config, output_dir / CONFIG_FILE)
        if resume_from is None:  # a fresh run in a reused folder: old logs and checkpoints would mislead
            for old in (LOG_FILE, CONSOLE_FILE, RESULTS_FILE):
                (output_dir / old).unlink(missing_ok=True)
            checkpoint.remove_checkpoints(output_dir)
        quantized = Quantization.from_args(run.config.model)
        base = f"base in {quantized.bits}-bit {quantized.describe()} (bitsandbytes), " if quantized else ""
        where = f"{proc.world_size} ranks ({parallel.strategy}), " if proc.distributed else ""
        say(f"[tunesmith] {run.config.stage} on {where}{run.device} ({run.compute_dtype}), {base}"
            f"{len(run.data.train)} train / {len(run.data.eval)} eval rows; {trainable_summary(run.model)}")
    return run


def _train_and_save(run: Prepared, parallel: Parallel, resume_from: Path | None) -> dict:
    """Train, then save the result (rank 0); every rank runs this."""
    config, model, tokenizer, adapter = run.config, run.model, run.tokenizer, run.adapter
    proc, output_dir, spec = parallel.proc, Path(config.output.output_dir), STAGES[config.stage]

    def save_artifact(folder: Path, full_state: dict | None) -> None:
        save_result(model, tokenizer, adapter, config.model.model_name_or_path, spec.saves_value_head, folder,
                    full_state)

    updates = Updates(model, config.train, run.device, parallel)
    with graceful_stops() as stop:
        metrics = loop.train(model, run.stage, run.data, config.train, config.output, save_artifact, updates,
                             resume_from, stop)
    updates.optimizer.state.clear()  # the moments are done with: free them before the model is gathered
    full_state = parallel.full_state(model, trainable_only=False) if parallel.sharded else None
    if proc.is_main:
        save_artifact(output_dir, full_state)
        write_results(output_dir, metrics)
        if config.output.plot_loss:
            plot_metrics(output_dir, spec.plotted)
    distributed.barrier()
    return metrics


def trained_model_config(config: RunConfig) -> RunConfig:
    """`config` pointed at what training wrote to output_dir: the new adapter after the ones merged under
    it (a fresh-adapter stage trains a new one, sft its last given adapter), or the full model."""
    output_dir = config.output.output_dir
    if not config.adapter.is_lora:
        return config.replace(model_name_or_path=output_dir, adapter_name_or_path=None)
    merged = config.model.adapter_name_or_path or []
    if not STAGES[config.stage].fresh_adapter:
        merged = merged[:-1]
    return config.replace(adapter_name_or_path=[*merged, output_dir])


def write_results(output_dir: Path, metrics: dict) -> None:
    """all_results.json: the run's final metrics."""
    (output_dir / RESULTS_FILE).write_text(strict_json(metrics, indent=2))


def save_result(model: torch.nn.Module, tokenizer: object, adapter: AdapterSettings | None, base_model: str,
                with_value_head: bool, folder: Path, full_state: dict | None = None) -> None:
    """A PEFT adapter for LoRA runs, a full Hugging Face model folder otherwise; the tokenizer always;
    a reward model's value head beside them (value_head.safetensors). `full_state`: the gathered weights
    of a model sharded over ranks (fsdp), else the model's own are read."""
    if adapter is not None:
        save_adapter(model, folder, base_model, adapter.rank, adapter.alpha, adapter.dropout,
                     adapter.target_modules, adapter.use_rslora)
    else:
        state = full_state if full_state is not None else model.state_dict()
        model.save_pretrained(folder, safe_serialization=True, state_dict=without_value_head(state))
        for weights in folder.glob("model*.safetensors"):  # safetensors writes 0600: follow the umask
            follow_umask(weights)
    head = getattr(model, VALUE_HEAD_ATTRIBUTE, None)
    if head is not None and with_value_head:
        if full_state is not None:
            head = value_head_from_state(head, full_state)
        save_value_head(head, folder)
        follow_umask(folder / VALUE_HEAD_FILE)
    tokenizer.save_pretrained(folder)


def check_output_dir(output_dir: Path, config: RunConfig, resume_from: Path | None) -> None:
    """A non-empty output_dir is refused unless the run resumes or may overwrite it; a file is refused always."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TunesmithError(f"output_dir {output_dir} is a file, not a folder; choose a folder path for `output_dir`.")
    if resume_from is not None or config.output.overwrite_output_dir or not output_dir.exists():
        return
    if any(output_dir.iterdir()):
        resume = ("`resume_from_checkpoint: true` to continue its latest checkpoint, "
                  if checkpoint.list_checkpoints(output_dir) else "")
        raise TunesmithError(
            f"output_dir {output_dir} already exists and is not empty. Set `overwrite_output_dir: true` to "
            f"write into it (a fresh run), {resume}or choose another folder.")
