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

import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from tunesmith.algorithms.linear import gemm_choices
from tunesmith.config import OptimArgs, OutputArgs
from tunesmith.errors import TunesmithError
from tunesmith.training import distributed, snapshots
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.interrupt import StopRequest, TrainingStopped
from tunesmith.training.sample_logs import reset_sample_logs
from tunesmith.training.schedule import lr_factor, warmup_steps_for
from tunesmith.training.snapshots import SaveArtifact
from tunesmith.training.tracking import Tracker, truncate_log
from tunesmith.training.updates import Updates, autocast_context, autocast_dtype, build_optimizer, eval_mode

__all__ = ["RunData", "Stage", "StepOutput", "Updates", "autocast_context", "autocast_dtype", "build_optimizer",
           "eval_mode", "evaluate", "train"]


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
    log_samples: Callable[[torch.nn.Module, int], None] | None = None
    """log_samples(model, step): append what the stage shows of its samples after `step` steps
    (rollouts.jsonl, pairs.jsonl). Called on every rank every log_rollouts_steps steps, at the last step,
    and before the first step of a fresh run (step 0)."""


@dataclass
class _Progress:
    """Counters of a run, and the sums since the last log line."""

    global_step: int = 0
    elapsed_s: float = 0.0
    sums: dict = field(default_factory=dict)
    items: float = 0.0
    tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    bad_steps: int = 0
    """Steps whose update was skipped because a loss or gradient was not finite (whole run)."""
    bad_in_a_row: int = 0
    zero_norm_in_a_row: int = 0

    def add(self, out: StepOutput) -> None:
        """Fold one step's output into the window."""
        for key, value in out.metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.items += out.items
        self.tokens += out.tokens

    def clear(self) -> None:
        """Start a new window (after a log line)."""
        self.sums, self.items, self.tokens, self.window_start = {}, 0.0, 0, time.perf_counter()


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """Row indices of one epoch: a permutation seeded by seed + epoch (the same on every rank)."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_rows(order: list[int], index: int, rows_per_step: int, proc: ProcessInfo,
              lengths: list[int] | None = None) -> list[int]:
    """This rank's rows of step `index` of an epoch: the step covers rows_per_step x world_size rows of the
    order, every world_size-th of them this rank's. Under several ranks a short last step is filled up from
    the start of the order (as DistributedSampler pads), so every rank runs the same micro-batches and
    updates, which collectives (fsdp's gathers, gradient sums) need."""
    width = rows_per_step * proc.world_size
    chunk = order[index * width:(index + 1) * width]
    if not proc.distributed:
        return chunk
    if len(chunk) < width:
        chunk = chunk + list(itertools.islice(itertools.cycle(order), width - len(chunk)))
    return chunk[proc.rank::proc.world_size] if lengths is None else balanced_share(chunk, lengths, proc)


def balanced_share(chunk: list[int], lengths: list[int], proc: ProcessInfo) -> list[int]:
    """This rank's rows of a global step, dealt so every rank gets as many rows and about as many tokens:
    longest first, each to the rank with the fewest tokens that still has room. Ranks wait for the slowest
    at each gradient sum, so uneven lengths would idle the others; any split gives the same gradient."""
    per_rank = len(chunk) // proc.world_size
    tokens, shares = [0] * proc.world_size, [[] for _ in range(proc.world_size)]
    for row in sorted(chunk, key=lambda i: -lengths[i]):
        rank = min((r for r in range(proc.world_size) if len(shares[r]) < per_rank), key=lambda r: tokens[r])
        shares[rank].append(row)
        tokens[rank] += lengths[row]
    return sorted(shares[proc.rank], key=chunk.index)


def row_tokens(row: dict) -> int:
    """A row's size for balancing ranks: the total length of its token lists."""
    return sum(len(value) for value in row.values() if isinstance(value, list))


def steps_per_epoch(n_rows: int, rows_per_step: int, proc: ProcessInfo) -> int:
    """Training steps in one epoch, the same on every rank (the last may take fewer rows in one process)."""
    return max(1, math.ceil(n_rows / (rows_per_step * proc.world_size)))


def total_steps_for(optim: OptimArgs, per_epoch: int) -> int:
    """max_steps, or num_train_epochs (fractions allowed) worth of steps."""
    if optim.max_steps > 0:
        return optim.max_steps
    return max(1, math.ceil(optim.num_train_epochs * per_epoch))


def train(model: torch.nn.Module, stage: Stage, data: RunData, optim: OptimArgs, output: OutputArgs,
          save_artifact: SaveArtifact, updates: Updates, resume_from: Path | None = None,
          stop: StopRequest | None = None) -> dict:
    """Run the optimisation; returns the final metrics. `save_artifact(folder, full_state)` writes the
    user-facing result (a PEFT adapter or a model folder) into a checkpoint; `stop` is set by a signal."""
    proc, output_dir = updates.parallel.proc, Path(output.output_dir)
    per_epoch = steps_per_epoch(len(data.train), stage.rows_per_step, proc)
    total = total_steps_for(optim, per_epoch)
    warmup = warmup_steps_for(total, optim.warmup_steps, optim.warmup_ratio)
    progress = _resume(resume_from, model, updates, stage, output_dir, proc)
    tracker = Tracker(output_dir, output.report_to, proc.is_main)
    bar = tqdm(total=total, initial=progress.global_step, disable=not proc.is_main, dynamic_ncols=True)
    start, record, order = time.perf_counter() - progress.elapsed_s, {}, (-1, [])
    lengths = [row_tokens(row) for row in data.train] if proc.distributed else None
    if progress.global_step == 0 and _samples_due(stage, output, 0, total):
        stage.log_samples(model, 0)
    model.train()
    while progress.global_step < total:
        lr = optim.learning_rate * lr_factor(optim.lr_scheduler_type, progress.global_step, total, warmup)
        updates.set_lr(lr)
        epoch, index = divmod(progress.global_step, per_epoch)
        if order[0] != epoch:
            order = (epoch, epoch_order(len(data.train), optim.seed, epoch))
        chosen = step_rows(order[1], index, stage.rows_per_step, proc, lengths)
        skipped_before = updates.skipped
        out = stage.step(model, [data.train[i] for i in chosen], updates)
        progress.global_step += 1
        _account(progress, out, updates, updates.skipped > skipped_before, chosen, optim.max_bad_steps)
        bar.update(1)
        step = progress.global_step
        if step % output.logging_steps == 0 or step == total:
            epoch = _epochs_done(step, per_epoch, stage, len(data.train), proc)
            record = _log_record(progress, updates, step, total, epoch, lr, start)
            tracker.log(record)
            bar.set_postfix({key: f"{record[key]:.4f}" for key in stage.headline if isinstance(record.get(key), float)}
                            | {"lr": f"{lr:.2e}", "tok_s": f"{record['tokens_per_second']:.0f}"})
        if _samples_due(stage, output, step, total):
            stage.log_samples(model, step)
        if data.eval and step < total and _eval_due(output, step, per_epoch):
            tracker.log({"current_steps": step, "total_steps": total, **evaluate(model, stage, data, optim)})
        stopping = stop is not None and distributed.all_max(float(stop.requested)) > 0
        if step < total and (stopping or output.save_steps and step % output.save_steps == 0):
            progress.elapsed_s = time.perf_counter() - start
            save_step(output_dir, model, updates, stage, progress, save_artifact, output.save_total_limit)
        if stopping and step < total:
            tracker.close()
            bar.close()
            raise TrainingStopped(
                f"stopped by {stop.signal_name or 'a signal on another rank'} after step {step} of {total}; "
                f"{output_dir / f'checkpoint-{step}'} holds it. Run the same command with "
                "`resume_from_checkpoint: true` to continue exactly where it stopped.")
    bar.close()
    return _finish(model, stage, data, optim, tracker, progress, record, start)


def _finish(model: torch.nn.Module, stage: Stage, data: RunData, optim: OptimArgs, tracker: Tracker,
            progress: _Progress, record: dict, start: float) -> dict:
    """The run's final metrics (headline, throughput, runtime, a final evaluation)."""
    final = {key: record[key] for key in (*stage.headline, "tokens_per_second") if key in record}
    final["train_runtime_s"] = round(time.perf_counter() - start, 2)
    if progress.bad_steps:
        final["bad_steps"] = progress.bad_steps
    if data.eval:
        eval_metrics = evaluate(model, stage, data, optim)
        tracker.log({"current_steps": progress.global_step, "total_steps": record.get("total_steps"),
                     **eval_metrics})
        final.update(eval_metrics)
    tracker.close()
    return final


def _account(progress: _Progress, out: StepOutput, updates: Updates, skipped: bool, rows: list[int],
             max_bad_steps: int) -> None:
    """Count a step: its metrics join the window, unless its update was skipped as non-finite; too many
    skipped steps in a row stop the run; a gradient that stays exactly zero gets one warning."""
    if not skipped:
        progress.add(out)
        progress.bad_in_a_row = 0
    else:
        progress.bad_steps += 1
        progress.bad_in_a_row += 1
        if progress.bad_in_a_row >= max_bad_steps:
            proc = updates.parallel.proc
            where = f" on rank {proc.rank}" if proc.distributed else ""
            raise TunesmithError(
                f"step {progress.global_step}: the loss or gradient was not finite (NaN or inf) for "
                f"{progress.bad_in_a_row} steps in a row (max_bad_steps), so training stopped; those updates were "
                f"skipped and no checkpoint holds non-finite weights. The last step's rows{where} were samples "
                f"{sorted(rows)[:16]} of the training data. Lower learning_rate, check those samples, or resume "
                "from the last checkpoint.")
    norm = updates.last_norm
    progress.zero_norm_in_a_row = progress.zero_norm_in_a_row + 1 if norm is not None and float(norm) == 0 else 0
    if progress.zero_norm_in_a_row == max(max_bad_steps, 3):
        warnings.warn(f"step {progress.global_step}: the gradient norm has been exactly 0 for "
                      f"{progress.zero_norm_in_a_row} steps, so nothing is learning: the learning rate may have "
                      "driven the model into saturation (try a smaller learning_rate), or no label token trains.",
                      stacklevel=2)


def _resume(resume_from: Path | None, model: torch.nn.Module, updates: Updates, stage: Stage, output_dir: Path,
            proc: ProcessInfo) -> _Progress:
    """A fresh run's counters, or a checkpoint's: weights, optimizer, RNG, loss scale, stage state."""
    if resume_from is None:
        if proc.is_main:
            reset_sample_logs(output_dir, None)
        return _Progress()
    state = snapshots.restore(resume_from, model, updates)
    if "scaler" in state:
        updates.scaler.load_state_dict(state["scaler"])
    for name, holder in stage.state.items():
        if name in state["controllers"]:  # a checkpoint older than a state object starts it fresh
            holder.load_state_dict(state["controllers"][name])
    saved_width, width = state.get("rows_per_global_step"), stage.rows_per_step * proc.world_size
    if saved_width is not None and saved_width != width and proc.is_main:
        warnings.warn(f"{resume_from.name} was written by a run taking {saved_width} rows per step (all ranks), this one "
                      f"takes {width}: the step count, schedule and data position follow steps, so the resumed run "
                      "differs from the original. Keep per_device_train_batch_size x gradient_accumulation_steps x "
                      "ranks the same to continue it exactly.", stacklevel=2)
    if proc.is_main:
        truncate_log(output_dir, state["global_step"])
        reset_sample_logs(output_dir, state["global_step"])
    return _Progress(global_step=state["global_step"], elapsed_s=state["elapsed_s"],
                     bad_steps=state.get("bad_steps", 0))


def _samples_due(stage: Stage, output: OutputArgs, step: int, total: int) -> bool:
    """Whether the stage logs its samples after `step` steps: every log_rollouts_steps, and at the last."""
    every = output.log_rollouts_steps
    return stage.log_samples is not None and bool(every) and (step % every == 0 or step == total)


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
    units = math.ceil(math.ceil(n_rows / proc.world_size) / unit)
    return whole + min(index * (stage.rows_per_step // unit), units) / max(units, 1)


def _log_record(progress: _Progress, updates: Updates, step: int, total: int, epoch: float, lr: float,
                start: float) -> dict:
    """One trainer_log.jsonl record (LLaMA-Factory's fields plus throughput), over every rank; clears the window."""
    elapsed = time.perf_counter() - start
    seconds = time.perf_counter() - progress.window_start
    keys = sorted(progress.sums)
    totals = distributed.all_sum([float(progress.sums[k]) for k in keys] + [progress.items, float(progress.tokens)])
    totals = totals.tolist()
    items, tokens = max(totals[-2], 1e-12), totals[-1]
    means = {key: round(value / items, 6) for key, value in zip(keys, totals)}
    if "tokens_per_second" in means:  # a stage's own rate is per rank: the run's is the ranks' sum
        means["tokens_per_second"] = round(means["tokens_per_second"] * updates.parallel.proc.world_size, 2)
    record = {"current_steps": step, "total_steps": total, **means, "lr": lr}
    if updates.last_norm is not None:  # a stage that averages its own updates' norms reports grad_norm itself
        record.setdefault("grad_norm", round(float(updates.last_norm), 6))
    record.update(epoch=round(epoch, 4), percentage=round(100 * step / total, 2))
    record.setdefault("tokens_per_second", round(tokens / max(seconds, 1e-9), 2))
    if progress.bad_steps:
        record["bad_steps"] = progress.bad_steps
    record.update(elapsed_time=str(timedelta(seconds=int(elapsed))),
                  remaining_time=str(timedelta(seconds=int(elapsed / step * (total - step)))))
    progress.clear()
    return record


def save_step(output_dir: Path, model: torch.nn.Module, updates: Updates, stage: Stage, progress: _Progress,
              save_artifact: SaveArtifact, keep: int | None) -> None:
    """checkpoint-{step}: the user-facing result plus what a resume needs (every rank takes part)."""
    state = {"global_step": progress.global_step, "elapsed_s": progress.elapsed_s, "bad_steps": progress.bad_steps,
             "rows_per_global_step": stage.rows_per_step * updates.parallel.proc.world_size,
             "controllers": {name: holder.state_dict() for name, holder in stage.state.items()},
             "gemm": gemm_choices()}
    if updates.scaler.is_enabled():
        state["scaler"] = updates.scaler.state_dict()
    snapshots.save_step(output_dir, progress.global_step, model, updates, state, save_artifact, keep)
