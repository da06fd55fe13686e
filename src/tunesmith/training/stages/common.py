"""What every stage shares: the backbone forward, per-sequence log-probs, and the train/eval split."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.algorithms.logprobs import chunked_logprobs_at
from tunesmith.config import TrainConfig
from tunesmith.data.dataset import split_train_eval
from tunesmith.errors import TunesmithError
from tunesmith.model.attention import PREFIXES_KWARG, SEGMENTS_KWARG, VARLEN_SDPA, prefixes_applied


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states [rows, seq, hidden] of a right-padded or packed batch.

    Packed batches carry position_ids, no attention_mask, and `cu_seqlens`, the sample boundaries that
    let attention run per sample (model/attention.py); without that attention, transformers sees the
    position_ids alone and masks across samples itself. Right-padded rows need no mask either: under
    causal attention a real token only sees earlier positions, and every pad comes after the row's real
    tokens. Leaving the mask out lets sdpa take its causal fast path; pad outputs are garbage, never read.
    """
    extra, shares_prompts = {}, any(batch.get("segment_prefixes") or ())
    if "cu_seqlens" in batch and model.config._attn_implementation == VARLEN_SDPA:
        extra[SEGMENTS_KWARG] = batch["cu_seqlens"]
        if shares_prompts:
            extra[PREFIXES_KWARG] = batch["segment_prefixes"]
    elif shares_prompts:
        raise _prompt_sharing_error(model)
    applied = prefixes_applied()
    output = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                                 use_cache=False, **extra)
    if shares_prompts and prefixes_applied() == applied:  # the model did not pass them to attention
        raise _prompt_sharing_error(model)
    return output.last_hidden_state


def _prompt_sharing_error(model) -> TunesmithError:
    return TunesmithError(
        f"{type(model).__name__} (attention `{model.config._attn_implementation}`) does not pass tunesmith's "
        "per-sequence attention arguments to its attention layers, so a preference pair could not share its "
        "prompt between the two answers. rm and dpo support transformers' built-in causal LMs loaded "
        "without trust_remote_code (Llama, Qwen2, Mistral, Gemma and the like).")


def last_token_positions(batch: dict) -> torch.Tensor:
    """Flat index of each sequence's last token: named by pair batches, else the end of each packed sample."""
    if "last_positions" in batch:
        return batch["last_positions"]
    return torch.tensor(batch["cu_seqlens"][1:batch["num_sequences"] + 1], device=batch["input_ids"].device) - 1


def sequence_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each sequence's answer tokens [sequences], number of those tokens [sequences]).

    For pair batches (`collate_pairs`), which name each (position, target, sequence) triple.
    """
    hidden = backbone_hidden(model, batch)
    rows = hidden.reshape(-1, hidden.shape[-1])[batch["predict_positions"]]
    token_logps = chunked_logprobs_at(rows, model.get_output_embeddings(), batch["predict_targets"], chunk_size)
    owners, count = batch["predict_owners"], batch["num_sequences"]
    sums = token_logps.new_zeros(count).index_add(0, owners, token_logps)
    return sums, torch.bincount(owners, minlength=count).to(token_logps.dtype)


def train_and_eval_rows(encode: Callable[[list[str]], list], config: TrainConfig) -> tuple[list, list]:
    """Training rows, and eval rows from eval_dataset or a seeded val_size split (none without either)."""
    examples = encode(config.dataset)
    if config.eval_dataset:
        return examples, encode(config.eval_dataset)
    if config.val_size > 0:
        return split_train_eval(examples, config.val_size, config.seed)
    return examples, []


def device_multiple(device: torch.device) -> int:
    """Pad lengths to a multiple of 64 on a GPU (few distinct shapes, aligned matmuls), not at all on a CPU."""
    return 64 if device.type == "cuda" else 1
