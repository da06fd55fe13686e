"""The one training loop every stage shares.

It owns the optimizer (AdamW), the learning-rate schedule, gradient accumulation, clipping, mixed
precision, checkpoints, resume, evaluation, logging and the progress bar. A stage gives it a `Stage`:
a function from (model, batch) to a loss summed over the batch's items (label tokens for SFT, pairs
for preference losses) plus summed metrics. The loop divides by the number of items in the whole
accumulated step, so accumulation gives the same gradient as one big batch.

Determinism: the data order of epoch e is a permutation seeded by seed + e, and a checkpoint stores
the trainable weights, optimizer moments, RNG state and the count of micro-batches consumed, so a
resumed run replays exactly the same batches with the same state (bit for bit on CPU).
Data parallelism: each rank takes every world_size-th index of the shared order; only rank 0 logs and
saves. Process-group setup and gradient all-reduce are what a data-parallel stage would add.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.config import TrainConfig
from tunesmith.training import checkpoint
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.schedule import lr_factor, warmup_steps_for
from tunesmith.training.tracking import Tracker, truncate_log


@dataclass
class Stage:
    """What a training stage gives the loop."""

    loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
    """(loss summed over the batch's items, metrics summed over the same items)."""
    count_items: Callable[[dict], int]
    """Number of items the loss sums over (the normaliser)."""
    count_tokens: Callable[[dict], int]
    """Non-pad tokens in the batch, for throughput."""


@dataclass
class RunData:
    """Rows (already tokenised) and how to turn a list of them into a batch of tensors on the device."""

    train: list[dict]
    eval: list[dict]
    collate: Callable[[list[dict]], dict]


def micro_batch_indices(n_rows: int, batch_size: int, seed: int, epoch: int, proc: ProcessInfo) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch on this rank (shuffled, seeded by seed + epoch)."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    order = order[proc.rank::proc.world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def total_optimizer_steps(config: TrainConfig, micro_batches_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / config.gradient_accumulation_steps))  # see _step_stream
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch))


def train(model, stage: Stage, data: RunData, config: TrainConfig, output_dir: Path,
          save_artifact: Callable[[Path], None], proc: ProcessInfo, resume_from: Path | None = None) -> dict:
    """Run the optimisation; returns the final metrics. `save_artifact(folder)` writes the user-facing
    result (a PEFT adapter or a model folder) into a checkpoint or the output folder."""
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, config)
    rows_on_rank = len(range(proc.rank, len(data.train), proc.world_size))
    per_epoch = math.ceil(rows_on_rank / config.per_device_train_batch_size)  # micro-batches per epoch
    total_steps = total_optimizer_steps(config, per_epoch)
    warmup = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)
    state = {"global_step": 0, "micro_batches_done": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = checkpoint.read_training_state(resume_from, model, optimizer)
        if proc.is_main:
            truncate_log(output_dir, state["global_step"])
    tracker = Tracker(output_dir, config.report_to, proc.is_main)
    amp = autocast_context(device, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.fp16)
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    stream = _step_stream(len(data.train), config, per_epoch, state["micro_batches_done"], proc)
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not proc.is_main, dynamic_ncols=True)
    window = _new_window()
    start = time.perf_counter() - state["elapsed_s"]
    last_record = {}
    model.train()
    while state["global_step"] < total_steps:
        lr = config.learning_rate * lr_factor(config.lr_scheduler_type, state["global_step"], total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [data.collate([data.train[i] for i in indices]) for indices in next(stream)]
        _accumulate_gradients(model, stage, batches, device, amp, scaler, window)
        grad_norm = clip_and_step(model, optimizer, scaler, config.max_grad_norm)
        state["global_step"] += 1
        state["micro_batches_done"] += len(batches)
        progress.update(1)
        step = state["global_step"]
        if step % config.logging_steps == 0 or step == total_steps:
            last_record = _log_window(window, step, total_steps, per_epoch, state, lr, grad_norm, start)
            window = _new_window()
            tracker.log(last_record)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{last_record['tokens_per_second']:.0f}")
        if data.eval and step < total_steps and _eval_due(config, step, state["micro_batches_done"], len(batches), per_epoch):
            tracker.log({"current_steps": step, "total_steps": total_steps, **evaluate(model, stage, data, config)})
        if config.save_steps and step % config.save_steps == 0 and step < total_steps and proc.is_main:
            state["elapsed_s"] = time.perf_counter() - start
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            save_step(output_dir, step, model, optimizer, state, save_artifact, config)
    progress.close()
    final = {key: value for key, value in last_record.items() if key in ("loss", "tokens_per_second")}
    return wrap_up(final, start, data, lambda: evaluate(model, stage, data, config), tracker, state["global_step"],
                   total_steps)


def wrap_up(final: dict, start: float, data: RunData, run_eval: Callable[[], dict], tracker: Tracker, step: int,
            total_steps: int) -> dict:
    """The run's final metrics: `final` (from the last log line), the runtime, and a last evaluation."""
    final["train_runtime_s"] = round(time.perf_counter() - start, 2)
    if data.eval:
        eval_metrics = run_eval()
        tracker.log({"current_steps": step, "total_steps": total_steps, **eval_metrics})
        final.update(eval_metrics)
    tracker.close()
    return final


@contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) inside the block, in the mode it had before after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, stage: Stage, data: RunData, config: TrainConfig) -> dict:
    """Loss and metrics over the whole eval split, averaged per item, named eval_*."""
    device = next(model.parameters()).device
    totals, items = {"loss": 0.0}, 0
    with eval_mode(model), autocast_context(device, config):
        for start in range(0, len(data.eval), config.per_device_eval_batch_size):
            batch = to_device(data.collate(data.eval[start:start + config.per_device_eval_batch_size]), device)
            loss_sum, metrics = stage.loss(model, batch)
            totals["loss"] += loss_sum.item()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            items += stage.count_items(batch)
    return {f"eval_{key}": value / max(items, 1) for key, value in totals.items()}


