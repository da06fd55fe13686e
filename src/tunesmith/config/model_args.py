"""The model and adapter sections: which weights to load, and which of them train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tunesmith.config.schema import choice_message

FINETUNING_TYPES = ("lora", "full", "freeze")
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_METHODS = ("bnb", "bitsandbytes")
QUANTIZATION_TYPES = ("nf4", "fp4")


@dataclass
class ModelArgs:
    """The base model and the adapters applied on top of it."""

    section: ClassVar[str] = "model"
    model_name_or_path: str = ""
    """Hugging Face model folder or hub id (hub ids need network access)."""
    adapter_name_or_path: list[str] | None = None
    """Comma list of PEFT LoRA adapters. sft: all but the last are merged, the last resumes training.
    rm/dpo/ppo/grpo: all are merged (for dpo/ppo/grpo that merged model is the reference) and a fresh adapter is trained."""
    served_adapters: dict[str, str] | None = None
    """api: more LoRA adapters trained on model_name_or_path, served beside the default model and chosen by a request's `model`: name: folder (name=folder,name=folder on the command line)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model folder to run. Off unless you trust the source."""
    quantization_bit: int | None = None
    """4 or 8: load the base's linear layers quantized through bitsandbytes and train LoRA on top (QLoRA); the adapter loads on the unquantized base."""
    quantization_method: str = "bnb"
    """How to quantize the base: bnb (bitsandbytes), the one tunesmith supports."""
    quantization_type: str = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's) or fp4."""
    double_quantization: bool = True
    """4-bit: quantize the block scales too (QLoRA's double quantization, ~0.4 bits per weight less)."""

    def problems(self) -> list[tuple[str, str]]:
        """The model is the one key every command needs; quantization choices."""
        checks = [
            ("model_name_or_path", not self.model_name_or_path,
             "`model_name_or_path` is required (a model folder or hub id)."),
            ("quantization_bit", self.quantization_bit not in (None, *QUANTIZATION_BITS),
             f"`quantization_bit` must be 4 or 8 (bitsandbytes), got {self.quantization_bit!r}."),
            ("quantization_method", self.quantization_method not in QUANTIZATION_METHODS,
             f"`quantization_method: {self.quantization_method}` is not supported; tunesmith quantizes with "
             "bitsandbytes (`bnb`). For a GPTQ/AWQ/HQQ model, train LoRA on its full-precision original."),
            ("quantization_type", self.quantization_type not in QUANTIZATION_TYPES,
             choice_message("quantization_type", self.quantization_type, QUANTIZATION_TYPES)),
        ]
        return [(key, message) for key, failed, message in checks if failed] + self._served_problems()

    def _served_problems(self) -> list[tuple[str, str]]:
        """Served adapter names a request can use (not the default's or the base's id) and folders that exist."""
        default = Path((self.adapter_name_or_path or [self.model_name_or_path])[-1]).name
        taken = {default, self.model_name_or_path, Path(self.model_name_or_path).name}
        for name, folder in (self.served_adapters or {}).items():
            if not name:
                return [("served_adapters", f"`served_adapters` has an adapter with no name ({folder}); write name: folder.")]
            if name in taken:
                return [("served_adapters", f"served adapter `{name}` has the name of the default model or the base "
                                            "model, which requests already use; rename it.")]
            if not Path(folder).expanduser().is_dir():
                return [("served_adapters", f"served adapter `{name}`: folder {folder} does not exist.")]
        return []


@dataclass
class AdapterArgs:
    """What trains: LoRA adapters, every weight, or the last layers."""

    section: ClassVar[str] = "adapter"
    finetuning_type: str = "lora"
    """lora (train low-rank adapters), full (every weight) or freeze (only the last layers)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int | None = None
    """LoRA alpha; the update is scaled by alpha / r. Default: 2 * lora_rank (LLaMA-Factory's default)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path only (the frozen base path never sees it)."""
    lora_target: list[str] | None = None
    """Modules to adapt: `all` (every Linear but the output head) or a comma list such as q_proj,v_proj."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N decoder layers (negative: the first -N)."""
    freeze_trainable_modules: list[str] | None = None
    """freeze: module names inside the trainable layers to train (`all` or e.g. mlp,self_attn)."""

    def resolve(self) -> None:
        """LLaMA-Factory's defaults that depend on other keys."""
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.lora_target is None:
            self.lora_target = ["all"]
        if self.freeze_trainable_modules is None:
            self.freeze_trainable_modules = ["all"]

    def problems(self) -> list[tuple[str, str]]:
        """Ranges LoRA needs to be a LoRA."""
        checks = [
            ("finetuning_type", self.finetuning_type not in FINETUNING_TYPES,
             choice_message("finetuning_type", self.finetuning_type, FINETUNING_TYPES)),
            ("lora_rank", self.lora_rank < 1, f"`lora_rank` must be at least 1, got {self.lora_rank}."),
            ("lora_dropout", not 0 <= self.lora_dropout < 1, f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}."),
            ("lora_alpha", self.lora_alpha <= 0, f"`lora_alpha` must be positive, got {self.lora_alpha}."),
        ]
        return [(key, message) for key, failed, message in checks if failed]

    @property
    def is_lora(self) -> bool:
        """Whether the run trains LoRA adapters (the base stays frozen)."""
        return self.finetuning_type == "lora"
