"""Checkpoints that are either complete or absent, and the training state needed to resume bit for bit.

A checkpoint is written into a hidden temporary folder, flushed to disk, then renamed into place:
rename is atomic, so a kill during a save leaves a `.checkpoint-N.tmp` folder (ignored and cleaned up
later), never a `checkpoint-N` that looks complete but is not. Everything is safetensors or JSON;
nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.model.atomic_files import follow_umask

SHARDED_DIR = "sharded"  # an fsdp run's per-rank shards (training/sharded_state.py)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """A fresh hidden folder to write checkpoint-{step} into (rank 0 creates it; every rank may add files)."""
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(tmp: Path, keep: int | None) -> Path:
    """Flush a written folder to disk and rename it to checkpoint-{step}; prune old checkpoints."""
    output_dir, step = tmp.parent, tmp.name[len(".checkpoint-"):-len(".tmp")]
    final = output_dir / f"checkpoint-{step}"
    follow_umask(tmp)  # safetensors writes 0600 files: a checkpoint reads like the rest of the run's outputs
    _fsync_tree(tmp)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _prune(output_dir, keep)
    return final


def save_checkpoint(output_dir: Path, step: int, write: Callable[[Path], None], keep: int | None) -> Path:
    """Call write(folder) into a temporary folder, then publish it as output_dir/checkpoint-{step}."""
    tmp = begin_checkpoint(output_dir, step)
    write(tmp)
    return publish_checkpoint(tmp, keep)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """`true` means the latest checkpoint in output_dir; otherwise a checkpoint folder path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() == "true":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise TunesmithError(f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N folder.")
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    whole = all((path / name).is_file() for name in (TRAINABLE_FILE, OPTIMIZER_FILE))
    if not (path / STATE_FILE).is_file() or not (whole or (path / SHARDED_DIR).is_dir()):
        raise TunesmithError(
            f"resume_from_checkpoint: {path} is not a complete tunesmith checkpoint (it needs {STATE_FILE}, and "
            f"{TRAINABLE_FILE} with {OPTIMIZER_FILE} or an fsdp run's {SHARDED_DIR}/ folder); "
            "point it at an output_dir/checkpoint-N folder or use `true` for the latest.")
    return path


def write_training_state(folder: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                         state: dict[str, Any]) -> None:
    """Trainable weights, optimizer moments, rank 0's RNG and the loop counters: what a bit-exact resume needs."""
    save_file({name: t.contiguous() for name, t in trainable.items()}, str(folder / TRAINABLE_FILE))
    tensors, layout = _flatten_optimizer(optimizer_state)
    tensors.update(rng_state())
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    write_state(folder, state, layout)


def write_state(folder: Path, state: dict[str, Any], optimizer_layout: dict[str, Any]) -> None:
    """The loop counters and the optimizer's JSON part (param groups, non-tensor values)."""
    (folder / STATE_FILE).write_text(json.dumps({**state, "optimizer_layout": optimizer_layout}, indent=2))


def read_state(folder: Path) -> dict[str, Any]:
    """What write_state wrote."""
    return json.loads((folder / STATE_FILE).read_text())


def write_rank_rng(folder: Path, rank: int) -> None:
    """A rank's own RNG state beside rank 0's (its dropout masks and samples differ from rank 0's)."""
    save_file(rng_state(), str(rng_file(folder, rank)))


def rng_state() -> dict[str, torch.Tensor]:
    """This process's CPU and CUDA generator states."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors


@dataclass
class SavedTraining:
    """What a checkpoint holds for a resume, as full (unsharded) tensors."""

    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


def read_training_state(folder: Path, trainable_names: set[str], rank: int = 0) -> SavedTraining:
    """Load what write_training_state saved; `rank`'s own RNG when the checkpoint has it, else rank 0's."""
    state = read_state(folder)
    saved = load_file(str(folder / TRAINABLE_FILE))
    if set(saved) != trainable_names:
        missing, extra = sorted(trainable_names - set(saved)), sorted(set(saved) - trainable_names)
        raise TunesmithError(
            f"Checkpoint {folder} does not match this run's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the same finetuning_type, lora_rank and lora_target.")
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    own = rng_file(folder, rank)
    rng = load_file(str(own)) if rank and own.is_file() else {k: v for k, v in tensors.items() if k.startswith("rng.")}
    optimizer = _unflatten_optimizer({k: v for k, v in tensors.items() if not k.startswith("rng.")},
                                     state.pop("optimizer_layout"))
    return SavedTraining(state, saved, optimizer, rng)


def read_rank_rng(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's RNG for `rank`: its own, or rank 0's when the checkpoint had fewer ranks."""
    own = rng_file(folder, rank)
    return load_file(str(own if own.is_file() else rng_file(folder, 0)))


def rng_file(folder: Path, rank: int) -> Path:
    """Where `rank` keeps its generator states in a checkpoint folder."""
    return folder / f"rng-rank{rank}.safetensors"


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Put saved generator states back (CUDA ones only where this machine has those devices)."""
    torch.set_rng_state(rng["rng.cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("rng.cuda.")]
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors plus a JSON layout (param groups, non-tensor values)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict that `_flatten_optimizer` took apart, ready for `load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in layout["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def remove_checkpoints(output_dir: Path) -> None:
    """Delete every checkpoint (complete or interrupted) in output_dir."""
    _prune(output_dir, keep=0)


def _prune(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond `keep`, and leftovers of interrupted saves."""
    if not output_dir.is_dir():
        return
    for leftover in [*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".checkpoint-*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[:len(checkpoints) - keep]:
        _remove(old)


def _remove(folder: Path) -> None:
    """Delete a checkpoint by first renaming it to a hidden name (atomic), so a kill midway never leaves a
    `checkpoint-N` with files missing; the hidden remains go at the next prune."""
    hidden = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
