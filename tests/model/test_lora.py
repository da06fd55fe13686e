"""LoRALinear maths and injection: the base is untouched at init, merge/unmerge/disable are exact, dropout
acts on the LoRA path only, and only LoRA weights train."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tunesmith.errors import TunesmithError
from tunesmith.model.lora import (
    LoRALinear,
    disable_lora,
    inject_lora,
    lora_modules,
    lora_parameters,
    merge_and_unload,
    merge_lora,
    merged_for_inference,
    unmerge_lora,
)


def make_layer(rank=4, alpha=8.0, dropout=0.0, use_rslora=False, dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True).to(dtype)
    return LoRALinear(base, rank, alpha, dropout, use_rslora)


def randomise_lora_B(model: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    for _, m in lora_modules(model):
        nn.init.normal_(m.lora_B.weight, std=0.5)


def test_zero_B_gives_the_base_output_exactly():
    layer = make_layer()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert layer.lora_A.weight.abs().sum() > 0  # A is random, B alone keeps the update at zero


def test_lora_path_is_scaling_B_A_x(gemm):
    layer = make_layer(rank=4, alpha=8.0)
    randomise_lora_B(layer)
    x = torch.randn(3, 16, requires_grad=True)
    delta = (layer.lora_B.weight @ layer.lora_A.weight) * 2.0  # alpha / r = 8 / 4
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)
    grad_out = torch.randn(3, layer.base_layer.out_features)
    out.backward(grad_out)
    # d/dB = scaling (g^T)(x A^T), d/dA = scaling (B^T g^T) x, d/dx = g (W + delta)
    low = x.detach() @ layer.lora_A.weight.detach().T
    torch.testing.assert_close(layer.lora_B.weight.grad, 2.0 * grad_out.T @ low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, 2.0 * (grad_out @ layer.lora_B.weight.detach()).T @ x.detach(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_out @ (layer.base_layer.weight + delta).detach(), atol=1e-5, rtol=1e-5)


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    assert make_layer(rank=16, alpha=8.0).scaling == 0.5
    assert make_layer(rank=16, alpha=8.0, use_rslora=True).scaling == 2.0
    assert make_layer(rank=3, alpha=6.0, use_rslora=True).scaling == pytest.approx(6.0 / math.sqrt(3))


def test_merged_equals_unmerged_and_unmerge_restores_the_base_weight():
    layer = make_layer()
    randomise_lora_B(layer)
    x = torch.randn(4, 16)
    base_weight = layer.base_layer.weight.detach().clone()
    unmerged_out = layer(x)
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, base_weight)
    torch.testing.assert_close(layer(x), unmerged_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)  # merged: base only
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged_out, atol=1e-6, rtol=0)


def test_merged_for_inference_equals_unmerged_and_leaves_the_base_untouched(make_tiny_model):
    model = make_tiny_model("qwen2")
    inject_lora(model, "all", rank=4, alpha=8)
    randomise_lora_B(model)
    ids = torch.tensor([[3, 9, 27, 81, 1]])
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(ids).logits
        with merged_for_inference(model):
            merged = model(ids).logits
            with disable_lora(model):
                base = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert torch.equal(after, unmerged)
    with torch.no_grad(), disable_lora(model):
        assert torch.equal(base, model(ids).logits)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert all(m.inference_weight is None for _, m in lora_modules(model))


def test_disabled_gives_the_base_output():
    layer = make_layer()
    randomise_lora_B(layer)
    x = torch.randn(4, 16)
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_dropout_applies_to_the_lora_path_only():
    layer = make_layer(dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout cannot touch the base output
    randomise_lora_B(layer)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)  # replay the same mask by hand on the LoRA input
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(F.dropout(x, 0.5, training=True))) * 2.0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * 2.0)


def test_no_dropout_module_when_p_is_zero():
    assert isinstance(make_layer(dropout=0.0).lora_dropout, nn.Identity)


def test_bf16_base_keeps_fp32_lora_weights_and_returns_bf16():
    layer = make_layer(dtype=torch.bfloat16)
    randomise_lora_B(layer)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    lora = layer.lora_B(layer.lora_A(x.float())) * layer.scaling
    torch.testing.assert_close(out.float(), layer.base_layer(x).float() + lora, atol=5e-2, rtol=1e-2)


def test_inject_targets_by_last_name_and_freezes_the_base(make_tiny_model):
    model = make_tiny_model()
    names = inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()


def test_injected_model_starts_equal_to_the_base(make_tiny_model):
    input_ids = torch.randint(0, 128, (2, 7))
    expected = make_tiny_model()(input_ids).logits
    model = make_tiny_model()
    inject_lora(model, "all", rank=4, alpha=8)
    torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)


def test_injecting_into_an_eval_model_adds_no_dropout(make_tiny_model):
    model = make_tiny_model()  # eval mode
    inject_lora(model, "all", rank=4, alpha=8, dropout=0.5)
    assert not any(m.training for m in model.modules())
    randomise_lora_B(model)
    input_ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(model(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_all_excludes_the_output_head(make_tiny_model):
    model = make_tiny_model()
    names = inject_lora(model, "all", rank=2, alpha=4)
    assert "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers


class TwoHeadModel(nn.Module):
    """A body and two heads: one found only through get_output_embeddings, one only by its name."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.unembed = nn.Linear(4, 8)
        self.score = nn.Linear(4, 1)

    def get_output_embeddings(self):
        return self.unembed


def test_all_excludes_output_embeddings_and_named_heads():
    assert inject_lora(TwoHeadModel(), "all", rank=2, alpha=4) == ["body"]


def test_no_target_found_lists_the_linear_names(make_tiny_model):
    with pytest.raises(TunesmithError, match=r"c_attn.*gate_proj.*q_proj"):
        inject_lora(make_tiny_model(), ["c_attn"], rank=2, alpha=4)


def test_injecting_twice_is_refused(make_tiny_model):
    model = make_tiny_model()
    inject_lora(model, ["q_proj"], rank=2, alpha=4)
    with pytest.raises(TunesmithError, match="merge_and_unload"):
        inject_lora(model, ["v_proj"], rank=2, alpha=4)


def test_disable_lora_gives_the_base_model_and_restores(make_tiny_model):
    input_ids = torch.randint(0, 128, (2, 7))
    base_logits = make_tiny_model()(input_ids).logits
    model = make_tiny_model()
    inject_lora(model, "all", rank=4, alpha=8)
    randomise_lora_B(model)
    adapted_logits = model(input_ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    with disable_lora(model):
        torch.testing.assert_close(model(input_ids).logits, base_logits, atol=0, rtol=0)
    torch.testing.assert_close(model(input_ids).logits, adapted_logits, atol=0, rtol=0)


def test_model_merge_unmerge_and_unload(make_tiny_model):
    input_ids = torch.randint(0, 128, (2, 7))
    model = make_tiny_model()
    inject_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8, use_rslora=True)
    randomise_lora_B(model)
    adapted_logits = model(input_ids).logits
    merge_lora(model)
    torch.testing.assert_close(model(input_ids).logits, adapted_logits, atol=1e-5, rtol=0)
    with pytest.raises(TunesmithError, match="unmerge_lora"):
        with disable_lora(model):
            pass
    unmerge_lora(model)
    torch.testing.assert_close(model(input_ids).logits, adapted_logits, atol=1e-5, rtol=0)
    merge_and_unload(model)
    assert not list(lora_modules(model))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(input_ids).logits, adapted_logits, atol=1e-5, rtol=0)
