"""The optimizer side of the loop: AdamW, mixed precision, gradient sync across ranks, and the guard
that skips an update whose loss or gradient is not finite (so nothing non-finite reaches the weights,
a checkpoint or the saved model)."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager

import torch

from tunesmith.config import OptimArgs
from tunesmith.training import distributed
from tunesmith.training.parallel import Parallel


class Updates:
    """The loop's optimizer, handed to a stage's step: scaled backward, then sync, clip, step and zero."""

    def __init__(self, model: torch.nn.Module, optim: OptimArgs, device: torch.device,
                 parallel: Parallel | None = None):
        self.model, self.optim, self.device = model, optim, device
        self.parallel = parallel or Parallel()
        self.optimizer = build_optimizer(model, optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=optim.fp16)
        self.last_norm: torch.Tensor | None = None
        self.skipped = 0
        """Updates skipped because their loss or gradient was not finite (the loop counts bad steps from it)."""
        self._finite_loss = torch.ones((), dtype=torch.bool, device=device)

    def autocast(self) -> AbstractContextManager:
        """The run's mixed precision (bf16/fp16), for a stage's forward passes."""
        return autocast_context(self.device, self.optim)

    def global_count(self, local: float) -> float:
        """A count summed over ranks: losses are divided by the whole global step's items, so N ranks'
        summed gradients equal one process's with the N-times batch."""
        return float(distributed.all_sum([float(local)])[0]) if self.parallel.proc.distributed else float(local)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d loss / d weights (loss-scaled under fp16); remember whether the loss was finite."""
        self._finite_loss &= torch.isfinite(loss.detach()).all()
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Sum gradients over ranks, clip, step and clear; returns the norm before clipping. An update whose
        loss or gradient norm is not finite is skipped (fp16's loss scaler skips overflows on its own)."""
        self.parallel.sync_gradients(self.model)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.optim.max_grad_norm or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        bad = torch.stack([~self._finite_loss, ~torch.isfinite(norm)]).double()
        if self.parallel.proc.distributed:  # one rank's non-finite loss skips the update on every rank
            bad = distributed.all_sum(bad)
        bad_loss, bad_norm = (bool(flag) for flag in bad > 0)
        if not bad_loss and (not bad_norm or self.optim.fp16):  # fp16's scaler skips an overflow itself
            self.scaler.step(self.optimizer)
        else:
            self.skipped += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._finite_loss = torch.ones((), dtype=torch.bool, device=self.device)
        self.last_norm = norm
        return norm

    def set_lr(self, lr: float) -> None:
        """The learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr


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
