"""Checkpoints of sharded (fsdp) runs: every rank writes its own shards, and a resume reshards them.

Gathering a full model and its AdamW moments on rank 0 at every checkpoint costs rank 0 three times the
model in memory, which is what fsdp exists to avoid. Instead each rank writes the local pieces of its
trainable weights and optimizer moments through torch.distributed.checkpoint's Hugging Face writer: one
safetensors file per rank in `checkpoint-N/sharded/`, each tensor recorded with its offset in the full
tensor (safetensors metadata, JSON). Reading maps those pieces onto whatever this run holds (shards of
another rank count, or whole tensors in one process), so a run saved on 4 ranks resumes on 2 or on 1.
DCP's default format keeps its index as a pickle; this one has none, so nothing is unpickled.

Keys: `model.<parameter name>` and `optimizer.<parameter name>.<moment>` (`exp_avg`, `exp_avg_sq`,
`step`, ...). Non-tensor optimizer values and the param groups go to trainer_state.json as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.training.checkpoint import SHARDED_DIR

MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint holds per-rank shards (written by an fsdp run)."""
    return (folder / SHARDED_DIR).is_dir()


def write(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank writes its shards into folder/sharded; returns the JSON layout of the optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, layout = _state(model, optimizer)
    try:
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED_DIR), save_distributed=True))
    except dcp.CheckpointException as err:  # a BaseException: name the rank and the reason (a full disk)
        raise OSError(_first_failure(err)) from None
    return layout


def read(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: dict[str, Any]) -> None:
    """Load a sharded checkpoint into this run's (sharded or whole) trainable weights and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder / SHARDED_DIR))
    saved = reader.read_metadata().state_dict_metadata
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved_params = {key[len(MODEL_PREFIX):] for key in saved if key.startswith(MODEL_PREFIX)}
    if saved_params != set(params):
        missing, extra = sorted(set(params) - saved_params), sorted(saved_params - set(params))
        raise TunesmithError(
            f"Checkpoint {folder} does not match this run's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the same model and finetuning_type.")
    _create_moments(optimizer, params, saved)
    tensors, _ = _state(model, optimizer)
    try:
        dcp.load(tensors, storage_reader=reader)
    except dcp.CheckpointException as err:
        raise TunesmithError(f"Could not read the shards in {folder / SHARDED_DIR}: {_first_failure(err)}. "
                             "Resume from an earlier checkpoint-N.") from None
    _restore_groups(optimizer, params, layout)


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's pieces of the trainable weights (for the non-finite check before a save)."""
    return {name: _local(p.detach()) for name, p in model.named_parameters() if p.requires_grad}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The flat dict DCP reads and writes in place, and the optimizer's non-tensor values."""
    names = {id(p): name for name, p in model.named_parameters()}
    tensors = {MODEL_PREFIX + name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    scalars, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{OPTIMIZER_PREFIX}{names[id(p)]}.{key}"] = value
                else:
                    scalars[f"{names[id(p)]}.{key}"] = value
    return tensors, {"param_groups": groups, "scalars": scalars, "format": "sharded"}


def _create_moments(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                    saved: dict[str, Any]) -> None:
    """Give a fresh optimizer the state tensors the checkpoint holds, shaped (and sharded) like its parameters,
    so that loading can fill them in place."""
    for key, meta in saved.items():
        if not key.startswith(OPTIMIZER_PREFIX):
            continue
        name, moment = key[len(OPTIMIZER_PREFIX):].rsplit(".", 1)
        p = params[name]
        dtype = meta.properties.dtype
        like_param = tuple(meta.size) == tuple(p.shape)
        optimizer.state[p][moment] = (torch.zeros_like(p.detach(), dtype=dtype) if like_param
                                      else torch.zeros(tuple(meta.size), dtype=dtype))


def _restore_groups(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                    layout: dict[str, Any]) -> None:
    """Hyper-parameters of each param group and the non-tensor per-parameter values, from the JSON layout."""
    if len(layout["param_groups"]) != len(optimizer.param_groups):
        raise TunesmithError("The checkpoint's optimizer has a different number of parameter groups than this "
                             "run's; resume with the same optimizer settings.")
    for group, saved in zip(optimizer.param_groups, layout["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for key, value in layout["scalars"].items():
        name, moment = key.rsplit(".", 1)
        optimizer.state[params[name]][moment] = value


def _first_failure(err: BaseException) -> str:
    """'rank R: reason' from DCP's CheckpointException (which carries every failing rank's exception)."""
    failures = getattr(err, "failures", {})
    if not failures:
        return str(err)
    rank, (exc, _) = min(failures.items(), key=lambda item: item[0])
    return f"rank {rank}: {getattr(exc, 'strerror', None) or exc}"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
