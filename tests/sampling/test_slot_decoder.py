"""The slot decoder's parts that a pass shares: RoPE from a table, joined and packed weights kept between batches."""

import pytest
import torch

from tests.sampling.test_scheduler import GREEDY, alone, prompts, request, with_side_sets
from tunesmith.algorithms import linear
from tunesmith.sampling import slot_decoder
from tunesmith.sampling.decode_weights import Projection, WeightCache
from tunesmith.sampling.generate import last_logits
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import OWN, Chunk, SlotDecoder


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}])
def test_rope_from_the_table_equals_the_models_own_module(make_tiny_model, scaling):
    model = make_tiny_model("llama", seed=1)
    if scaling is not None:  # a variant the table serves, its scaling applied by the module that made it
        model.config.rope_parameters = scaling
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    decoder = SlotDecoder(model, slots=2, capacity=50)
    hidden = torch.zeros(4, 1, model.config.hidden_size)
    where = torch.tensor([0, 17, 3, 49])
    cos, sin = decoder._rotation(hidden, where)
    expected_cos, expected_sin = model.model.rotary_emb(hidden, where[:, None])
    assert torch.equal(cos, expected_cos[:, None]) and torch.equal(sin, expected_sin[:, None])


def test_a_rope_variant_outside_the_table_answers_as_alone(make_tiny_model, monkeypatch):
    """Dynamic variants depend on more than the position: the module runs every pass."""
    model = make_tiny_model("qwen2", seed=2)
    monkeypatch.setattr(slot_decoder, "STATIC_ROPE", ())
    rows = prompts(3, seed=4)
    scheduler = DecodeScheduler(model, max_rows=4)
    answers = [g.result(timeout=60).response_ids[0] for g in [scheduler.submit([request(p, GREEDY)]) for p in rows]]
    assert answers == [alone(model, p, GREEDY) for p in rows]
    assert scheduler.decoder.rope_table is None


def test_joined_weights_are_kept_while_their_parts_stay_the_same():
    cache = WeightCache()
    first, second = torch.randn(3, 4), torch.randn(2, 4)
    joined = cache.cat([first, second])
    assert torch.equal(joined, torch.cat([first, second]))
    assert cache.cat([first, second]) is joined
    first.mul_(2)  # changed in place (an optimizer step): its version moved on
    again = cache.cat([first, second])
    assert again is not joined and torch.equal(again, torch.cat([first, second]))
    first.data = first.data * 3  # new data under the same tensor (as `module.to` swaps it), no new version
    swapped = cache.cat([first, second])
    assert swapped is not again and torch.equal(swapped, torch.cat([first, second]))
    again = swapped
    other = first.clone()  # equal values, another tensor
    assert cache.cat([other, second]) is not again
    del other
    cache.cat([second, first])  # a miss forgets the entries of freed tensors
    assert len(cache.entries) == 2


def test_a_servers_scheduler_joins_the_weights_once_and_rl_s_for_each_batch(make_tiny_model, monkeypatch):
    monkeypatch.setenv("TUNESMITH_PACK", "off")
    model = make_tiny_model("qwen2", seed=3)
    for keep, shared in ((True, True), (False, False)):
        scheduler = DecodeScheduler(model, max_rows=2, keep_finished=keep)
        scheduler.run([request(prompts(1, seed=5)[0], GREEDY)])
        before = scheduler.decoder.layers[0].gate_up.weight
        scheduler.run([request(prompts(1, seed=6)[0], GREEDY)])
        assert (scheduler.decoder.layers[0].gate_up.weight is before) == shared


needs_onednn_pack = pytest.mark.skipif(not (linear._available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
                                       reason="this torch build cannot pack weights for oneDNN")


@pytest.fixture
def packing_everything(monkeypatch):
    """Where oneDNN packs float32 every weight packs, whatever its size (tiny models' sit below the
    threshold), and the decoder packs whatever the memory."""
    monkeypatch.setattr(linear, "float32_packing", lambda: "onednn")
    monkeypatch.setattr(linear, "PACK_MIN_WEIGHT", 0)
    monkeypatch.setenv("TUNESMITH_PACK", "on")


def _two_passes(decoder, rows, adapters):
    """Final states of a pass reading every prompt, then of one decoding every row's next token."""
    chunks = [Chunk(slot, 0, ids) for slot, ids in enumerate(rows)]
    none = torch.zeros(0, dtype=torch.long)
    read = decoder.forward(none, none, chunks, adapters)
    tokens = torch.tensor([ids[-1] for ids in rows])
    positions = torch.tensor([len(ids) for ids in rows])
    return read, decoder.forward(tokens, positions, [], adapters)


@needs_onednn_pack
@pytest.mark.parametrize("merged", [None, OWN])
def test_packed_weights_compute_what_the_plain_ones_do_for_every_adapter(make_tiny_model, packing_everything, merged):
    model = with_side_sets(make_tiny_model("qwen2", seed=8))
    model.model.layers[0].self_attn.q_proj.base_layer.bias = None  # joined biases with a part that has none
    rows, adapters = prompts(4, seed=9), [None, "kind", OWN, "terse"]
    with torch.no_grad():
        plain = SlotDecoder(model, slots=4, capacity=64, merged=merged)
        packed = SlotDecoder(model, slots=4, capacity=64, merged=merged, pack=True)
        layer = packed.layers[0]
        assert layer.qkv.packed is not None and layer.qkv.weight is None  # the packed copy is the only joined one
        assert layer.o.packed is not None and layer.gate_up.packed is not None and layer.down.packed is not None
        assert isinstance(packed.head, Projection) and packed.head.packed is not None
        for ours, theirs in zip(_two_passes(packed, rows, adapters), _two_passes(plain, rows, adapters)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        hidden = torch.randn(3, model.config.hidden_size)
        torch.testing.assert_close(last_logits(packed.head, hidden), last_logits(plain.head, hidden), rtol=1e-5, atol=1e-5)


@needs_onednn_pack
def test_a_servers_scheduler_packs_the_weights_once_and_answers_as_alone(make_tiny_model, packing_everything):
    model = make_tiny_model("llama", seed=4)
    rows = prompts(3, seed=10)
    for keep, shared in ((True, True), (False, False)):
        scheduler = DecodeScheduler(model, max_rows=4, keep_finished=keep)
        first = scheduler.run([request(rows[0], GREEDY)]).response_ids[0]
        layer = scheduler.decoder.layers[0]
        before, head = (layer.gate_up.packed, layer.down.packed), scheduler.decoder.head.packed
        answers = [g.result(timeout=60).response_ids[0] for g in [scheduler.submit([request(p, GREEDY)]) for p in rows[1:]]]
        layer = scheduler.decoder.layers[0]
        assert ((layer.gate_up.packed, layer.down.packed) == before) == shared
        assert (scheduler.decoder.head.packed is head) == shared
        assert [first] + answers == [alone(model, p, GREEDY) for p in rows]


def test_the_cache_keeps_each_kind_of_weight_apart():
    cache, weight = WeightCache(), torch.randn(4, 4)
    joined = cache.cat([weight])
    made = cache.derived("packed", [weight], lambda: "packed copy")
    assert made == "packed copy" and cache.cat([weight]) is joined
    assert cache.derived("packed", [weight], lambda: pytest.fail("made again")) == "packed copy"
