"""The shared forward (model/forward.py): padded and packed batches give each sample exactly its own hidden states."""

import torch

from tunesmith.data.packing import TokenBatch, collate, pack_examples
from tunesmith.model.forward import backbone_hidden


def samples():
    lengths = [5, 9, 3]
    return [{"input_ids": list(range(1 + i, 1 + i + n)), "labels": list(range(1 + i, 1 + i + n))}
            for i, n in enumerate(lengths)]


@torch.no_grad()
def alone(model, sample):
    ids = torch.tensor([sample["input_ids"]])
    return backbone_hidden(model, TokenBatch(input_ids=ids, labels=ids, num_tokens=ids.numel()))[0]


@torch.no_grad()
def test_right_padded_batch_matches_each_sample_alone(make_tiny_model):
    model = make_tiny_model("qwen2")
    batch = collate(samples(), pad_token_id=0)
    hidden = backbone_hidden(model, batch)
    for row, sample in enumerate(samples()):
        n = len(sample["input_ids"])
        assert torch.allclose(hidden[row, :n], alone(model, sample), atol=1e-5)


@torch.no_grad()
def test_packed_row_matches_each_sample_alone(make_tiny_model):
    model = make_tiny_model("llama")
    rows = pack_examples(samples(), cutoff_len=32)
    assert len(rows) == 1
    hidden = backbone_hidden(model, collate(rows, pad_token_id=0))[0]
    starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0] + [len(rows[0]["input_ids"])]
    by_ids = {tuple(s["input_ids"]): s for s in samples()}
    for start, end in zip(starts, starts[1:]):
        sample = by_ids[tuple(rows[0]["input_ids"][start:end])]
        assert torch.allclose(hidden[start:end], alone(model, sample), atol=1e-5)
