"""KTO scores its own answers with gradient and the mismatched ones in a separate no-grad pass: the
log-probs and the gradient must equal the one packed pair pass (training/pairs.pair_logps) it replaces."""

import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX
from tunesmith.data.pairs import collate_kto, collate_pairs
from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.training.pairs import pair_logps
from tunesmith.training.stages.kto import kto_logps


def row(prompt, own, other):
    ignore = [IGNORE_INDEX] * len(prompt)
    return {"chosen_input_ids": prompt + own, "chosen_labels": ignore + own,
            "rejected_input_ids": prompt + other, "rejected_labels": ignore + other}


def test_split_passes_equal_the_packed_pair_pass(make_tiny_model):
    model = make_tiny_model("qwen2")
    model.set_attn_implementation(VARLEN_SDPA)
    rows = [row([5, 6, 7], [10, 11, 12, 13], [20, 21]), row([8, 9], [30, 31], [40, 41, 42])]
    weights = torch.tensor([0.7, -1.3])
    weight = model.model.layers[0].mlp.up_proj.weight

    split = kto_logps(model, collate_kto(rows, pad_token_id=0), chunk_size=4)
    assert not split.rejected.requires_grad  # the reference point's answers carry no graph
    (split.chosen * weights).sum().backward()
    split_grad, weight.grad = weight.grad.clone(), None

    packed = pair_logps(model, collate_pairs(rows, pad_token_id=0), chunk_size=4)
    (packed.chosen * weights).sum().backward()
    for mine, theirs in [(split.chosen, packed.chosen), (split.rejected, packed.rejected),
                         (split.chosen_len, packed.chosen_len), (split.rejected_len, packed.rejected_len)]:
        torch.testing.assert_close(mine.detach(), theirs.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(split_grad, weight.grad, atol=1e-6, rtol=1e-4)
