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


def test_few_row_orientation_is_timed_once_per_shape_and_row_bucket(monkeypatch):
    timed = []
    monkeypatch.setattr(fast, "_ORIENTATIONS", {})
    monkeypatch.setattr(fast, "_weight_first_timed", lambda rows, weight: timed.append(rows.shape[0]) or True)
    weight = torch.randn(48, 32)
    for count in (2, 3, 4, 7, 8, 16, 2):
        assert fast.weight_first(torch.randn(count, 32), weight)
    assert timed == [2, 4, 8, 16]  # buckets 2-3, 4-7, 8-15, 16
    fast.weight_first(torch.randn(2, 48), torch.randn(32, 48))  # another shape: timed afresh
    assert timed[-1] == 2
    assert isinstance(fast._weight_first_timed(torch.randn(3, 32), weight), bool)


@pytest.mark.parametrize("weight_first", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_few_row_linear_is_x_w_t_plus_b_in_either_orientation(monkeypatch, weight_first, rows):
    from tunesmith.algorithms import linear
    from tunesmith.model import lora

    monkeypatch.setattr(linear, "onednn_is_faster", lambda: False)
    monkeypatch.setattr(lora, "weight_first", lambda x, weight: weight_first)
    generator = torch.Generator().manual_seed(rows)
    x, weight, bias = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in
                       ((rows, 1, 96), (160, 96), (160,)))
    out = lora.few_row_linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(out.double(), x @ weight.t() + bias, rtol=1e-5, atol=1e-5)
