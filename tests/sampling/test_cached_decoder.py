"""The hand-written decoder equals transformers' forward: same tokens, same hidden states, same log-probs,
for Llama, Qwen2 (biased q/k/v) and Mistral, padded prompts, groups, and LoRA merged or not."""

import gc
import weakref

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import TINY_SIZES
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import inject_lora, lora_modules, merged_for_inference, side_adapter
from tunesmith.model.value_head import attach_value_head
from tunesmith.sampling import cached_decoder, decode_weights
from tunesmith.sampling.generate import SamplingSettings, generate
from tunesmith.training.rollout import response_forward, response_mask

PROMPTS = [[5, 9, 17, 3], [40, 2], [7, 7, 7, 7, 7, 7, 8]]
STOP = [1]


def with_lora(model):
    inject_lora(model, "all", 4, 8)
    torch.manual_seed(1)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    return model.eval()


def transformers_generate(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(cached_decoder, "supports", lambda model, length: False)
        return generate(*args, **kwargs)


def assert_same_generation(cached, reference):
    assert cached.response_ids == reference.response_ids
    assert cached.stopped == reference.stopped
    for name in ("logps", "entropy", "hidden"):
        torch.testing.assert_close(getattr(cached, name), getattr(reference, name), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", ["none", "merged", "unmerged"])
def test_cached_decoder_equals_transformers(make_tiny_model, monkeypatch, arch, lora):
    model = make_tiny_model(arch, seed=3)
    if lora != "none":
        with_lora(model)
    assert cached_decoder.supports(model, 64)
    settings = SamplingSettings(max_new_tokens=10, temperature=1.3)
    runs = []
    for run in (generate, lambda *a, **k: transformers_generate(monkeypatch, *a, **k)):
        with merged_for_inference(model) if lora == "merged" else torch.no_grad():
            runs.append(run(model, PROMPTS, settings, STOP, 0, 2, torch.Generator().manual_seed(0), record=True))
    assert_same_generation(*runs)
    assert runs[0].logps.shape == (6, max(len(r) for r in runs[0].response_ids))


@pytest.mark.parametrize("arch,autocast", [("llama", False), ("qwen2", False), ("llama", True)])
def test_graphed_step_equals_the_eager_step(make_tiny_model, monkeypatch, arch, autocast):
    """The step a CUDA graph captures (masked attention over the whole cache buffer, keys and values
    written with index_copy_ at a tensor column) gives the eager step's tokens and statistics; on a CPU
    it runs eagerly, so this pins its maths (under mixed precision too: bf16 keys into an fp32 cache);
    the capture itself is checked on a GPU (benchmarks/bench_decode.py)."""
    model = with_lora(make_tiny_model(arch, seed=4))
    settings = SamplingSettings(max_new_tokens=10, temperature=1.3)
    graphed_steps = []
    run_graphed = cached_decoder._GraphedStep._run
    monkeypatch.setattr(cached_decoder._GraphedStep, "_run",
                        lambda self, decoder: graphed_steps.append(1) or run_graphed(self, decoder))
    runs = []
    for graphed in (False, True):
        monkeypatch.setattr(cached_decoder, "_can_graph", lambda rotary, device, graphed=graphed: graphed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            runs.append(generate(model, PROMPTS, settings, STOP, 0, 2, torch.Generator().manual_seed(0), record=True))
    assert len(graphed_steps) == settings.max_new_tokens - 1  # every step after the prefill, none eager
    assert_same_generation(*runs)


@pytest.mark.parametrize("lora", ["merged", "unmerged"])
def test_under_autocast_weights_are_cast_once_with_the_same_numbers(make_tiny_model, monkeypatch, lora):
    """Under bf16 autocast the decoder holds its projections (and generate its output head) in bf16, cast
    once, rather than letting autocast cast every weight at every step; the answers are autocast's own
    (the same bf16 products, up to the order of their fp32 sums)."""
    model = with_lora(make_tiny_model("qwen2", seed=5))  # qwen2: biased q/k/v
    settings = SamplingSettings(max_new_tokens=10, temperature=1.3)
    built = []
    real_init = cached_decoder.CachedDecoder.__init__
    monkeypatch.setattr(cached_decoder.CachedDecoder, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **k) or built.append(self))
    runs = []
    for cast in (True, False):
        with monkeypatch.context() as patch:
            if not cast:  # the weights as the model holds them: autocast casts them at every matmul
                patch.setattr(cached_decoder, "cast_projection", lambda projection, dtype: projection)
                patch.setattr(decode_weights, "cast_head", lambda head, dtype, rows=None: head)
            with merged_for_inference(model) if lora == "merged" else torch.no_grad(), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                runs.append(generate(model, PROMPTS, settings, STOP, 0, 2, torch.Generator().manual_seed(0),
                                     record=True))
    layer = built[0].layers[0]
    qkv = layer.qkv.base if lora == "unmerged" else layer.qkv
    held = [layer.o.weight, layer.gate_up.first.weight, layer.gate_up.second.weight, layer.down.weight, qkv.weight,
            qkv.bias]
    assert all(tensor.dtype == torch.bfloat16 for tensor in held)
    if lora == "unmerged":
        assert all(A.dtype == B.dtype == torch.bfloat16 for A, B, _ in layer.qkv.loras)
    assert built[1].layers[0].o.weight.dtype == torch.float32
    assert runs[0].response_ids == runs[1].response_ids
    torch.testing.assert_close(runs[0].logps, runs[1].logps, atol=2e-2, rtol=0)


def test_a_finished_decoder_is_freed_at_once(make_tiny_model, monkeypatch):
    """No reference cycle keeps a decoder (its KV cache, on a GPU its graph's memory) alive after generate."""
    monkeypatch.setattr(cached_decoder, "_can_graph", lambda rotary, device: True)
    decoders = []
    real_init = cached_decoder.CachedDecoder.__init__
    monkeypatch.setattr(cached_decoder.CachedDecoder, "__init__",
                        lambda self, *a, **k: decoders.append(weakref.ref(self)) or real_init(self, *a, **k))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # only reference counting may free it
    try:
        generate(make_tiny_model("llama"), PROMPTS, SamplingSettings(max_new_tokens=4), STOP, 0)
        assert len(decoders) == 1 and decoders[0]() is None
    finally:
        if gc_was_enabled:
            gc.enable()


def test_mistral_and_biased_projections(monkeypatch):
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**TINY_SIZES, sliding_window=None)).eval()
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**TINY_SIZES)).eval()
    with torch.no_grad():
        for _, module in qwen2.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.5)  # Qwen2 inits q/k/v biases at 0: make them count
    settings = SamplingSettings(max_new_tokens=8, do_sample=False)
    for model in (mistral, qwen2):
        assert cached_decoder.supports(model, 64)
        assert_same_generation(generate(model, PROMPTS, settings, STOP, 0, record=True),
                               transformers_generate(monkeypatch, model, PROMPTS, settings, STOP, 0, record=True))