def _step_stream(n_rows: int, config: TrainConfig, per_epoch: int, skip: int, proc: ProcessInfo):
    """Endless lists of micro-batch indices, one list per optimizer step, starting after `skip` micro-batches.

    A step never spans two epochs (an epoch's last step may hold fewer micro-batches; the loss is
    normalised per item, so that is still a correct step), which keeps num_train_epochs exact.
    """
    epoch, index = divmod(skip, per_epoch)
    accumulation = config.gradient_accumulation_steps
    while True:
        batches = micro_batch_indices(n_rows, config.per_device_train_batch_size, config.seed, epoch, proc)
        for first in range(index, len(batches), accumulation):
            yield batches[first:first + accumulation]
        epoch, index = epoch + 1, 0


def _new_window() -> dict:
    """Sums since the last log line; loss stays a device tensor so the hot loop never waits on the GPU."""
    return {"loss": 0.0, "items": 0, "tokens": 0, "metrics": {}, "start": time.perf_counter()}


def _accumulate_gradients(model, stage: Stage, batches: list[dict], device, amp, scaler, window: dict) -> None:
    """Backward over one step's micro-batches, each loss divided by the step's total item count."""
    items = sum(stage.count_items(b) for b in batches)  # counted on the CPU, before the copy to the device
    for batch in batches:
        window["tokens"] += stage.count_tokens(batch)
        with amp:
            loss_sum, metrics = stage.loss(model, to_device(batch, device))
        scaler.scale(loss_sum / max(items, 1)).backward()
        window["loss"] = window["loss"] + loss_sum.detach()
        for key, value in metrics.items():
            window["metrics"][key] = window["metrics"].get(key, 0.0) + value
    window["items"] += items


def _eval_due(config: TrainConfig, step: int, done: int, just_done: int, per_epoch: int) -> bool:
    """eval_strategy steps: every eval_steps; epoch: when this step finished an epoch."""
    if config.eval_strategy == "steps":
        return step % config.eval_steps == 0
    if config.eval_strategy == "epoch":
        return done // per_epoch > (done - just_done) // per_epoch
    return False


def clip_and_step(model, optimizer, scaler, max_grad_norm: float) -> torch.Tensor:
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _log_window(window, step, total_steps, per_epoch, state, lr, grad_norm, start) -> dict:
    """One trainer_log.jsonl record (LLaMA-Factory's fields plus throughput)."""
    elapsed = time.perf_counter() - start
    seconds = time.perf_counter() - window["start"]
    items = max(window["items"], 1)
    record = {
        "current_steps": step, "total_steps": total_steps, "loss": round(float(window["loss"]) / items, 6),
        **{key: round(value / items, 6) for key, value in window["metrics"].items()},
        "lr": lr, "grad_norm": round(float(grad_norm), 6),
        "epoch": round(state["micro_batches_done"] / per_epoch, 4),
        "percentage": round(100 * step / total_steps, 2),
        "tokens_per_second": round(window["tokens"] / max(seconds, 1e-9), 2),
        "elapsed_time": str(timedelta(seconds=int(elapsed))),
        "remaining_time": str(timedelta(seconds=int(elapsed / step * (total_steps - step)))),
    }
    return record


def save_step(output_dir, step, model, optimizer, state, save_artifact, config) -> None:
    """checkpoint-{step}: the user-facing result plus what a resume needs, written atomically."""
    def write(folder: Path) -> None:
        save_artifact(folder)
        checkpoint.write_training_state(folder, model, optimizer, state)

    checkpoint.save_checkpoint(output_dir, step, write, config.save_total_limit)


def autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The mixed-precision dtype the config asks for (bf16/fp16), None for fp32."""
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None


def autocast_context(device: torch.device, config: TrainConfig):
    """Mixed precision as the config asks (bf16/fp16), a no-op context in fp32."""
    dtype = autocast_dtype(config)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; other values (lists, ints, the rows) as they are."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}
