"""pairs.py: one packed row per batch, the prompt computed once, and every answer's log-probs and
last hidden state exactly what the sequence gives when run alone."""

import pytest
import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX
from tunesmith.data.packing import TokenBatch
from tunesmith.data.pairs import collate_kto, collate_pairs, collate_side, shared_prefix_length
from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.model.forward import backbone_hidden, last_token_positions, sequence_logps

# prompt lengths 3, 5, 2; the second pair's answers share their first token, which is labelled, so
# only the prompt is shared; the third has an empty-prompt edge (one prompt token).
PAIRS = [([5, 6, 7], [10, 11, 12, 13], [20, 21]), ([8, 9, 10, 11, 12], [30, 31], [30, 33, 34, 35]), ([3], [40], [41, 42])]


def make_row(prompt, chosen, rejected):
    ignore = [IGNORE_INDEX] * len(prompt)
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": ignore + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": ignore + rejected}


@pytest.fixture
def model(make_tiny_model):
    model = make_tiny_model("qwen2")
    model.set_attn_implementation(VARLEN_SDPA)
    return model


def alone(model, ids, labels):
    """(summed answer log-probs, last hidden state) of one sequence run by itself, computed plainly."""
    hidden = backbone_hidden(model, TokenBatch(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
                                              num_tokens=len(ids)))[0]
    logps = torch.log_softmax(model.lm_head(hidden).float(), -1)
    total = sum(logps[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)
    return total, hidden[-1]


def test_the_prompt_is_stored_once():
    rows = [make_row(*pair) for pair in PAIRS]
    assert [shared_prefix_length(row) for row in rows] == [3, 5, 1]
    batch = collate_pairs(rows, pad_token_id=0)
    full = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    assert batch.num_tokens == full and batch.input_ids.shape[1] == full - (3 + 5 + 1)
    assert batch.num_pairs == 3 and batch.num_sequences == 6


@pytest.mark.parametrize("multiple", [1, 16])
def test_pair_batch_equals_each_sequence_alone(model, multiple):
    rows = [make_row(*pair) for pair in PAIRS]
    batch = collate_pairs(rows, pad_token_id=0, pad_to_multiple_of=multiple)
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch, chunk_size=4)
        hidden = backbone_hidden(model, batch)[0]
        last = hidden[last_token_positions(batch)]
    sequences = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    sequences += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    for index, (ids, labels) in enumerate(sequences):
        expected_sum, expected_last = alone(model, ids, labels)
        torch.testing.assert_close(sums[index], expected_sum, atol=1e-4, rtol=0)
        torch.testing.assert_close(last[index], expected_last, atol=1e-5, rtol=0)
        assert counts[index] == sum(label != IGNORE_INDEX for label in labels[1:])


def test_gradients_match_running_each_sequence_alone(model):
    rows = [make_row(*pair) for pair in PAIRS[:2]]
    sums, _ = sequence_logps(model, collate_pairs(rows, pad_token_id=0), chunk_size=4)
    weights = torch.tensor([0.3, -1.0, 0.7, 2.0])
    (sums * weights).sum().backward()
    packed = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    sequences = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    sequences += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    sum(w * alone(model, ids, labels)[0] for w, (ids, labels) in zip(weights, sequences)).backward()
    torch.testing.assert_close(packed, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("multiple", [1, 16])
def test_one_side_batch_equals_each_sequence_alone(model, multiple):
    rows = [make_row(*pair) for pair in PAIRS]
    for side in ("chosen", "rejected"):
        batch = collate_side(rows, side, pad_token_id=0, pad_to_multiple_of=multiple)
        assert batch.num_sequences == 3 and batch.num_tokens == sum(len(r[f"{side}_input_ids"]) for r in rows)
        assert batch.input_ids.shape[1] % multiple == 0
        with torch.no_grad():
            sums, counts = sequence_logps(model, batch, chunk_size=4)
            last = backbone_hidden(model, batch)[0][last_token_positions(batch)]
        for index, row in enumerate(rows):
            expected_sum, expected_last = alone(model, row[f"{side}_input_ids"], row[f"{side}_labels"])
            torch.testing.assert_close(sums[index], expected_sum, atol=1e-4, rtol=0)
            torch.testing.assert_close(last[index], expected_last, atol=1e-5, rtol=0)
            assert counts[index] == sum(label != IGNORE_INDEX for label in row[f"{side}_labels"][1:])


def test_kto_batch_holds_both_sides_and_counts_both():
    rows = [make_row(*pair) for pair in PAIRS]
    batch = collate_kto(rows, pad_token_id=0)
    assert batch.rows is rows and batch.num_pairs == 3
    assert batch.answers.input_ids[0].tolist() == sum((r["chosen_input_ids"] for r in rows), [])
    assert batch.mismatched.input_ids[0].tolist() == sum((r["rejected_input_ids"] for r in rows), [])
    assert batch.num_tokens == collate_pairs(rows, pad_token_id=0).num_tokens
