"""The model's linear layers on the faster CPU GEMM (algorithms/linear.py), in training and inference alike.

`use_fast_linears` turns each plain `nn.Linear` of a loaded model into a `FastLinear` in place (its class
only: the weights, their names and every `isinstance(module, nn.Linear)` stay as they were, so PEFT
export, merging and saving see an ordinary model). It does so only on machines where oneDNN's float32
GEMM beats torch's BLAS; elsewhere the model keeps torch's own layers and pays nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.algorithms.linear import linear, onednn_is_faster


class FastLinear(nn.Linear):
    """An nn.Linear whose product goes through `algorithms.linear.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a FastLinear (each call still picks its GEMM by its size); the
    number changed, 0 where oneDNN is not the faster GEMM."""
    if not onednn_is_faster():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            changed += 1
    return changed


def is_plain_linear(module: nn.Module) -> bool:
    """nn.Linear or FastLinear: a float weight any matmul can use (not a bitsandbytes 4/8-bit layer)."""
    return type(module) in (nn.Linear, FastLinear)
