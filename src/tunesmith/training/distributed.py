"""Who am I in a data-parallel run, and the few collectives the loop needs.

torchrun (or `tunesmith train` relaunching itself under torchrun, see training/launch.py) starts one
process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE. `start` joins the process
group: NCCL with one GPU per rank (cuda:LOCAL_RANK) on CUDA, gloo on the CPU, where each rank gets
its share of the node's cores as threads (torchrun's OMP_NUM_THREADS=1 would leave cores idle).

Gradients are *summed* across ranks and every loss is divided by the item count of the whole global
step (`all_sum` of each rank's count), so N ranks compute exactly the gradient of one process with the
N-times batch, whatever a backend's own averaging does (PyTorch issue 162338: FSDP2 on gloo).
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tunesmith.algorithms.linear import agree_on_choice, agree_on_packing, float32_packing, onednn_is_faster

THREADS_VARIABLE = "TUNESMITH_THREADS_PER_RANK"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: `rank` of `world_size` processes, `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and saves: rank 0, so files are written once per run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank: gradients and statistics cross processes."""
        return self.world_size > 1


def process_info() -> ProcessInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun sets them."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return ProcessInfo(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)))


def threads_per_rank(proc: ProcessInfo, cores: int | None = None) -> int:
    """TUNESMITH_THREADS_PER_RANK if set, else this node's cores shared evenly between its ranks."""
    if os.environ.get(THREADS_VARIABLE, "").isdigit() and int(os.environ[THREADS_VARIABLE]) > 0:
        return int(os.environ[THREADS_VARIABLE])
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(proc.local_world_size, 1))


def start(proc: ProcessInfo, device: torch.device, timeout_s: float, cpu_collectives: bool = False) -> None:
    """Join the process group (once): NCCL on CUDA, gloo on the CPU with this rank's share of the cores.
    `cpu_collectives`: CUDA ranks also get gloo, for tensors offloaded to the CPU (fsdp offload)."""
    if not proc.distributed or dist.is_initialized():
        return
    die_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(proc.local_rank)
        backend = "cpu:gloo,cuda:nccl" if cpu_collectives else "nccl"
    else:
        torch.set_num_threads(threads_per_rank(proc))
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cpu":
        agree_on_gemm()


PACKING_LIBRARIES = (None, "mkl", "onednn")


def agree_on_gemm() -> None:
    """Every rank multiplies with one GEMM (algorithms/linear.py): oneDNN only where every rank's own timing
    chose it, and decoding packs float32 weights for rank 0's choice of library, so the ranks of a run never
    differ in rounding by what their timings happened to see."""
    vote = torch.tensor([int(onednn_is_faster())])
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    agree_on_choice(bool(vote.item()))
    packing = torch.tensor([PACKING_LIBRARIES.index(float32_packing())])
    dist.broadcast(packing, src=0)
    agree_on_packing(PACKING_LIBRARIES[int(packing.item())])


def die_with_launcher() -> None:
    """Ask Linux to kill this rank when its launcher (torchrun) dies: torchrun starts ranks in their own
    sessions, so a kill -9 of the job's process group (or the OOM killer) would otherwise leave them
    training and writing into output_dir while a resumed run starts."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request was in place
        os._exit(1)


def stop() -> None:
    """Leave the process group (at the end of a run, or when unwinding after an error)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, proc: ProcessInfo) -> torch.device:
    """The device this rank computes on: its own GPU (LOCAL_RANK) on CUDA."""
    if device.type == "cuda" and proc.distributed:
        return torch.device("cuda", proc.local_rank)
    return device


def active() -> bool:
    """Whether collectives run (a process group with more than one rank)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, in float64 (item counts, metric sums), on the collective device."""
    tensor = torch.as_tensor(values, dtype=torch.float64).to(collective_device(), copy=True)
    if active():
        dist.all_reduce(tensor)
    return tensor


def all_max(value: float) -> float:
    """The maximum over ranks (a flag any rank may raise, such as 'stop after this step')."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed element-wise over ranks (itself alone): the statistics RL normalises with."""
    if not active():
        return tensor
    summed = tensor.detach().clone()
    dist.all_reduce(summed)
    return summed


def gather_strided(values: torch.Tensor, total_rows: int) -> torch.Tensor:
    """Every rank's share of a row-wise result, in row order: rank r computed rows r, r + W, r + 2W, ...
    as `values` [its rows, ...]; returns [total_rows, ...] on the CPU (values itself alone)."""
    if not active():
        return values.cpu()
    world, device = dist.get_world_size(), collective_device()
    per_rank = math.ceil(total_rows / world)
    padded = values.new_zeros((per_rank, *values.shape[1:]), device=device)
    padded[:len(values)] = values.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    result = values.new_zeros((total_rows, *values.shape[1:]), device="cpu")
    for rank, part in enumerate(parts):
        result[rank::world] = part[:len(range(rank, total_rows, world))].cpu()
    return result


def sum_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Sum every parameter's gradient over ranks, in flat buckets (one collective per bucket, not per tensor)."""
    if not active():
        return
    for param in params:  # a weight no token reached on this rank (an unused expert) still takes part
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= bucket_bytes:
            _sum_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _sum_bucket(bucket)


def _sum_bucket(grads: list[torch.Tensor]) -> None:
    """All-reduce one bucket of same-device gradients through one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        offset = 0
        for grad in group:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_trainable(model: torch.nn.Module) -> None:
    """Rank 0's trainable weights on every rank, so replicas start identical (frozen weights come from
    the same files on every rank; a fresh LoRA adapter or value head is drawn from each rank's RNG)."""
    if not active():
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def barrier() -> None:
    """Wait for every rank (around checkpoint writes)."""
    if active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensors live: the rank's GPU under NCCL, the CPU under gloo or alone."""
    if active() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
