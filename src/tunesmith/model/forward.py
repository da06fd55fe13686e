"""The forward passes every stage and the inference engine share, on packed or padded batches.

`backbone_hidden` runs the decoder (no lm_head) with tunesmith's per-sequence attention;
`sequence_logps` sums each answer's token log-probs through lm_head in chunks; `sequence_scores`
reads a value head at each sequence's last token. Batches are `TokenBatch`, `PairBatch` or `AnswerRow` (data layer).
"""

from __future__ import annotations

import torch

from tunesmith.algorithms.logprobs import chunked_logprobs_at
from tunesmith.data.packing import AnswerRow, TokenBatch
from tunesmith.data.pairs import PairBatch
from tunesmith.errors import TunesmithError
from tunesmith.model.attention import PREFIXES_KWARG, SEGMENTS_KWARG, VARLEN_SDPA, prefixes_applied

SHARDED_DECODER_CALL = "sharded_decoder_call"


def backbone_hidden(model: torch.nn.Module, batch: TokenBatch | PairBatch | AnswerRow) -> torch.Tensor:
    """Last hidden states [rows, seq, hidden] of a right-padded or packed batch.

    Packed batches carry position_ids, no attention_mask, and `cu_seqlens`, the sample boundaries that
    let attention run per sample (model/attention.py); without that attention, transformers sees the
    position_ids alone and masks across samples itself. Right-padded rows need no mask either: under
    causal attention a real token only sees earlier positions, and every pad comes after the row's real
    tokens. Leaving the mask out lets sdpa take its causal fast path; pad outputs are garbage, never read.
    """
    prefixes = getattr(batch, "segment_prefixes", None)
    extra, shares_prompts = {}, any(prefixes or ())
    if batch.cu_seqlens is not None and model.config._attn_implementation == VARLEN_SDPA:
        extra[SEGMENTS_KWARG] = batch.cu_seqlens
        if shares_prompts:
            extra[PREFIXES_KWARG] = prefixes
    elif shares_prompts:
        raise _prompt_sharing_error(model)
    applied = prefixes_applied()
    output = decoder_call(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra)
    if shares_prompts and prefixes_applied() == applied:  # the model did not pass them to attention
        raise _prompt_sharing_error(model)
    return output.last_hidden_state


def decoder_call(model: torch.nn.Module):
    """The decoder as a callable. A model sharded with FSDP (training/parallel.py) sets
    `sharded_decoder_call`, which runs the decoder through the root's gather-and-reduce hooks."""
    return getattr(model, SHARDED_DECODER_CALL, None) or model.get_decoder()


def _prompt_sharing_error(model: torch.nn.Module) -> TunesmithError:
    return TunesmithError(
        f"{type(model).__name__} (attention `{model.config._attn_implementation}`) does not pass tunesmith's "
        "per-sequence attention arguments to its attention layers, so a preference pair could not share its "
        "prompt between the two answers. rm and dpo support transformers' built-in causal LMs loaded "
        "without trust_remote_code (Llama, Qwen2, Mistral, Gemma and the like).")


def last_token_positions(batch: TokenBatch | PairBatch) -> torch.Tensor:
    """Flat index of each sequence's last token: named by pair batches, else the end of each packed sample."""
    if isinstance(batch, PairBatch):
        return batch.last_positions
    return torch.tensor(batch.cu_seqlens[1:batch.num_sequences + 1], device=batch.input_ids.device) - 1


def sequence_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each sequence's answer tokens [sequences], number of those tokens [sequences])."""
    return summed_by_sequence(answer_token_logps(model, batch, chunk_size), batch)


def answer_token_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int) -> torch.Tensor:
    """[answer tokens] log p of every answer token, in `batch.predict_targets` order (`predict_owners` names
    each one's sequence); the per-token terms of `sequence_logps`, which the pair logs show one by one."""
    hidden = backbone_hidden(model, batch)
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.predict_positions]
    return chunked_logprobs_at(rows, model.get_output_embeddings(), batch.predict_targets, chunk_size)


def summed_by_sequence(token_logps: torch.Tensor, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [sequences], token counts [sequences]) of `answer_token_logps`' per-token values."""
    owners, count = batch.predict_owners, batch.num_sequences
    sums = token_logps.new_zeros(count).index_add(0, owners, token_logps)
    return sums, torch.bincount(owners, minlength=count).to(token_logps.dtype)


def sequence_scores(model: torch.nn.Module, batch: TokenBatch | PairBatch,
                    head: torch.nn.Module | None = None) -> torch.Tensor:
    """[sequences] value-head score (model.v_head unless `head` is given) at each sequence's last token."""
    hidden = backbone_hidden(model, batch)
    return (head or model.v_head)(hidden.reshape(-1, hidden.shape[-1])[last_token_positions(batch)])


def device_multiple(device: torch.device) -> int:
    """Pad lengths to a multiple of 64 on a GPU (few distinct shapes, aligned matmuls), not at all on a CPU."""
    return 64 if device.type == "cuda" else 1
