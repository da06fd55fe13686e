"""The PPO/GRPO loop: each step samples a batch of rollouts, then makes ppo_epochs passes of updates on it.

It shares the SFT loop's parts (AdamW, learning-rate schedule, clipping, checkpoints that store the RNG
so a resumed run samples the same rollouts, trainer_log.jsonl, the progress bar); what differs is the
unit of work. A step, as in TRL and LLaMA-Factory, is one rollout batch of
per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size prompts (times
num_generations answers for GRPO); each optimizer update takes per_device_train_batch_size x
gradient_accumulation_steps prompts' samples, in micro-batches of per_device_train_batch_size prompts.
The learning rate follows the schedule over steps. With an eval split, the mean score of greedy
answers to its prompts is logged at the end (and per eval_strategy): the held-out reward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.config import TrainConfig
from tunesmith.training import checkpoint
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.loop import (
    RunData,
    autocast_context,
    build_optimizer,
    clip_and_step,
    eval_mode,
    micro_batch_indices,
    save_step,
    wrap_up,
)
from tunesmith.training.schedule import lr_factor, warmup_steps_for
from tunesmith.training.tracking import Tracker, truncate_log


def train(model, stage, data: RunData, config: TrainConfig, output_dir: Path, save_artifact: Callable[[Path], None],
          proc: ProcessInfo, resume_from: Path | None = None) -> dict:
    """Run PPO or GRPO as `stage` (training/stages/rl.py) defines it; returns the final metrics."""
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, config)
    update_prompts = config.per_device_train_batch_size * config.gradient_accumulation_steps
    step_prompts = update_prompts * config.ppo_buffer_size
    steps_per_epoch = max(1, math.ceil(len(range(proc.rank, len(data.train), proc.world_size)) / step_prompts))
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
    warmup = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)
    state = {"global_step": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = checkpoint.read_training_state(resume_from, model, optimizer)
        for name, holder in stage.controllers.items():
            holder.load_state_dict(state["controllers"][name])
        if proc.is_main:
            truncate_log(output_dir, state["global_step"])
    tracker = Tracker(output_dir, config.report_to, proc.is_main)
    amp = autocast_context(device, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.fp16)
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not proc.is_main, dynamic_ncols=True)
    start = time.perf_counter() - state["elapsed_s"]
    window, record = [], {}
    model.train()
    while state["global_step"] < total_steps:
        step_start = time.perf_counter()
        lr = config.learning_rate * lr_factor(config.lr_scheduler_type, state["global_step"], total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, index = divmod(state["global_step"], steps_per_epoch)
        order = micro_batch_indices(len(data.train), step_prompts, config.seed, epoch, proc)[index]
        with amp:
            rollout, metrics = stage.rollout(model, [data.train[i] for i in order])
        update_start = time.perf_counter()
        metrics.update(_update(model, stage, rollout, config, update_prompts * stage.samples_per_prompt,
                               config.per_device_train_batch_size * stage.samples_per_prompt, optimizer, scaler, amp))
        metrics["time/update"] = time.perf_counter() - update_start
        tokens = sum(len(p) + len(r) for p, r in zip(rollout.prompt_ids, rollout.response_ids))
        metrics["step_seconds"] = time.perf_counter() - step_start
        metrics["tokens_per_second"] = tokens / metrics["step_seconds"]
        window.append(metrics)
        state["global_step"] += 1
        step = state["global_step"]
        progress.update(1)
        if step % config.logging_steps == 0 or step == total_steps:
            record = _log_record(window, step, total_steps, steps_per_epoch, lr, start)
            window = []
            tracker.log(record)
            progress.set_postfix(score=f"{record['score']:.3f}", kl=f"{record.get('kl', 0):.3f}")
        if data.eval and step < total_steps and _eval_due(config, step, steps_per_epoch):
            tracker.log({"current_steps": step, "total_steps": total_steps, **evaluate(model, stage, data, config)})
        if config.save_steps and step % config.save_steps == 0 and step < total_steps and proc.is_main:
            state["elapsed_s"] = time.perf_counter() - start
            state["controllers"] = {name: holder.state_dict() for name, holder in stage.controllers.items()}
            save_step(output_dir, step, model, optimizer, state, save_artifact, config)
    progress.close()
    final = {key: record[key] for key in ("score", "reward", "kl", "tokens_per_second") if key in record}
    return wrap_up(final, start, data, lambda: evaluate(model, stage, data, config), tracker, state["global_step"],
                   total_steps)


def _update(model, stage, rollout, config: TrainConfig, update_size: int, micro_size: int, optimizer, scaler, amp) -> dict:
    """ppo_epochs passes over the rollout in shuffled mini-batches; returns the mean loss statistics."""
    sums, updates = {}, 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(rollout)).tolist()
        for first in range(0, len(order), update_size):
            update = order[first:first + update_size]
            parts = [rollout.select(update[i:i + micro_size]) for i in range(0, len(update), micro_size)]
            items = [stage.loss_items(part) for part in parts]
            for part, part_items in zip(parts, items):
                with amp:
                    loss, stats = stage.loss(model, part)
                share = part_items / sum(items)  # the part's loss is a mean over its items
                scaler.scale(loss * share).backward()
                for key, value in {"loss": loss.detach(), **stats}.items():
                    sums[key] = sums.get(key, 0.0) + value * share
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + clip_and_step(model, optimizer, scaler, config.max_grad_norm)
            updates += 1
    return {key: float(value) / updates for key, value in sums.items()}


@torch.no_grad()
def evaluate(model, stage, data: RunData, config: TrainConfig) -> dict:
    """Mean raw score of greedy answers to the eval prompts: the held-out reward."""
    greedy = stage.greedy_scores
    device = next(model.parameters()).device
    scores = []
    with eval_mode(model), autocast_context(device, config):
        for first in range(0, len(data.eval), config.per_device_eval_batch_size):
            scores += greedy(model, data.eval[first:first + config.per_device_eval_batch_size])
    return {"eval_score": sum(scores) / max(len(scores), 1)}


def _eval_due(config: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    if config.eval_strategy == "steps":
        return step % config.eval_steps == 0
    return config.eval_strategy == "epoch" and step % steps_per_epoch == 0


def _log_record(window: list[dict], step, total_steps, steps_per_epoch, lr, start) -> dict:
    """One trainer_log.jsonl line: the mean of each metric over the steps since the last one."""
    elapsed = time.perf_counter() - start
    means = {key: round(sum(m[key] for m in window) / len(window), 6) for key in window[0]}
    return {"current_steps": step, "total_steps": total_steps, **means, "lr": lr,
            "epoch": round(step / steps_per_epoch, 4), "percentage": round(100 * step / total_steps, 2),
            "elapsed_time": str(timedelta(seconds=int(elapsed))),
            "remaining_time": str(timedelta(seconds=int(elapsed / step * (total_steps - step))))}
