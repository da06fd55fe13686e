"""Load a reward model trained by `stage: rm` and score conversations with it.

A reward model folder is what `tunesmith train` wrote for `stage: rm`: a PEFT adapter
(adapter_config.json + adapter_model.safetensors) or a full model folder, plus value_head.safetensors
and the tokenizer, with train_config.yaml beside it (in the folder, or its parent for a checkpoint-N).
The config says which base model and earlier adapters (e.g. an SFT adapter, merged before the reward
adapter was trained) to rebuild, which chat template, and the cutoff length used in training.

    rm = RewardModel.load("saves/rm")
    rm.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])  # -> [1.93]
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from tunesmith.data.encode import encode_sft
from tunesmith.data.packing import pack_into_row
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import (
    CONFIG_NAME,
    load_adapter,
    load_side_adapter,
    merge_adapters,
    read_adapter_config,
)
from tunesmith.model.forward import sequence_scores
from tunesmith.model.loading import load_model, load_tokenizer, resolve_device_and_dtype
from tunesmith.model.lora import merge_and_unload, side_adapter
from tunesmith.model.value_head import VALUE_HEAD_FILE, attach_value_head, load_value_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TRAIN_CONFIG = "train_config.yaml"


def training_settings(folder: Path) -> dict:
    """The train_config.yaml training wrote beside the weights (in the folder or, for a checkpoint, its
    parent): a reward model's base and adapters, an adapter's template."""
    for candidate in (folder / TRAIN_CONFIG, folder.parent / TRAIN_CONFIG):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


SIDE_ADAPTER = "reward"


def _same_path(a: str | None, b: str | None) -> bool:
    """Two model or adapter locations are the same folder (or the same hub id)."""
    if a is None or b is None:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() if Path(a).exists() else a == b


class RewardModel:
    """A causal LM backbone with a value head; `score` gives one number per conversation."""

    def __init__(self, model, tokenizer, template, cutoff_len: int = 2048, head=None, adapter_context=nullcontext,
                 side: str | None = None):
        self.model = model
        self.side = side  # the side adapter's name when it shares another model's base (a LoRA policy's)
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.device = next(model.parameters()).device
        self.head = head if head is not None else model.v_head
        self.adapter_context = adapter_context  # switches a shared model to the reward adapter

    @classmethod
    def sharing_base(cls, model: PreTrainedModel, path: str | Path, base_model: str, merged_adapters: list[str] | None,
                     template: str | None = None) -> RewardModel | None:
        """The LoRA reward model in `path` as a side adapter of `model` (a LoRA policy on the same base:
        `base_model` with `merged_adapters` merged), so both share one copy of the base weights. None when
        it was trained on another base, or adapts layers the policy does not."""
        folder = Path(path)
        settings = training_settings(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / VALUE_HEAD_FILE).is_file():
            return None
        same_base = (_same_path(settings.get("model_name_or_path"), base_model)
                     and len(settings.get("adapter_name_or_path") or []) == len(merged_adapters or [])
                     and all(map(_same_path, settings.get("adapter_name_or_path") or [], merged_adapters or [])))
        if not same_base or not load_side_adapter(model, folder, SIDE_ADAPTER):
            return None
        head = load_value_head(folder, model.config.hidden_size).to(next(model.parameters()).device)
        head.requires_grad_(False)
        tokenizer = load_tokenizer(str(folder))
        chat_template = get_template(template or settings.get("template"), tokenizer)
        return cls(model, tokenizer, chat_template, int(settings.get("cutoff_len") or 2048), head,
                   partial(side_adapter, model, SIDE_ADAPTER), side=SIDE_ADAPTER)

    @classmethod
    def load(cls, path: str | Path, base_model: str | None = None, template: str | None = None,
             dtype: torch.dtype | None = None, trust_remote_code: bool = False, use_cpu: bool = False) -> RewardModel:
        """Rebuild the reward model in `path`. `base_model` overrides the recorded base (if it moved);
        `use_cpu` keeps it off a GPU."""
        folder = Path(path)
        if not (folder / VALUE_HEAD_FILE).is_file():
            raise TunesmithError(
                f"{folder} has no {VALUE_HEAD_FILE}, so it is not a reward model. Point at the output_dir (or a "
                "checkpoint-N) of a `stage: rm` run.")
        settings = training_settings(folder)
        device, default_dtype = resolve_device_and_dtype(bf16=torch.cuda.is_available() and not use_cpu, fp16=False,
                                                         use_cpu=use_cpu)
        dtype = dtype or default_dtype
        if (folder / CONFIG_NAME).is_file():
            base = base_model or settings.get("model_name_or_path") or read_adapter_config(folder)["base_model_name_or_path"]
            model = load_model(base, dtype, device, trust_remote_code=trust_remote_code)
            merge_adapters(model, settings.get("adapter_name_or_path") or [])  # what the rm run merged first
            load_adapter(model, folder, trainable=False)
            merge_and_unload(model)
        else:
            model = load_model(str(folder), dtype, device, trust_remote_code=trust_remote_code)
        model.eval()
        head = attach_value_head(model, load_value_head(folder, model.config.hidden_size))
        head.requires_grad_(False)
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
        chat_template = get_template(template or settings.get("template"), tokenizer)
        return cls(model, tokenizer, chat_template, int(settings.get("cutoff_len") or 2048))

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with an assistant turn, encoded as in rm training (the same
        template; one answer alone is truncated to cutoff_len as SFT does, where training fitted two)."""
        if not messages or messages[-1].get("role") != "assistant":
            raise TunesmithError("a conversation to score must end with an assistant message (the answer).")
        return encode_sft(messages, self.template, self.tokenizer, self.cutoff_len)["input_ids"]

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """One score per conversation: the value head at its last token."""
        scores = []
        for start in range(0, len(conversations), batch_size):
            encoded = [self.encode(messages) for messages in conversations[start:start + batch_size]]
            batch = pack_into_row([(ids, ids) for ids in encoded], self.tokenizer.pad_token_id).to(self.device)
            with self.adapter_context():
                scores += sequence_scores(self.model, batch, self.head).tolist()
        return scores
