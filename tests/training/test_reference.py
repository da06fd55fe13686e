"""The shared reference module: which model is the reference, and the cache of its results."""

import copy
import json

import pytest
import torch

from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import inject_lora
from tunesmith.training import loop
from tunesmith.training.configure import build_config
from tunesmith.training.reference import Reference, RowCache, row_key
from tunesmith.training.run import prepare_training
from tunesmith.training.updates import Updates


def test_row_key_follows_the_tokens_only():
    a = {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2, 4]}
    assert row_key(a) == row_key(copy.deepcopy(a))
    assert row_key(a) != row_key({**a, "rejected_input_ids": [1, 2, 5]})


def test_row_cache_hits_only_when_every_row_is_known_and_refuses_misses_once_sealed():
    rows = [{"ids": [1, 2]}, {"ids": [3]}]
    cache = RowCache()
    assert cache.lookup(rows) is None
    cache.store(rows[:1], torch.tensor([[-1.0, -2.0]]))
    assert cache.lookup(rows) is None  # one row unknown: the caller computes the batch
    cache.store(rows[1:], torch.tensor([[-3.0, -4.0]], dtype=torch.bfloat16))
    torch.testing.assert_close(cache.lookup(rows), torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    cache.sealed = True
    with pytest.raises(TunesmithError, match="not precomputed"):
        cache.lookup([{"ids": [9]}])


def test_reference_is_the_policy_with_its_adapter_off(make_tiny_model):
    model = make_tiny_model("llama")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        base = model(ids).logits
    inject_lora(model, "all", rank=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # the adapter now changes the output
    model.train()
    reference = Reference.of(model, torch.float32)
    assert reference.frozen is None  # no second copy of the weights
    with reference.use() as ref_model:
        torch.testing.assert_close(ref_model(ids).logits, base)
    assert model.training  # the policy's mode is restored after the reference pass
    assert not torch.allclose(model(ids).logits, base)


def test_dpo_training_never_writes_to_the_dataset_rows(base_settings, tmp_path):
    """Reference log-probs live in the reference module's cache, not in the rows."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "pairs.json").write_text(json.dumps(preference_records(16, seed=0)))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    config = build_config({**base_settings, "stage": "dpo", "dataset": "pairs", "dataset_dir": str(folder),
                           "max_steps": 4, "per_device_train_batch_size": 4})
    run = prepare_training(config)
    before = copy.deepcopy(run.data.train)
    (tmp_path / "out").mkdir()
    loop.train(run.model, run.stage, run.data, run.config.train, run.config.output, lambda folder, state: None,
               Updates(run.model, run.config.train, run.device))
    assert run.data.train == before
