"""The one training loop every stage shares.

It owns the optimizer (AdamW), the learning-rate schedule, mixed precision, checkpoints, resume,
evaluation cadence, logging and the progress bar. A stage gives it a `Stage`: how many rows one
training step takes, and a `step` function that turns those rows into gradient updates through the
loop's `Updates` (sft/rm/dpo: micro-batches accumulated into one update, training/supervised.py;
ppo/grpo: one rollout, then ppo_epochs of updates, training/rl.py). The loop never asks which stage
it runs.

Determinism: the data order of epoch e is a permutation seeded by seed + e; step k of an epoch takes
rows [k R, (k+1) R) of it (R = rows_per_step), so a step never spans two epochs and the position in the
data follows from the step count alone. A checkpoint stores the trainable weights, optimizer moments,
RNG state, the stage's own state (KL coefficient, score moments) and the step, so a resumed run
replays exactly the same steps with the same state (bit for bit on CPU).
Data parallelism: each rank takes every world_size-th index of the shared order; only rank 0 logs and
saves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from tunesmith.config import OptimArgs, OutputArgs
from tunesmith.training import checkpoint
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.schedule import lr_factor, warmup_steps_for
from tunesmith.training.tracking import Tracker, truncate_log


class Stateful(Protocol):
    """State a checkpoint must keep beside the weights (a KL controller, running score moments)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class RunData:
    """The rows a stage trains and evaluates on (already tokenised; never written to during training)."""

    train: list[dict]
    eval: list[dict]


@dataclass
class StepOutput:
    """What one training step did: metrics summed over `items`, and the tokens it processed."""

    metrics: dict[str, torch.Tensor | float]
    """Sums over the step's items (tensors stay on the device: the hot loop never waits for the GPU)."""
    items: float
    """What the sums are over (label tokens, pairs; 1 for an RL step, whose metrics are already means)."""
    tokens: int
    """Non-pad tokens processed, for throughput."""


@dataclass
class Stage:
    """What a training stage gives the loop once the model is ready."""

    rows_per_step: int
    """Rows one training step takes."""
    step: Callable[[torch.nn.Module, list[dict], Updates], StepOutput]
    """step(model, rows, updates): compute losses, call updates.backward / updates.step, report."""
    evaluate: Callable[[torch.nn.Module, list[dict]], dict[str, float]]
    """evaluate(model, eval rows) -> eval_* metrics (run in eval mode, without gradients)."""
    headline: tuple[str, ...] = ("loss",)
    """Metrics shown on the progress bar and returned as the run's final metrics."""
    micro_batch_rows: int | None = None
    """Rows per micro-batch: the logged `epoch` counts micro-batches consumed (None: whole steps)."""
    state: dict[str, Stateful] = field(default_factory=dict)
    """Objects whose state a checkpoint keeps and a resume restores."""


class Updates:
    """The loop's optimizer, handed to a stage's step: scaled backward, then clip, step and zero."""

    def __init__(self, model: torch.nn.Module, optim: OptimArgs, device: torch.device):
        self.model, self.optim, self.device = model, optim, device
        self.optimizer = build_optimizer(model, optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=optim.fp16)
        self.last_norm: torch.Tensor | None = None

    def autocast(self) -> AbstractContextManager:
        """The run's mixed precision (bf16/fp16), for a stage's forward passes."""
        return autocast_context(self.device, self.optim)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d loss / d weights (loss-scaled under fp16)."""
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Clip the accumulated gradient, take an optimizer step, clear the gradient; returns its norm."""
        self.last_norm = clip_and_step(self.model, self.optimizer, self.scaler, self.optim.max_grad_norm)
        return self.last_norm

    def set_lr(self, lr: float) -> None:
        """The learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr


@dataclass
class _Progress:
    """Counters of a run, and the sums since the last log line."""

    global_step: int = 0
    elapsed_s: float = 0.0
    sums: dict = field(default_factory=dict)
    items: float = 0.0
    tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    def add(self, out: StepOutput) -> None:
        """Fold one step's output into the window."""
        for key, value in out.metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.items += out.items
        self.tokens += out.tokens

    def clear(self) -> None:
        """Start a new window (after a log line)."""
        self.sums, self.items, self.tokens, self.window_start = {}, 0.0, 0, time.perf_counter()