def test_recorded_statistics_equal_the_rollout_forward(make_tiny_model):
    """PPO may take pi_old, entropy and values from the sampler instead of a second forward."""
    model = with_lora(make_tiny_model("qwen2", seed=5))
    critic = attach_value_head(model)
    settings = SamplingSettings(max_new_tokens=9, temperature=0.7)
    with torch.no_grad(), merged_for_inference(model):
        generation = generate(model, PROMPTS, settings, STOP, 0, generator=torch.Generator().manual_seed(2),
                              record=True)
    with torch.no_grad():
        prompts = [list(p) for p in PROMPTS]
        logps, entropy, values = response_forward(model, prompts, generation.response_ids, pad_id=0,
                                                  chunk_size=64, temperature=0.7, with_values=True)
        torch.testing.assert_close(generation.logps, logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(generation.entropy, entropy, atol=1e-5, rtol=1e-5)
        mask = response_mask(generation.response_ids, "cpu").bool()
        torch.testing.assert_close(critic(generation.hidden)[mask], values[mask], atol=1e-5, rtol=1e-5)


def test_unsupported_states_fall_back(make_tiny_model):
    model = with_lora(make_tiny_model("llama"))
    with side_adapter(model, "reward"):  # base + a side adapter's update (none here: the base) decodes here too
        assert cached_decoder.supports(model, 64)
    dropout = make_tiny_model("llama")
    inject_lora(dropout, "all", 4, 8, dropout=0.1)
    assert not cached_decoder.supports(dropout.train(), 64)  # LoRA dropout active: only the module knows how
    assert cached_decoder.supports(dropout.eval(), 64)
    sliding = Qwen2ForCausalLM(Qwen2Config(**TINY_SIZES, use_sliding_window=True, sliding_window=4)).eval()
    assert not cached_decoder.supports(sliding, 64)
    windowed = MistralForCausalLM(MistralConfig(**TINY_SIZES, sliding_window=8)).eval()
    assert cached_decoder.supports(windowed, 8) and not cached_decoder.supports(windowed, 9)


def test_joined_projections_with_some_adapters_equal_each_projection_alone():
    """q/k/v with unmerged adapters on some of them (a side adapter may cover only v): one joined base
    matmul and one joined A, then each B on its share, equal each projection computed by itself."""
    torch.manual_seed(0)
    hidden = 12

    def part(out, rank, biased):
        lora = None if rank is None else (torch.randn(rank, hidden), torch.randn(out, rank), 0.5)
        return decode_weights.Projection(torch.randn(out, hidden), torch.randn(out) if biased else None, lora)

    parts = [part(8, 2, True), part(4, None, False), part(4, 3, True)]
    joined = decode_weights.join_projections(parts)
    for rows in (1, 3, 20):  # few rows take the W x^T path, more the usual one
        x = torch.randn(rows, 1, hidden)
        torch.testing.assert_close(joined(x), torch.cat([p(x) for p in parts], dim=-1))


@pytest.mark.parametrize("lora", ["merged", "unmerged"])
@pytest.mark.parametrize("dtype,library", [(torch.float32, "mkl"), (torch.float32, "onednn"), (torch.bfloat16, "onednn")])
def test_packed_weights_sample_what_plain_ones_do(make_tiny_model, monkeypatch, dtype, library, lora):
    """A long enough generation decodes on weights packed for its row count (algorithms/linear.py
    `packed_linear`; unmerged LoRA packs the joined q/k/v base); the answers and their log-probs are the
    plain decoder's, up to summation order, and every packed weight is used."""
    from tunesmith.algorithms import linear

    if library == "onednn" and not linear._can_pack_onednn():
        pytest.skip("this torch build cannot pack weights for oneDNN")
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bfloat16 kernels on this CPU")
    if library == "mkl" and not linear._can_pack_mkl():
        pytest.skip("no MKL packed GEMM in this torch build")
    monkeypatch.setattr(linear, "float32_packing", lambda: library)
    monkeypatch.setattr(linear, "PACK_MIN_WEIGHT", 1)  # a tiny model's weights are below it
    monkeypatch.setenv("TUNESMITH_PACK", "auto")
    model = with_lora(make_tiny_model("qwen2", seed=3))
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0)
    packs, calls, runs = [], [], []
    real_init, real_call = linear.PackedLinear.__init__, linear.PackedLinear.__call__
    monkeypatch.setattr(linear.PackedLinear, "__init__", lambda self, *a: real_init(self, *a) or packs.append(self))
    monkeypatch.setattr(linear.PackedLinear, "__call__", lambda self, x: calls.append(self) or real_call(self, x))
    for pack_from in (16, 10**6):
        monkeypatch.setattr("tunesmith.sampling.generate.PACK_FROM_TOKENS", pack_from)
        with merged_for_inference(model) if lora == "merged" else torch.no_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            runs.append(generate(model, PROMPTS, settings, STOP, 0, 2, torch.Generator().manual_seed(0), record=True))
    assert len(packs) == 1 + 5 * len(model.model.layers)  # the head; q/k/v joined, o, gate, up, down
    # each packed weight ran at every decode step, not only in packed_linear's one check when it was made
    assert all(sum(call is pack for call in calls) >= settings.max_new_tokens - 1 for pack in packs)
    assert runs[0].response_ids == runs[1].response_ids
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(runs[0].logps, runs[1].logps, atol=tolerance, rtol=0)


