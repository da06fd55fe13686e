"""packing.py: rows respect cutoff_len, keep every token, restart positions; packed logits equal unpacked."""

import random

import pytest
import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.packing import collate, pack_examples, pack_into_row
from tunesmith.errors import TunesmithError
from tunesmith.model.attention import VARLEN_SDPA


def make_examples(lengths, seed=0):
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        tokens = [rng.randrange(1, 90) for _ in range(n)]
        prompt = n // 2
        examples.append({"input_ids": tokens, "labels": [IGNORE_INDEX] * prompt + tokens[prompt:]})
    return examples


def split_row(row):
    """Cut a packed row back into samples at every position reset."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [row["input_ids"][a:b] for a, b in zip(starts, starts[1:])]


def test_rows_fit_keep_all_tokens_and_restart_positions():
    lengths = [random.Random(1).randrange(1, 30) for _ in range(60)]
    examples = make_examples(lengths)
    rows = pack_examples(examples, cutoff_len=32)
    assert all(len(row["input_ids"]) <= 32 for row in rows)
    assert sorted(sample for row in rows for sample in split_row(row)) == sorted(
        e["input_ids"] for e in examples
    )
    assert len(rows) < len(examples) and len(rows) >= -(-sum(lengths) // 32)
    for row in rows:
        assert all(p == 0 or p == q + 1 for q, p in zip(row["position_ids"], row["position_ids"][1:]))


def test_first_label_of_each_packed_sample_is_ignored():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    (row,) = pack_examples(examples, cutoff_len=8)
    assert row == {
        "input_ids": [1, 2, 3, 4, 5],
        "labels": [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5],
        "position_ids": [0, 1, 2, 0, 1],
    }


def test_sample_longer_than_cutoff_is_an_error():
    with pytest.raises(TunesmithError, match="sample 1 of length 9"):
        pack_examples(make_examples([3, 9]), cutoff_len=8)


def test_collate_unpacked_pads_to_batch_longest():
    batch = collate(make_examples([3, 5]), pad_token_id=0)
    assert batch.position_ids is None and batch.cu_seqlens is None
    assert batch.num_tokens == 8
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.input_ids[0, 3:].tolist() == [0, 0] and batch.labels[0, 3:].tolist() == [-100, -100]


def test_collate_packed_rows_become_one_row_with_sample_bounds():
    rows = [{"input_ids": [7, 8, 9, 4], "labels": [-100, 8, 9, -100], "position_ids": [0, 1, 2, 0]}]
    rows.append({"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]})
    batch = collate(rows, pad_token_id=0)
    assert batch.attention_mask is None
    assert batch.num_tokens == 6 and batch.num_sequences == 3
    assert batch.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.cu_seqlens == [0, 3, 4, 6]
    assert batch.labels.tolist() == [[-100, 8, 9, -100, -100, 6]]


def test_pack_into_row_pads_tail_as_its_own_unlabelled_segment():
    batch = pack_into_row([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], pad_token_id=0, pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]  # first label of each ignored
    assert batch.cu_seqlens == [0, 3, 5, 8] and batch.num_sequences == 2 and batch.num_tokens == 5
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


@pytest.mark.parametrize("per_sample_attention", [False, True], ids=["transformers-mask", "varlen"])
def test_packed_row_logits_equal_each_sample_alone(make_tiny_model, per_sample_attention):
    """Both ways of keeping samples apart: transformers' block mask from position_ids, and varlen sdpa."""
    model = make_tiny_model("qwen2")
    examples = make_examples([9, 5, 12, 3, 7], seed=3)
    rows = pack_examples(examples, cutoff_len=20)
    assert any(len(split_row(row)) > 1 for row in rows)
    batch = collate(rows, pad_token_id=0)
    extra = {}
    if per_sample_attention:
        model.set_attn_implementation(VARLEN_SDPA)
        extra["cu_seqlens"] = batch.cu_seqlens
    with torch.no_grad():
        # use_cache=False: with a cache transformers skips packed-sequence detection
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       **extra).logits[0]
        start = 0
        for row in rows:
            for sample in split_row(row):
                alone = model(input_ids=torch.tensor([sample]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[start : start + len(sample)], alone, atol=1e-5, rtol=0)
                start += len(sample)


def test_collate_pads_to_a_multiple():
    batch = collate(make_examples([3, 5]), pad_token_id=0, pad_to_multiple_of=4)
    assert batch.input_ids.shape == (2, 8) and batch.num_tokens == 8
    assert batch.labels[1, 5:].tolist() == [-100, -100, -100]


def test_collate_one_row_lays_unpacked_samples_end_to_end():
    examples = make_examples([3, 5])
    batch = collate(examples, pad_token_id=0, one_row=True)
    assert batch.input_ids.tolist() == [examples[0]["input_ids"] + examples[1]["input_ids"]]
    assert batch.cu_seqlens == [0, 3, 8] and batch.num_tokens == 8
    padded = collate(examples, pad_token_id=0)
    trained = lambda labels: int((labels[:, 1:] != IGNORE_INDEX).sum())  # noqa: E731
    assert trained(batch.labels) == trained(padded.labels)  # the same tokens are learned


def test_pack_answers_runs_each_prompt_once_wherever_its_answers_stand():
    from tunesmith.data.packing import pack_answers
    row = pack_answers([[1, 2, 3], [7], [1, 2, 3], [7]], [[4, 5], [8, 9], [6], []], pad_token_id=0,
                       pad_to_multiple_of=4)
    # prompt 1 + its answer | prompt 2 + its answer | answer 3 (reads prompt 1 at 0..3) | pad; the empty answer has no place
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 6, 0, 0, 0]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert row.cu_seqlens == [0, 5, 8, 9, 12]
    assert row.segment_prefixes == [None, None, (0, 3), None]
    # answer 1's tokens are predicted at 2, 3; answer 2's at 5, 6; answer 3's first token at prompt 1's end (2)
    assert row.predict_positions.tolist() == [2, 3, 5, 6, 2]
    assert row.targets.tolist() == [4, 5, 8, 9, 6]
    unshared = pack_answers([[1, 2, 3], [1, 2, 3]], [[4, 5], [6]], pad_token_id=0, share_prompts=False)
    assert unshared.input_ids.tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6]]
    assert unshared.segment_prefixes == [None, None] and unshared.predict_positions.tolist() == [2, 3, 7]
    with pytest.raises(TunesmithError, match="no tokens"):
        pack_answers([[]], [[4]], pad_token_id=0)
