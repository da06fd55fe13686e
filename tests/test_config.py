"""Config loading: LLaMA-Factory keys, overrides, types, typos, ignored keys, impossible combinations."""

from pathlib import Path

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.training.configure import build_config, load_config

BASE = {"model_name_or_path": "m", "dataset": "d"}

EXAMPLE = Path(__file__).resolve().parent / "fixtures" / "llama_factory" / "qwen3_lora_sft.yaml"


def test_llama_factory_example_loads_with_notices(tmp_path):
    path = tmp_path / "qwen3_lora_sft.yaml"
    path.write_text(EXAMPLE.read_text())
    notices = []
    config = load_config(path, [], notices)
    assert config.data.dataset == ["identity"] and config.data.template == "qwen3_nothink" and config.model.trust_remote_code
    assert config.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1.0e-4 as a float, 1e-4 as text
    assert config.adapter.lora_alpha == 16 and config.adapter.lora_target == ["all"]
    assert config.train.num_train_epochs == 3.0 and config.output.resume_from_checkpoint is None
    assert config.distributed.ddp_timeout == 180000000
    ignored = {"preprocessing_num_workers", "dataloader_num_workers", "save_only_model"}
    assert len(notices) == len(ignored)
    assert all(any(f"`{key}`" in n for n in notices) for key in ignored)
    assert "line 17" in next(n for n in notices if "preprocessing_num_workers" in n)


def test_overrides_win_and_parse_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nlearning_rate: 1.0e-3\n")
    config = load_config(path, ["learning_rate=1e-4", "max_steps=7", "packing=true", "lora_target=q_proj,v_proj"])
    assert config.train.learning_rate == pytest.approx(1e-4) and config.train.max_steps == 7 and config.data.packing is True
    assert config.adapter.lora_target == ["q_proj", "v_proj"]


def test_typo_suggests_closest_key_with_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nlerning_rate: 1.0e-3\n")
    with pytest.raises(TunesmithError, match=r"line 3.*`lerning_rate`.*Did you mean `learning_rate`"):
        load_config(path)


@pytest.mark.parametrize("key,value,pattern", [
    ("lora_rank", "eight", "`lora_rank` must be an integer"),
    ("lora_rank", 2.5, "`lora_rank` must be an integer"),
    ("bf16", "yes please", "`bf16` must be true or false"),
    ("learning_rate", [1], "`learning_rate` must be a number"),
    ("stage", "sfft", "Did you mean `sft`"),
    ("lr_scheduler_type", "cosin", "Did you mean `cosine`"),
    ("max_steps", "inf", "`max_steps` must be an integer"),
    ("max_steps", "1e-1", "`max_steps` must be an integer"),
    ("num_train_epochs", float("inf"), "`num_train_epochs` must be a number"),
    ("learning_rate", float("nan"), "`learning_rate` must be a number"),
])
def test_wrong_types_and_choices_name_the_key(key, value, pattern):
    with pytest.raises(TunesmithError, match=pattern):
        build_config({**BASE, key: value})


@pytest.mark.parametrize("extra,pattern", [
    ({"bf16": True, "fp16": True}, "both true"),
    ({"val_size": 0.1, "eval_dataset": "x"}, "either `val_size` or `eval_dataset`"),
    ({"finetuning_type": "full", "adapter_name_or_path": "a"}, "needs `finetuning_type: lora`"),
    ({"max_steps": -1, "num_train_epochs": 0}, "max_steps"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"do_eval": True}, "`do_eval: true` needs an eval split"),
    ({"eval_strategy": "steps"}, "`eval_strategy: steps` needs an eval split"),
    ({"do_train": False}, "`do_train: false`"),
    ({"eval_steps": 0}, "`eval_steps` must be at least 1"),
    ({"per_device_eval_batch_size": 0}, "`per_device_eval_batch_size` must be at least 1"),
])
def test_impossible_combinations(extra, pattern):
    with pytest.raises(TunesmithError, match=pattern):
        build_config({**BASE, **extra})


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(TunesmithError, match="model_name_or_path` is required"):
        build_config({"dataset": "d"})
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: m\ndataset: [d\n")
    with pytest.raises(TunesmithError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(TunesmithError, match="key=value"):
        load_config(None, ["learning_rate"])


def test_llama_factory_ref_model_says_what_the_reference_is():
    with pytest.raises(TunesmithError, match="reference is always the model the run starts from"):
        build_config({"model_name_or_path": "m", "dataset": "d", "stage": "dpo", "ref_model": "other"})
