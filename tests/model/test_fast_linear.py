"""model/fast_linear.py: a model's layers on oneDNN keep their weights, names, outputs and gradients."""

import copy

import pytest
import torch
from torch import nn

from tunesmith.algorithms import linear as fast
from tunesmith.model import fast_linear
from tunesmith.model.fast_linear import FastLinear, is_plain_linear, use_fast_linears


@pytest.mark.skipif(not fast._available(), reason="this torch build has no oneDNN")
def test_fast_layers_keep_the_state_dict_outputs_and_gradients(make_tiny_model, monkeypatch):
    monkeypatch.setattr(fast, "onednn_is_faster", lambda: True)
    monkeypatch.setattr(fast_linear, "onednn_is_faster", lambda: True)
    plain = make_tiny_model("qwen2")
    model = copy.deepcopy(plain)
    changed = use_fast_linears(model)
    linears = [m for m in plain.modules() if type(m) is nn.Linear]
    assert changed == len(linears) > 0
    assert all(isinstance(m, FastLinear) and is_plain_linear(m) for m in model.modules() if isinstance(m, nn.Linear))
    assert model.state_dict().keys() == plain.state_dict().keys()
    monkeypatch.setattr(fast, "MIN_WORK", 1)  # the tiny model's products are far below the real threshold
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for each in (plain, model):
        each(ids).logits.square().mean().backward()
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    for (name, mine), (_, theirs) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_nothing_changes_where_onednn_is_not_faster(make_tiny_model, monkeypatch):
    monkeypatch.setattr(fast_linear, "onednn_is_faster", lambda: False)
    model = make_tiny_model("qwen2")
    assert use_fast_linears(model) == 0
    assert not any(isinstance(m, FastLinear) for m in model.modules())
