"""Attention for packed batches that costs what the samples cost, not what the packed row costs.

A packed batch is one row holding several samples back to back (position_ids restart at 0 for each).
transformers keeps them apart with a block-diagonal [L, L] mask, which sdpa must evaluate in full:
eight 250-token samples packed into 2,000 tokens do 8x the attention work of the samples alone, and a
masked sdpa cannot take its causal fast path. Here, when the batch says where its samples start
(`cu_seqlens`, cumulative lengths as a Python list), attention runs per sample with is_causal=True.
Without it this is transformers' own sdpa, so generation, padded batches and every other caller are
unaffected, and a model that does not pass the keyword through to attention still gets the correct
(masked) result.

On a GPU the per-sample loop costs a kernel launch per sample and layer, which is what dominates
there, so accelerators take one sdpa call with a block mask built once per forward from the same
segment description: the GPU does the masked-out work, the host does one launch.

    model.set_attn_implementation(VARLEN_SDPA)   # done by load_model
    model(input_ids, position_ids=..., cu_seqlens=[0, 120, 370, 512])
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_SDPA = "tunesmith_sdpa"
SEGMENTS_KWARG = "cu_seqlens"
PREFIXES_KWARG = "segment_prefixes"


class _PrefixUse:
    """Counts forwards that applied segment_prefixes, so a caller can tell they reached attention."""

    count = 0


def prefixes_applied() -> int:
    """How many forwards so far applied segment_prefixes; unchanged across a forward means the model dropped them."""
    return _PrefixUse.count


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sdpa per packed sample when `cu_seqlens` is given (one row, no cache); transformers' sdpa otherwise.

    `segment_prefixes` (optional, one entry per segment) lets a segment also attend to an earlier span
    of the row, as if that span came right before it: a DPO pair's rejected answer reads the prompt
    laid out before the chosen answer, so the prompt is computed once for both. A layer with a
    `sliding_window` (Mistral, Gemma) keeps its window inside each segment.
    """
    bounds = kwargs.pop(SEGMENTS_KWARG, None)
    prefixes = kwargs.pop(PREFIXES_KWARG, None) or [None] * max(len(bounds or ()) - 1, 0)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or len(bounds) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window")
    if any(prefixes):
        _PrefixUse.count += 1
    if query.device.type != "cpu":
        mask = row_mask(tuple(bounds), tuple(tuple(p) if p else None for p in prefixes), window, query.device)
        kwargs.pop("sliding_window", None)
        return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)
    return _per_segment_sdpa(query, key, value, bounds, prefixes, window, dropout, scaling), None


def _per_segment_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                      prefixes: list[tuple[int, int] | None], window: int | None, dropout: float,
                      scaling: float | None) -> torch.Tensor:
    """[batch, seq, heads, head_dim] attention output of one packed row, one causal sdpa call per segment."""
    # split, not slicing: its backward is one concatenation, where each slice's backward would fill a
    # full-size zero tensor. enable_gqa lets grouped-query kv heads serve their query heads uncopied.
    cuts = sorted(set(bounds).union(*(prefix for prefix in prefixes if prefix)))
    at = {cut: i for i, cut in enumerate(cuts)}
    sizes = [end - start for start, end in zip(cuts[:-1], cuts[1:])]
    pieces = [tensor.split(sizes, 2) for tensor in (query, key, value)]

    def span(which: int, start: int, end: int) -> torch.Tensor:
        parts = pieces[which][at[start]:at[end]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for (start, end), prefix in zip(zip(bounds[:-1], bounds[1:]), prefixes):
        if end == start:
            continue
        q, k, v = (span(which, start, end) for which in range(3))
        width = 0
        if prefix:
            width = prefix[1] - prefix[0]
            k, v = torch.cat([span(1, *prefix), k], 2), torch.cat([span(2, *prefix), v], 2)
        if width == 0 and (window is None or end - start <= window):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        else:
            sees = _segment_mask(end - start, width, window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sees, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _segment_mask(length: int, prefix: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, prefix + length] bool: query i (at position prefix + i) sees keys at positions <= its own,
    and within the last `window` positions when the layer has a sliding window."""
    query_pos = torch.arange(prefix, prefix + length, device=device)[:, None]
    key_pos = torch.arange(prefix + length, device=device)[None, :]
    sees = key_pos <= query_pos
    if window is not None:
        sees &= key_pos > query_pos - window
    return sees


@functools.lru_cache(maxsize=4)
def row_mask(bounds: tuple[int, ...], prefixes: tuple[tuple[int, int] | None, ...], window: int | None,
             device: torch.device) -> torch.Tensor:
    """[T, T] bool for one packed row: what `varlen_sdpa_forward` computes segment by segment, as one mask.

    Query t of segment s sees key u when both are in s and u <= t, or when u is in s's prefix span.
    Positions for the sliding window count the prefix as if it came right before the segment. Cached,
    since every layer of a forward asks for the same mask.
    """
    starts = torch.tensor(bounds[:-1], device=device)
    widths = torch.tensor([p[1] - p[0] if p else 0 for p in prefixes], device=device)
    prefix_starts = torch.tensor([p[0] if p else 0 for p in prefixes], device=device)
    segment = torch.repeat_interleave(torch.arange(len(starts), device=device), starts.diff(append=starts.new_tensor([bounds[-1]])))
    pos = torch.arange(bounds[-1], device=device)
    start, width, prefix_start = starts[segment][:, None], widths[segment][:, None], prefix_starts[segment][:, None]
    query_pos = pos[:, None] - start + width  # positions within "prefix, then segment"
    same = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    offset = pos[None, :] - prefix_start
    in_prefix = (offset >= 0) & (offset < width)
    sees = same | in_prefix
    if window is not None:
        key_pos = torch.where(in_prefix, offset, pos[None, :] - start + width)
        sees &= key_pos > query_pos - window
    return sees


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
