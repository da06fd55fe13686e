"""Attention for packed batches that costs what the samples cost, not what the packed row costs.

A packed batch is one row holding several samples back to back (position_ids restart at 0 for each).
transformers keeps them apart with a block-diagonal [L, L] mask, which sdpa must evaluate in full:
eight 250-token samples packed into 2,000 tokens do 8x the attention work of the samples alone, and a
masked sdpa cannot take its causal fast path. Here, when the batch says where its samples start
(`cu_seqlens`, cumulative lengths as a Python list), attention runs per sample with is_causal=True.
Without it this is transformers' own sdpa, so generation, padded batches and every other caller are
unaffected, and a model that does not pass the keyword through to attention still gets the correct
(masked) result.

    model.set_attn_implementation(VARLEN_SDPA)   # done by load_model
    model(input_ids, position_ids=..., cu_seqlens=[0, 120, 370, 512])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_SDPA = "tunesmith_sdpa"
SEGMENTS_KWARG = "cu_seqlens"


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """sdpa per packed sample when `cu_seqlens` is given (one row, no cache); transformers' sdpa otherwise."""
    bounds = kwargs.pop(SEGMENTS_KWARG, None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or len(bounds) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split, not slicing: its backward is one concatenation, where each slice's backward would fill a
    # full-size zero tensor. enable_gqa lets grouped-query kv heads serve their query heads uncopied.
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
