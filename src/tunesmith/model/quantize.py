"""Quantized base weights for QLoRA (Dettmers et al. 2023): the base's linear layers load as 4-bit (NF4 or
FP4, optionally with double quantization of the scales) or 8-bit (LLM.int8()) through bitsandbytes,
frozen; LoRA adapters train beside them in the compute dtype, and the saved adapter is an ordinary PEFT
adapter of the unquantized base. The output head and the embeddings stay in the compute dtype.

Two guards keep training correct. bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first
time it runs in eval mode without gradients (the frozen reference pass of DPO/PPO does exactly that),
and that kernel has no backward: gradients to the layers below would silently vanish. `prepare` switches
the repacking off. And a quantized weight cannot absorb a LoRA update, so merging into it is refused
(`is_quantized_linear`) and samplers use the unmerged path.

Usage:
    spec = Quantization.from_args(config.model)          # None unless quantization_bit is set
    model = load_model(path, dtype, device, quantization=spec)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are stored: `bits` 4 or 8; for 4, `kind` nf4|fp4 and `double`
    quantization of the block scales."""

    bits: int
    kind: str = "nf4"
    double: bool = True

    @classmethod
    def from_args(cls, model_args) -> Quantization | None:
        """From the model section's LLaMA-Factory keys; None when `quantization_bit` is unset."""
        if model_args.quantization_bit is None:
            return None
        return cls(model_args.quantization_bit, model_args.quantization_type, model_args.double_quantization)

    def describe(self) -> str:
        return f"{self.kind}{' + double quantization' if self.double else ''}" if self.bits == 4 else "int8"

    def transformers_config(self, compute_dtype: torch.dtype):
        """transformers' BitsAndBytesConfig for this quantization, computing in `compute_dtype`."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind,
                                  bnb_4bit_use_double_quant=self.double, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=torch.uint8)


def require_bitsandbytes() -> None:
    """A clear error when bitsandbytes is missing."""
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an inference kernel from the hub
    # (refused: untrusted remote code) and logs a warning. `prepare` keeps that kernel out of use anyway.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # 8-bit layers log "inputs will be cast ... to float16" on every matmul of an fp32/bf16 model.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise TunesmithError(
            "quantization_bit loads the base through bitsandbytes, which is not installed: pip install "
            "'tunesmith[qlora]' (or pip install bitsandbytes; its CPU backend needs bitsandbytes >= 0.46). "
            "Without it, remove quantization_bit and train LoRA on the full-precision base.") from err


def prepare(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer on bitsandbytes' differentiable path (see the module docstring), and give the
    weights that stay unquantized (embeddings, norms, biases) memory of their own on the CPU: they are
    views into the memory-mapped safetensors file, and while any view lives, every page of the file that
    quantizing read stays mapped and counted: a 0.5B model would keep 1.5 GB of fp32 weights for nothing."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        for parameter in model.parameters():  # each shared (tied) weight once
            if parameter.device.type == "cpu" and not _is_quantized_weight(parameter):
                parameter.data = parameter.data.clone()


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """Whether a linear layer's weight is a bitsandbytes 4/8-bit one (it cannot take a merge)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and _is_quantized_weight(weight)


def _is_quantized_weight(weight: torch.Tensor) -> bool:
    return type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
