"""Checkpoints of a running loop, written and read by every rank together.

Save, replicated weights (ddp, or one process): rank 0 writes the full trainable weights, optimizer
moments, the user-facing result and the counters into a hidden folder; every other rank adds its own
RNG state. Save, sharded weights (fsdp): every rank writes its own shards (`sharded_state`), nothing is
gathered, and rank 0 adds the counters. Either way rank 0 renames the folder to checkpoint-N once all
have written, and a resume reads either kind on any number of ranks. A write that fails (a full disk)
removes the half-written folder, leaves the previous checkpoint as it was and stops every rank with the
reason. Nothing non-finite is ever written: the loop skips such updates, and a last check here refuses
to save weights that are not finite.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.training import checkpoint, distributed, sharded_state
from tunesmith.training.updates import Updates

SaveArtifact = Callable[[Path, "dict[str, torch.Tensor] | None"], None]
"""save_artifact(folder, full_state): write the user-facing result; full_state is the gathered model
(fsdp, on rank 0) or None (read the model directly)."""


def save_step(output_dir: Path, step: int, model: torch.nn.Module, updates: Updates, state: dict,
              save_artifact: SaveArtifact, keep: int | None) -> None:
    """checkpoint-{step}: what a resume needs (and, unsharded, the user-facing result), written atomically."""
    parallel, proc = updates.parallel, updates.parallel.proc
    sharded = parallel.sharded
    trainable = sharded_state.local_tensors(model) if sharded else parallel.full_state(model, trainable_only=True)
    tmp = output_dir / f".checkpoint-{step}.tmp"
    problem = _non_finite(trainable, step) if sharded or proc.is_main else None
    if proc.is_main:
        problem = problem or _attempt(lambda: checkpoint.begin_checkpoint(output_dir, step))
    _stop_if_any(problem, step, output_dir, tmp)
    if not proc.is_main and not tmp.is_dir():
        problem = (f"rank {proc.rank} cannot see {tmp}: fsdp checkpoints are written by every rank, so output_dir "
                   "must be on storage that every node shares") if sharded else None
    elif not proc.is_main or sharded:
        problem = _attempt(lambda: checkpoint.write_rank_rng(tmp, proc.rank))
    if sharded:
        _stop_if_any(problem, step, output_dir, tmp)
        layout = {}
        problem = _attempt(lambda: layout.update(sharded_state.write(tmp, model, updates.optimizer)))
        if proc.is_main and problem is None:
            problem = _attempt(lambda: checkpoint.write_state(tmp, state, layout))
    elif proc.is_main and problem is None:
        optimizer_state = updates.optimizer.state_dict()
        problem = _attempt(lambda: (save_artifact(tmp, None),
                                    checkpoint.write_training_state(tmp, trainable, optimizer_state, state)))
    _stop_if_any(problem, step, output_dir, tmp)
    if proc.is_main:
        checkpoint.publish_checkpoint(tmp, keep)
    distributed.barrier()


def _stop_if_any(problem: str | None, step: int, output_dir: Path, tmp: Path) -> None:
    """If any rank could not do its part, remove the half-written folder and stop every rank with a reason."""
    if distributed.all_max(1.0 if problem else 0.0) == 0:
        return
    if distributed.process_info().is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    raise TunesmithError(
        f"Could not write checkpoint-{step} in {output_dir}: {problem or 'another rank could not write (see its error)'}. "
        "The previous checkpoint is untouched; free space (or fix permissions) and resume with "
        "`resume_from_checkpoint: true`.")


def _attempt(write: Callable[[], object]) -> str | None:
    """Run one write; the reason it failed (a full disk, a permission), or None."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 - any failed write must leave the previous checkpoint in place
        return f"{getattr(err, 'strerror', None) or err}"
    return None


def _non_finite(tensors: dict[str, torch.Tensor], step: int) -> str | None:
    """A last guard: weights with NaN or inf never reach a checkpoint (the reason, or None)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return (f"the weights {bad[:3]} are not finite at step {step}; lower learning_rate or max_grad_norm and "
                "resume from the last checkpoint")
    return None


def restore(folder: Path, model: torch.nn.Module, updates: Updates) -> dict:
    """Load a checkpoint into the (possibly sharded) model and optimizer on every rank; returns its counters."""
    parallel = updates.parallel
    if sharded_state.is_sharded_checkpoint(folder):
        state = checkpoint.read_state(folder)
        with warnings.catch_warnings():  # one process reading shards: DCP notes it runs without a process group
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            sharded_state.read(folder, model, updates.optimizer, state.pop("optimizer_layout"))
        checkpoint.restore_rng(checkpoint.read_rank_rng(folder, parallel.proc.rank))
        return state
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    saved = checkpoint.read_training_state(folder, names, parallel.proc.rank)
    parallel.load_full_state(model, saved.trainable)
    parallel.load_optimizer_state(model, updates.optimizer, saved.optimizer)
    checkpoint.restore_rng(saved.rng)
    return saved.state
