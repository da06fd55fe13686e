"""The optimisation section: batch sizes, AdamW, the learning-rate schedule, precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunesmith.config.schema import choice_message

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class OptimArgs:
    """Batches, optimizer, schedule, precision and memory."""

    section: ClassVar[str] = "train"
    per_device_train_batch_size: int = 1
    """Samples (or packed rows) per micro-batch."""
    per_device_eval_batch_size: int = 1
    """Samples per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides num_train_epochs when > 0)."""
    lr_scheduler_type: str = "linear"
    """linear, cosine, constant or constant_with_warmup."""
    warmup_ratio: float = 0.0
    """Share of the total steps spent warming the learning rate up from 0."""
    warmup_steps: int = 0
    """Warm-up steps (overrides warmup_ratio when > 0)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    seed: int = 42
    """Seed for data order, dropout and initialisation."""
    bf16: bool = False
    """Compute in bfloat16 (CUDA with bf16 support, or CPU)."""
    fp16: bool = False
    """Compute in float16 (CUDA only)."""
    use_cpu: bool = False
    """Run on the CPU even when a GPU is visible (Hugging Face's key; with bf16: true it computes in bf16 on the CPU)."""
    gradient_checkpointing: bool = False
    """Memory-saving mode: recompute activations in backward (~30% more compute), return freed memory to the OS."""
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row whose loss or gradient is not finite (each such update is skipped)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk when projecting hidden states through lm_head (bounds logits memory)."""

    def problems(self) -> list[tuple[str, str]]:
        """Values no optimizer can run with."""
        checks = [
            ("lr_scheduler_type", self.lr_scheduler_type not in SCHEDULERS, choice_message("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)),
            ("bf16", self.bf16 and self.fp16, "`bf16` and `fp16` are both true; choose one."),
            ("per_device_train_batch_size", self.per_device_train_batch_size < 1, "`per_device_train_batch_size` must be at least 1."),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size < 1, "`per_device_eval_batch_size` must be at least 1."),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps < 1, "`gradient_accumulation_steps` must be at least 1."),
            ("learning_rate", self.learning_rate <= 0, f"`learning_rate` must be positive, got {self.learning_rate}."),
            ("max_steps", self.max_steps <= 0 and self.num_train_epochs <= 0, "set `max_steps` > 0 or `num_train_epochs` > 0."),
            ("warmup_ratio", not 0 <= self.warmup_ratio < 1, f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}."),
            ("warmup_steps", self.warmup_steps < 0, "`warmup_steps` must not be negative."),
            ("max_grad_norm", self.max_grad_norm < 0, "`max_grad_norm` must not be negative (0 disables clipping)."),
            ("weight_decay", self.weight_decay < 0, "`weight_decay` must not be negative."),
            ("max_bad_steps", self.max_bad_steps < 1, "`max_bad_steps` must be at least 1."),
            ("logprob_chunk_size", self.logprob_chunk_size < 1, "`logprob_chunk_size` must be at least 1."),
        ]
        return [(key, message) for key, failed, message in checks if failed]

    @property
    def batch_rows(self) -> int:
        """Rows one optimizer update takes: micro-batch size x accumulation."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

