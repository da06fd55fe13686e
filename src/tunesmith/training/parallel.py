"""How the model's weights are spread over ranks: replicated (ddp) or sharded (fsdp), and the full state
the saved model is written from.

ddp: every rank holds every weight; after the last micro-batch of a step the gradients are summed
across ranks (`distributed.sum_gradients`, one flat all-reduce per bucket). No DistributedDataParallel
wrapper is needed, because tunesmith's accumulation already syncs once per optimizer step.

fsdp: FSDP2 `fully_shard` on each decoder layer and on the root: parameters, gradients and AdamW
moments are split between ranks and gathered layer by layer for compute. Gradients are reduced by
*sum* (`set_force_sum_reduction_for_comms`, divide factor 1), so the result does not depend on how a
backend averages (PyTorch issue 162338); losses are already divided by the global item count.

Checkpoints: ddp (and one process) write the full trainable state and optimizer moments from rank 0;
fsdp writes each rank's own shards (`sharded_state`, safetensors with offsets, nothing gathered). Either
kind resumes on any number of ranks and either strategy: a full state is sharded on load
(`load_full_state`, `load_optimizer_state`), shards are resharded by torch.distributed.checkpoint.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from tunesmith.config import DistributedArgs
from tunesmith.errors import TunesmithError
from tunesmith.model.forward import SHARDED_DECODER_CALL
from tunesmith.training import distributed
from tunesmith.training.distributed import ProcessInfo


@dataclass
class Parallel:
    """A run's strategy: `ddp` (replicated weights, summed gradients) or `fsdp` (sharded weights)."""

    strategy: str = "ddp"
    proc: ProcessInfo = ProcessInfo()

    @property
    def sharded(self) -> bool:
        """Whether parameters are DTensors split over ranks."""
        return self.strategy == "fsdp"

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """Make every rank's gradient the sum over ranks (fsdp's reduce-scatter already did)."""
        if not self.sharded:
            distributed.sum_gradients([p for p in model.parameters() if p.requires_grad])

    def full_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on the CPU (rank 0 gets them; other ranks an empty dict under fsdp)."""
        if not self.sharded:
            return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad or not trainable_only} \
                | ({} if trainable_only else {name: b for name, b in model.named_buffers()})
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)

    def load_full_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full weights into this rank's (possibly sharded) parameters."""
        params = dict(model.named_parameters())
        if not self.sharded:
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an index-keyed full optimizer state (a plain optimizer's state_dict, as ddp and one-process
        checkpoints hold it) into this rank's (possibly sharded) optimizer."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = optimizer_parameter_names(model, optimizer)
        full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (its state_dict's integer keys)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def choose(args: DistributedArgs, proc: ProcessInfo, finetuning_type: str, fp16: bool = False) -> Parallel:
    """The run's strategy; fsdp shards whole weights, so it is for full fine-tuning."""
    strategy = args.strategy(finetuning_type == "full", proc.world_size)
    if not proc.distributed:  # one process holds everything: nothing to shard or sync (a checkpoint still resumes)
        return Parallel("ddp", proc)
    if strategy == "fsdp" and fp16:
        raise TunesmithError("fsdp with fp16: each rank would check only its own shard of the gradient for overflow, "
                             "and the loss scales would drift apart; use `bf16: true` (or ddp) with fsdp.")
    if strategy == "fsdp" and not _has_sharded_safetensors():
        raise TunesmithError(f"fsdp checkpoints are written as sharded safetensors through torch.distributed.checkpoint's "
                             f"HuggingFaceStorageWriter, which this torch ({torch.__version__}) lacks; upgrade torch "
                             "(>= 2.8) or use `distributed_strategy: ddp`.")
    if strategy == "fsdp" and finetuning_type != "full":
        raise TunesmithError(
            f"fsdp shards the weights that train, for full fine-tuning; with finetuning_type: {finetuning_type} "
            "the trainable weights are small, so use `distributed_strategy: ddp` (remove `fsdp` / the ZeRO-2/3 "
            "`deepspeed` file), or set `finetuning_type: full`.")
    return Parallel(strategy, proc)


def _has_sharded_safetensors() -> bool:
    """Whether torch.distributed.checkpoint can write per-rank safetensors shards (torch >= 2.8)."""
    import inspect

    try:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
    except ImportError:
        return False
    return "save_distributed" in inspect.signature(HuggingFaceStorageWriter.__init__).parameters


def shard(model: torch.nn.Module, args: DistributedArgs, device: torch.device,
          compute_dtype: torch.dtype) -> None:
    """FSDP2 on every decoder layer, then on the root; bf16/fp16 compute on CUDA with fp32 reduction."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if args.offload and device.type != "cuda":
        raise TunesmithError("`fsdp: ... offload` (or a DeepSpeed offload_param/offload_optimizer to cpu) moves "
                             "weights from the GPU to the CPU; this run is already on the CPU, so remove it.")
    mixed = MixedPrecisionPolicy()
    if device.type == "cuda" and compute_dtype != torch.float32:
        mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    options = dict(mp_policy=mixed, offload_policy=CPUOffloadPolicy() if args.offload else OffloadPolicy(),
                   reshard_after_forward=not args.shard_grad_op)
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TunesmithError("fsdp shards per decoder layer and this model has no `layers` list; use ddp.")
    for layer in layers:
        fully_shard(layer, **options)
    # The root (embeddings, final norm, lm_head, value head) stays gathered from forward to backward:
    # tunesmith runs the decoder, then lm_head / the value head on chosen positions outside forward().
    fully_shard(model, **{**options, "reshard_after_forward": False})
    setattr(model, SHARDED_DECODER_CALL, types.MethodType(_run_decoder, model))
    register_fsdp_forward_method(model, SHARDED_DECODER_CALL)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            if not hasattr(module, "set_force_sum_reduction_for_comms"):
                raise TunesmithError(f"fsdp needs PyTorch's sum-reducing FSDP2 (torch >= 2.8); this is torch "
                                     f"{torch.__version__}. Upgrade torch or use `distributed_strategy: ddp`.")
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)


def _run_decoder(model: torch.nn.Module, **kwargs: object) -> object:
    """The decoder's forward, as a method of the root so FSDP gathers the root's weights around it."""
    return model.get_decoder()(**kwargs)
