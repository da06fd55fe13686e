"""A tiny random-init model folder and a tiny dataset, built once per test session (no network)."""

import json

import pytest

from tunesmith.model.init_model import init_model

RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "Reverse", "input": "abc", "output": "cba"},
]


@pytest.fixture
def tiny_records():
    return RECORDS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(init_model(tmp_path_factory.mktemp("model") / "tiny", arch="qwen2", size="tiny", seed=0))


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "tiny.json").write_text(json.dumps(RECORDS))
    (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return folder


@pytest.fixture
def base_settings(tiny_model, data_dir, tmp_path):
    """Settings for a short LoRA SFT run; tests override what they exercise."""
    return {
        "model_name_or_path": tiny_model, "dataset": "tiny", "dataset_dir": str(data_dir),
        "cutoff_len": 128, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "max_steps": 6, "logging_steps": 1, "save_steps": 0, "seed": 0,
        "lora_rank": 4, "lora_target": "all",
    }


REWARD_FILE = '''
def count_a(prompts, completions, references):
    return [completion.count("a") / 4 for completion in completions]
'''


@pytest.fixture
def rl_settings(base_settings, tmp_path):
    """A short PPO run rewarded by a function (the letter a), for the RL tests."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    return {**base_settings, "stage": "ppo", "reward_function": f"{tmp_path / 'reward.py'}:count_a",
            "max_new_tokens": 8, "cutoff_len": 64, "max_steps": 3, "ppo_epochs": 2, "learning_rate": 5e-3}
