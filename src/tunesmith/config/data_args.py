"""The data section: which datasets, how they are templated, cut and packed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class DataArgs:
    """Datasets, chat template, lengths and packing."""

    section: ClassVar[str] = "data"
    dataset: list[str] | None = None
    """Comma list of dataset names from dataset_info.json, or paths to json/jsonl/csv/parquet files."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files."""
    eval_dataset: list[str] | None = None
    """Comma list of datasets to evaluate on (instead of splitting off val_size)."""
    val_size: float = 0.0
    """Share (0-1) or number (>=1) of training samples held out for evaluation."""
    template: str | None = None
    """Chat template: the tokenizer's own when unset; or qwen/chatml, llama3, default, empty."""
    default_system: str | None = None
    """System prompt used when a conversation has none (chat, api, predict); unset: the template's own."""
    cutoff_len: int = 2048
    """Maximum tokens per sample (prompt + response); the response is kept preferentially."""
    max_samples: int | None = None
    """Use at most this many records from each dataset."""
    packing: bool = False
    """Pack several samples into each row of cutoff_len tokens; attention stays within each sample."""
    neat_packing: bool = False
    """LLaMA-Factory's name for packing without cross-attention; tunesmith's packing always is."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (by default only responses are learned)."""
    mask_history: bool = False
    """In multi-turn dialogues, train only the last assistant turn."""
    skip_bad_records: bool = False
    """Skip malformed records (reporting how many) instead of stopping at the first one."""

    def resolve(self) -> None:
        """neat_packing is packing as tunesmith always does it."""
        if self.neat_packing:
            self.packing = True

    def problems(self) -> list[tuple[str, str]]:
        """Lengths and split sizes that cannot work."""
        checks = [
            ("cutoff_len", self.cutoff_len < 2, f"`cutoff_len` must be at least 2, got {self.cutoff_len}."),
            ("val_size", self.val_size < 0, f"`val_size` must not be negative, got {self.val_size}."),
            ("max_samples", self.max_samples is not None and self.max_samples < 1,
             f"`max_samples` must be a positive number of records per dataset, got {self.max_samples}; "
             "remove the key to use every record."),
            ("val_size", self.val_size > 0 and self.eval_dataset is not None,
             "set either `val_size` or `eval_dataset`, not both."),
        ]
        return [(key, message) for key, failed, message in checks if failed]

    @property
    def has_eval_split(self) -> bool:
        """Whether an eval split exists (a held-out share or an eval dataset)."""
        return self.val_size > 0 or bool(self.eval_dataset)