def test_weights_pack_only_when_a_copy_fits_in_a_quarter_of_free_memory(make_tiny_model, monkeypatch):
    model = make_tiny_model("qwen2", seed=3)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(decode_weights, "available_memory", lambda: 4.0 * size)
    assert decode_weights.packing_fits(model)
    monkeypatch.setattr(decode_weights, "available_memory", lambda: 4.0 * size - 1)
    assert not decode_weights.packing_fits(model)
    monkeypatch.setenv("TUNESMITH_PACK", "on")
    assert decode_weights.packing_fits(model)
    monkeypatch.setenv("TUNESMITH_PACK", "off")
    monkeypatch.setattr(decode_weights, "available_memory", lambda: 1e18)
    assert not decode_weights.packing_fits(model)
    monkeypatch.setenv("TUNESMITH_PACK", "maybe")
    with pytest.raises(TunesmithError, match="TUNESMITH_PACK='maybe'.*on, off or auto"):
        decode_weights.packing_fits(model)


def test_available_memory_is_the_least_of_the_machine_and_a_container_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_weights, "_meminfo_available", lambda: 8e9)
    real_path = decode_weights.Path
    (tmp_path / "memory.max").write_text("3000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    monkeypatch.setattr(decode_weights, "Path", lambda root, name: real_path(tmp_path, name))
    assert decode_weights.available_memory() == 2e9
    (tmp_path / "memory.max").write_text("max\n")
    assert decode_weights.available_memory() == 8e9
    monkeypatch.setattr(decode_weights, "_meminfo_available", lambda: None)
    assert decode_weights.available_memory() == 0.0  # nothing known: nothing packs