def epoch_order(n_rows: int, seed: int, epoch: int, proc: ProcessInfo) -> list[int]:
    """This rank's row indices for one epoch (a permutation seeded by seed + epoch)."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[proc.rank::proc.world_size]


def steps_per_epoch(n_rows: int, rows_per_step: int, proc: ProcessInfo) -> int:
    """Training steps in one epoch on this rank (the last may take fewer rows)."""
    return max(1, math.ceil(len(range(proc.rank, n_rows, proc.world_size)) / rows_per_step))


def total_steps_for(optim: OptimArgs, per_epoch: int) -> int:
    """max_steps, or num_train_epochs (fractions allowed) worth of steps."""
    if optim.max_steps > 0:
        return optim.max_steps
    return max(1, math.ceil(optim.num_train_epochs * per_epoch))


def build_optimizer(model: torch.nn.Module, optim: OptimArgs) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def train(model: torch.nn.Module, stage: Stage, data: RunData, optim: OptimArgs, output: OutputArgs,
          save_artifact: Callable[[Path], None], proc: ProcessInfo, resume_from: Path | None = None) -> dict:
    """Run the optimisation; returns the final metrics. `save_artifact(folder)` writes the user-facing
    result (a PEFT adapter or a model folder) into a checkpoint."""
    device = next(model.parameters()).device
    output_dir = Path(output.output_dir)
    updates = Updates(model, optim, device)
    per_epoch = steps_per_epoch(len(data.train), stage.rows_per_step, proc)
    total = total_steps_for(optim, per_epoch)
    warmup = warmup_steps_for(total, optim.warmup_steps, optim.warmup_ratio)
    progress = _resume(resume_from, model, updates, stage, output_dir, proc)
    tracker = Tracker(output_dir, output.report_to, proc.is_main)
    bar = tqdm(total=total, initial=progress.global_step, disable=not proc.is_main, dynamic_ncols=True)
    start, record, order = time.perf_counter() - progress.elapsed_s, {}, (-1, [])
    model.train()
    while progress.global_step < total:
        lr = optim.learning_rate * lr_factor(optim.lr_scheduler_type, progress.global_step, total, warmup)
        updates.set_lr(lr)
        epoch, index = divmod(progress.global_step, per_epoch)
        if order[0] != epoch:
            order = (epoch, epoch_order(len(data.train), optim.seed, epoch, proc))
        rows = [data.train[i] for i in order[1][index * stage.rows_per_step:(index + 1) * stage.rows_per_step]]
        progress.add(stage.step(model, rows, updates))
        progress.global_step += 1
        bar.update(1)
        step = progress.global_step
        if step % output.logging_steps == 0 or step == total:
            epoch = _epochs_done(step, per_epoch, stage, len(data.train), proc)
            record = _log_record(progress, updates, step, total, epoch, lr, start)
            tracker.log(record)
            bar.set_postfix({key: f"{record[key]:.4f}" for key in stage.headline if key in record}
                            | {"lr": f"{lr:.2e}", "tok_s": f"{record['tokens_per_second']:.0f}"})
        if data.eval and step < total and _eval_due(output, step, per_epoch):
            tracker.log({"current_steps": step, "total_steps": total, **evaluate(model, stage, data, optim)})
        if output.save_steps and step % output.save_steps == 0 and step < total and proc.is_main:
            progress.elapsed_s = time.perf_counter() - start
            save_step(output_dir, step, model, updates, stage, progress, save_artifact, output.save_total_limit)
    bar.close()
    final = {key: record[key] for key in (*stage.headline, "tokens_per_second") if key in record}
    final["train_runtime_s"] = round(time.perf_counter() - start, 2)
    if data.eval:
        eval_metrics = evaluate(model, stage, data, optim)
        tracker.log({"current_steps": progress.global_step, "total_steps": total, **eval_metrics})
        final.update(eval_metrics)
    tracker.close()
    return final


def _resume(resume_from: Path | None, model: torch.nn.Module, updates: Updates, stage: Stage, output_dir: Path,
            proc: ProcessInfo) -> _Progress:
    """A fresh run's counters, or a checkpoint's: weights, optimizer, RNG, loss scale, stage state."""
    if resume_from is None:
        return _Progress()
    state = checkpoint.read_training_state(resume_from, model, updates.optimizer)
    if "scaler" in state:
        updates.scaler.load_state_dict(state["scaler"])
    for name, holder in stage.state.items():
        holder.load_state_dict(state["controllers"][name])
    if proc.is_main:
        truncate_log(output_dir, state["global_step"])
    return _Progress(global_step=state["global_step"], elapsed_s=state["elapsed_s"])


def _eval_due(output: OutputArgs, step: int, per_epoch: int) -> bool:
    """eval_strategy steps: every eval_steps; epoch: when this step finished an epoch."""
    if output.eval_strategy == "steps":
        return step % output.eval_steps == 0
    return output.eval_strategy == "epoch" and step % per_epoch == 0


@torch.no_grad()
def evaluate(model: torch.nn.Module, stage: Stage, data: RunData, optim: OptimArgs) -> dict[str, float]:
    """The stage's eval metrics on the eval rows, in eval mode (no dropout) and the run's precision."""
    device = next(model.parameters()).device
    with eval_mode(model), autocast_context(device, optim):
        return stage.evaluate(model, data.eval)


def _epochs_done(step: int, per_epoch: int, stage: Stage, n_rows: int, proc: ProcessInfo) -> float:
    """Passes over the data after `step` steps: whole epochs plus the share of this epoch's micro-batches
    (or steps) consumed, as LLaMA-Factory's trainer_log.jsonl counts them."""
    whole, index = divmod(step, per_epoch)
    unit = stage.micro_batch_rows or stage.rows_per_step
    units = math.ceil(len(range(proc.rank, n_rows, proc.world_size)) / unit)
    return whole + min(index * (stage.rows_per_step // unit), units) / max(units, 1)


def _log_record(progress: _Progress, updates: Updates, step: int, total: int, epoch: float, lr: float,
                start: float) -> dict:
    """One trainer_log.jsonl record (LLaMA-Factory's fields plus throughput); clears the window."""
    elapsed = time.perf_counter() - start
    seconds = time.perf_counter() - progress.window_start
    items = max(progress.items, 1e-12)
    means = {key: round(float(value) / items, 6) for key, value in progress.sums.items()}
    record = {"current_steps": step, "total_steps": total, **means, "lr": lr}
    if updates.last_norm is not None:  # a stage that averages its own updates' norms reports grad_norm itself
        record.setdefault("grad_norm", round(float(updates.last_norm), 6))
    record.update(epoch=round(epoch, 4), percentage=round(100 * step / total, 2))
    record.setdefault("tokens_per_second", round(progress.tokens / max(seconds, 1e-9), 2))
    record.update(elapsed_time=str(timedelta(seconds=int(elapsed))),
                  remaining_time=str(timedelta(seconds=int(elapsed / step * (total - step)))))
    progress.clear()
    return record


def save_step(output_dir: Path, step: int, model: torch.nn.Module, updates: Updates, stage: Stage,
              progress: _Progress, save_artifact: Callable[[Path], None], keep: int | None) -> None:
    """checkpoint-{step}: the user-facing result plus what a resume needs, written atomically."""
    state = {"global_step": progress.global_step, "elapsed_s": progress.elapsed_s,
             "controllers": {name: holder.state_dict() for name, holder in stage.state.items()}}
    if updates.scaler.is_enabled():
        state["scaler"] = updates.scaler.state_dict()

    def write(folder: Path) -> None:
        save_artifact(folder)
        checkpoint.write_training_state(folder, model, updates.optimizer, state)

    checkpoint.save_checkpoint(output_dir, step, write, keep)


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  max_grad_norm: float) -> torch.Tensor:
    """Unscale, clip the global gradient norm (0: no clipping), step, zero; returns the norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout) inside the block, in the mode it had before after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast_dtype(optim: OptimArgs) -> torch.dtype | None:
    """The mixed-precision dtype the config asks for (bf16/fp16), None for fp32."""
    return torch.bfloat16 if optim.bf16 else torch.float16 if optim.fp16 else None


def autocast_context(device: torch.device, optim: OptimArgs) -> AbstractContextManager:
    """Mixed precision as the config asks (bf16/fp16), a no-op context in fp32."""
    dtype = autocast_dtype(optim)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
