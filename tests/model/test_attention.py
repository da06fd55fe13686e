"""attention.py: per-segment sdpa equals attention over each segment alone, with prompt prefixes and sliding windows."""

import torch
import torch.nn.functional as F

from tunesmith.model.attention import row_mask, varlen_sdpa_forward


class Layer(torch.nn.Module):
    num_key_value_groups = 2


def reference(q, k, v, window=None):
    """Plain masked attention of one segment [1, H, L, D] (kv heads repeated), optionally windowed."""
    length = q.shape[2]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    mask = (j <= i) & ((j > i - window) if window else True)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)


def test_segments_with_prefix_and_sliding_window_match_each_segment_alone():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    # segments [0, 7) and [7, 12); the second also sees [0, 3) as its prompt, as a DPO rejected answer does
    out, _ = varlen_sdpa_forward(Layer(), q, k, v, None, cu_seqlens=[0, 7, 12], segment_prefixes=[None, (0, 3)],
                                 sliding_window=4)
    out = out.transpose(1, 2)
    torch.testing.assert_close(out[:, :, :7], reference(q[:, :, :7], k[:, :, :7], v[:, :, :7], 4))
    rows = torch.cat([torch.arange(3), torch.arange(7, 12)])  # the prompt, then the second answer
    torch.testing.assert_close(out[:, :, 7:], reference(q[:, :, rows], k[:, :, rows], v[:, :, rows], 4)[:, :, 3:])


def test_without_segments_it_is_transformers_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = varlen_sdpa_forward(Layer(), q, k, v, None)
    torch.testing.assert_close(out.transpose(1, 2), reference(q, k, v))


def test_row_mask_is_the_per_segment_computation_as_one_mask():
    """The accelerator path (one masked sdpa) equals the CPU path (one sdpa per segment)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    bounds, prefixes = (0, 5, 9, 15, 20), (None, (0, 2), None, (9, 12))
    for window in (None, 3):
        per_segment, _ = varlen_sdpa_forward(Layer(), q, k, v, None, cu_seqlens=list(bounds),
                                             segment_prefixes=list(prefixes), sliding_window=window)
        mask = row_mask(bounds, prefixes, window, torch.device("cpu"))
        one_call = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                  attn_mask=mask)
        torch.testing.assert_close(per_segment, one_call.transpose(1, 2))
    expected = torch.zeros(20, 20, dtype=torch.bool)  # written out for the small case without a window
    for start, end in zip(bounds[:-1], bounds[1:]):
        expected[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
    expected[5:9, 0:2] = True
    expected[15:20, 9:12] = True
    assert torch.equal(row_mask(bounds, prefixes, None, torch.device("cpu")), expected)
