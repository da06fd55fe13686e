"""The distributed section: how several ranks share a run (torchrun / NPROC_PER_NODE start them).

One key chooses the strategy, `distributed_strategy`; Hugging Face's `fsdp: full_shard | shard_grad_op`
and LLaMA-Factory's `deepspeed: ds_z{0,2,3}_config.json` are read as spellings of it, so existing
YAMLs keep working. ZeRO-0/1 become ddp, ZeRO-2 fsdp sharding gradients and optimizer state
(`shard_grad_op`), ZeRO-3 fsdp sharding everything (`full_shard`); a notice says what was chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tunesmith.config.schema import choice_message

STRATEGIES = ("auto", "ddp", "fsdp")
FSDP_MODES = ("full_shard", "shard_grad_op")
FSDP_OPTIONS = ("auto_wrap", "offload")


@dataclass
class DistributedArgs:
    """How ranks share the work when the run is started by torchrun (or NPROC_PER_NODE)."""

    section: ClassVar[str] = "distributed"
    distributed_strategy: str = "auto"
    """auto, ddp or fsdp. ddp: every rank holds the model, gradients are summed. fsdp: parameters, gradients and optimizer state are sharded per decoder layer (full fine-tuning that does not fit one device). auto: fsdp for full fine-tuning on several ranks, else ddp."""
    fsdp: str | None = None
    """Hugging Face's spelling: `full_shard` or `shard_grad_op` (parameters stay gathered between forward and backward), optionally with `offload` (parameters and optimizer on the CPU, CUDA only) and `auto_wrap` (always on)."""
    deepspeed: str | None = None
    """LLaMA-Factory's DeepSpeed JSON (ds_z0/z2/z3_config.json): read for its ZeRO stage and offload settings and mapped to ddp or fsdp."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait for the other ranks before the run fails (LLaMA-Factory's key)."""

    def resolve(self) -> None:
        """Fill `fsdp` from the DeepSpeed JSON when one is given (its problems are reported by problems())."""
        if self.deepspeed and self.fsdp is None and self.distributed_strategy == "auto":
            stage, offload, _ = read_deepspeed(self.deepspeed)
            if stage is not None and stage >= 2:
                self.fsdp = ("full_shard" if stage == 3 else "shard_grad_op") + (" offload" if offload else "")
            elif stage is not None:
                self.distributed_strategy = "ddp"

    def problems(self) -> list[tuple[str, str]]:
        """A known strategy, a readable DeepSpeed file, FSDP options tunesmith implements."""
        words = (self.fsdp or "").split()
        checks = [
            ("distributed_strategy", self.distributed_strategy not in STRATEGIES,
             choice_message("distributed_strategy", self.distributed_strategy, STRATEGIES)),
            ("fsdp", bool(words) and (sum(w in FSDP_MODES for w in words) != 1
                                      or any(w not in FSDP_MODES + FSDP_OPTIONS for w in words)),
             f"`fsdp: {self.fsdp}` must name one of {', '.join(FSDP_MODES)}, optionally with "
             f"{' and '.join(FSDP_OPTIONS)} (e.g. `fsdp: full_shard auto_wrap`); hybrid sharding is not supported."),
            ("fsdp", bool(words) and self.distributed_strategy == "ddp",
             "`fsdp` is set but `distributed_strategy: ddp`; remove one of them."),
            ("deepspeed", bool(self.deepspeed) and read_deepspeed(self.deepspeed)[2] is not None,
             read_deepspeed(self.deepspeed)[2] if self.deepspeed else ""),
            ("ddp_timeout", self.ddp_timeout < 1, "`ddp_timeout` must be at least 1 second."),
        ]
        return [(key, message) for key, failed, message in checks if failed]

    def strategy(self, full_finetuning: bool, world_size: int) -> str:
        """ddp or fsdp for this run."""
        if self.fsdp or self.distributed_strategy == "fsdp":
            return "fsdp"
        if self.distributed_strategy == "ddp":
            return "ddp"
        return "fsdp" if full_finetuning and world_size > 1 else "ddp"

    @property
    def shard_grad_op(self) -> bool:
        """ZeRO-2: parameters stay gathered from forward to backward; gradients and optimizer sharded."""
        return "shard_grad_op" in (self.fsdp or "").split()

    @property
    def offload(self) -> bool:
        """Parameters, gradients and the optimizer step on the CPU (FSDP's CPUOffloadPolicy)."""
        return "offload" in (self.fsdp or "").split()

    def summary(self) -> str | None:
        """The notice saying what a DeepSpeed config became (None without one)."""
        if not self.deepspeed:
            return None
        stage, _, _ = read_deepspeed(self.deepspeed)
        became = f"fsdp ({self.fsdp})" if self.fsdp else "ddp"
        return (f"notice: deepspeed: {self.deepspeed} (ZeRO-{stage}) runs on PyTorch's own engine as {became}; "
                "tunesmith does not use DeepSpeed.")


def read_deepspeed(path: str) -> tuple[int | None, bool, str | None]:
    """(ZeRO stage, offload to CPU, problem) of a DeepSpeed JSON config."""
    file = Path(path)
    try:
        config = json.loads(file.read_text())
    except OSError as err:
        return None, False, f"`deepspeed: {path}` cannot be read ({err.strerror}); give the path of a DeepSpeed JSON file."
    except json.JSONDecodeError as err:
        return None, False, f"`deepspeed: {path}` is not valid JSON (line {err.lineno}: {err.msg})."
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        return None, False, f"`deepspeed: {path}`: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}."
    devices = {part: (zero.get(part) or {}).get("device", "none") for part in ("offload_optimizer", "offload_param")}
    if any(device not in ("none", "cpu", None) for device in devices.values()):
        return stage, False, (f"`deepspeed: {path}`: offload to {sorted(set(devices.values()) - {'none', 'cpu'})} is not "
                              "supported; tunesmith can offload to the CPU (`device: cpu`) or not at all (`device: none`).")
    return stage, any(device == "cpu" for device in devices.values()), None
