"""Checkpoints of a running loop, written and read by every rank together.

Save: full trainable weights and optimizer moments are gathered (fsdp) or taken as they are (ddp);
rank 0 writes them, the user-facing result and the counters into a hidden folder, every other rank adds
its own RNG state, and rank 0 renames the folder to checkpoint-N once all have written. A write that
fails (a full disk) removes the half-written folder, leaves the previous checkpoint as it was and stops
every rank with the reason. Nothing non-finite is ever written: the loop skips such updates, and a
last check here refuses to save weights that are not finite.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.training import checkpoint, distributed
from tunesmith.training.updates import Updates

SaveArtifact = Callable[[Path, "dict[str, torch.Tensor] | None"], None]
"""save_artifact(folder, full_state): write the user-facing result; full_state is the gathered model
(fsdp, on rank 0) or None (read the model directly)."""


def save_step(output_dir: Path, step: int, model: torch.nn.Module, updates: Updates, state: dict,
              save_artifact: SaveArtifact, keep: int | None) -> None:
    """checkpoint-{step}: the user-facing result plus what a resume needs, written atomically by all ranks."""
    parallel, proc = updates.parallel, updates.parallel.proc
    trainable = parallel.full_state(model, trainable_only=True)
    optimizer_state = parallel.optimizer_state(model, updates.optimizer)
    artifact_state = parallel.full_state(model, trainable_only=False) if parallel.sharded else None
    tmp = output_dir / f".checkpoint-{step}.tmp"
    problem = None
    if proc.is_main:
        problem = _non_finite(trainable, step) or _attempt(lambda: checkpoint.begin_checkpoint(output_dir, step))
    distributed.barrier()
    if not proc.is_main and tmp.is_dir():  # a node that cannot see rank 0's folder (no shared storage) skips
        problem = _attempt(lambda: checkpoint.write_rank_rng(tmp, proc.rank))
    if proc.is_main and problem is None:
        problem = _attempt(lambda: (save_artifact(tmp, artifact_state),
                                    checkpoint.write_training_state(tmp, trainable, optimizer_state, state)))
    if distributed.all_max(1.0 if problem else 0.0) > 0:
        if proc.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TunesmithError(
            f"Could not write checkpoint-{step} in {output_dir}: {problem or 'another rank could not write (see its error)'}. "
            "The previous checkpoint is untouched; free space (or fix permissions) and resume with "
            "`resume_from_checkpoint: true`.")
    if proc.is_main:
        checkpoint.publish_checkpoint(tmp, keep)
    distributed.barrier()


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
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    saved = checkpoint.read_training_state(folder, names, parallel.proc.rank)
    parallel.load_full_state(model, saved.trainable)
    parallel.load_optimizer_state(model, updates.optimizer, saved.optimizer)
    checkpoint.restore_rng(saved.rng)
    return saved.state
