"""The slot decoder's parts that a pass shares: RoPE from a table, joined weights kept between batches."""

import pytest
import torch

from tests.sampling.test_scheduler import GREEDY, alone, prompts, request
from tunesmith.sampling import slot_decoder
from tunesmith.sampling.decode_weights import JoinCache
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import SlotDecoder


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
    cache = JoinCache()
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


def test_a_servers_scheduler_joins_the_weights_once_and_rl_s_for_each_batch(make_tiny_model):
    model = make_tiny_model("qwen2", seed=3)
    for keep, shared in ((True, True), (False, False)):
        scheduler = DecodeScheduler(model, max_rows=2, keep_finished=keep)
        scheduler.run([request(prompts(1, seed=5)[0], GREEDY)])
        before = scheduler.decoder.layers[0].gate_up.weight
        scheduler.run([request(prompts(1, seed=6)[0], GREEDY)])
        assert (scheduler.decoder.layers[0].gate_up.weight is before) == shared
