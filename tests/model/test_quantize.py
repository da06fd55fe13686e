"""QLoRA's base: bitsandbytes' NF4 weights are the NF4 code book applied per 64-value block (the code book
computed from its definition in the QLoRA paper), and LoRA gradients through a 4-bit base equal those through an fp32 model holding
the dequantized weights, even after an eval pass without gradients (which would repack the weights for a
kernel with no backward)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.model.loading import load_model
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.model.quantize import Quantization, is_quantized_linear

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def nf4_code_book() -> torch.Tensor:
    """QLoRA's NF4 (Dettmers et al. 2023, eq. 4 and appendix E): quantiles of N(0, 1), 8 on the positive
    side and 7 on the negative one (so that 0 is exact), with offset 0.9677083, scaled to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


NF4 = nf4_code_book()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    folder = tmp_path_factory.mktemp("q") / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def nf4_by_hand(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Each block of 64 values (row-major) scaled by its absmax, rounded to the nearest NF4 value."""
    blocks = weight.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(dim=-1)
    return (NF4[nearest] * absmax).reshape(weight.shape)


def test_nf4_weights_are_the_code_book_per_block(base):
    full = load_model(base, torch.float32, CPU)
    quantized = load_model(base, torch.float32, CPU, quantization=Quantization(4, "nf4", double=False))
    original = full.model.layers[0].mlp.down_proj.weight.detach()
    layer = quantized.model.layers[0].mlp.down_proj
    assert is_quantized_linear(layer) and not is_quantized_linear(full.model.layers[0].mlp.down_proj)
    ours, theirs = nf4_by_hand(original), dequantized(layer)
    close = torch.isclose(ours, theirs, rtol=1e-3, atol=1e-6)
    assert close.float().mean() > 0.999  # a value exactly between two codes may round either way
    assert not torch.equal(theirs, original)  # it is lossy


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    inject_lora(model, "all", 4, 8)
    for _, module in lora_modules(model):  # non-zero B, so gradients reach every layer's A
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    return model


def lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(ids, labels=ids).loss.backward()
    return {name: m.lora_A.weight.grad.clone() for name, m in lora_modules(model)}


@pytest.mark.parametrize("double", [False, True])
def test_lora_gradients_through_a_4bit_base_match_its_dequantized_weights(base, double):
    quantized = with_lora(load_model(base, torch.float32, CPU, quantization=Quantization(4, "nf4", double)))
    reference = load_model(base, torch.float32, CPU)
    with torch.no_grad():  # the fp32 model with exactly the weights the 4-bit layers compute with
        for name, module in quantized.named_modules():
            if is_quantized_linear(module):
                reference.get_submodule(name.replace(".base_layer", "")).weight.copy_(dequantized(module))
    reference = with_lora(reference)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    quantized.eval()
    with torch.no_grad():  # a reference-model pass, as DPO and PPO run one
        quantized(ids)
    ours, expected = lora_grads(quantized, ids), lora_grads(reference, ids)
    assert expected.keys() == ours.keys() and len(ours) == 14
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours["model.layers.0.self_attn.q_proj"].abs().sum() > 0


def test_merging_into_a_quantized_base_is_refused(base):
    model = with_lora(load_model(base, torch.float32, CPU, quantization=Quantization(4)))
    _, module = next(lora_modules(model))
    with pytest.raises(TunesmithError, match="cannot be merged into a 4/8-bit"):
        module.merge()
