"""A scalar head on a language model's last hidden state: the reward model's score and PPO's critic.

Stored as `value_head.safetensors` next to the adapter or model, with the tensor names TRL's
AutoModelForCausalLMWithValueHead and LLaMA-Factory use (`v_head.summary.weight` [1, hidden] and
`v_head.summary.bias` [1]), so their reward models load here and ours load there.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tunesmith.errors import TunesmithError

VALUE_HEAD_FILE = "value_head.safetensors"
ATTRIBUTE = "v_head"


class ValueHead(nn.Module):
    """Linear(hidden, 1). Small init (std 1/sqrt(hidden + 1)) so first scores are near 0 and gradients tame."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [...] scores in float32, autocast or not: a score is one number, keep it precise."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def attach_value_head(model: nn.Module, head: ValueHead | None = None) -> ValueHead:
    """Add a trainable head as `model.v_head` (so optimizer, checkpoints and .to() see it) and return it."""
    if head is None:
        head = ValueHead(model.config.hidden_size)
    device = next(model.parameters()).device
    head = head.to(device=device, dtype=torch.float32).requires_grad_(True)
    setattr(model, ATTRIBUTE, head)
    return head


def without_value_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own weights, for a Hugging Face folder that vanilla transformers loads cleanly."""
    return {key: value for key, value in state_dict.items() if not key.startswith(f"{ATTRIBUTE}.")}


def value_head_from_state(head: ValueHead, state_dict: dict[str, torch.Tensor]) -> ValueHead:
    """A plain copy of `head` holding the value-head tensors of a full (gathered) model state dict."""
    copy = ValueHead(head.summary.in_features)
    copy.load_state_dict({key.removeprefix(f"{ATTRIBUTE}."): value for key, value in state_dict.items()
                          if key.startswith(f"{ATTRIBUTE}.")})
    return copy


def save_value_head(head: ValueHead, folder: str | Path) -> None:
    """Write value_head.safetensors in fp32 under TRL's tensor names, beside the adapter or model in `folder`."""
    tensors = {f"{ATTRIBUTE}.{name}": tensor.detach().float().cpu().contiguous()
               for name, tensor in head.state_dict().items()}
    save_file(tensors, str(Path(folder) / VALUE_HEAD_FILE), metadata={"format": "pt"})


def load_value_head(folder: str | Path, hidden_size: int) -> ValueHead:
    """Read value_head.safetensors, checking names and shapes against the model's hidden size."""
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise TunesmithError(
            f"No {VALUE_HEAD_FILE} in {folder}: it is not a reward model folder. Train one with `stage: rm`.")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    expected = {f"{ATTRIBUTE}.summary.weight": (1, hidden_size), f"{ATTRIBUTE}.summary.bias": (1,)}
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape) if key in tensors else "missing"
            raise TunesmithError(
                f"{path}: tensor {key} should have shape {shape} for a model with hidden size {hidden_size}, "
                f"found {found}. The value head belongs to a different base model.")
    head = ValueHead(hidden_size)
    head.load_state_dict({key.removeprefix(f"{ATTRIBUTE}."): value.float() for key, value in tensors.items()
                          if key in expected})
    return head
