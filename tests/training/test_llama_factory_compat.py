"""LLaMA-Factory's own example YAMLs run unchanged but for model_name_or_path (and test-speed overrides).

tests/fixtures/llama_factory/ holds LLaMA-Factory's examples/train_lora/{llama3,qwen3}_lora_sft.yaml and
llama3_lora_{reward,dpo}.yaml verbatim; the data folder holds LLaMA-Factory's dataset_info.json,
alpaca_en_demo.json and dpo_en_demo.json from ../shared/reference plus tunesmith's identity.json, as in a
LLaMA-Factory checkout.
"""

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.cli import main

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO.parent / "shared" / "reference"
EXAMPLES = REPO / "tests" / "fixtures" / "llama_factory"


@pytest.mark.parametrize("name,hub_id,output_dir", [
    ("llama3_lora_sft.yaml", "meta-llama/Meta-Llama-3-8B-Instruct", "saves/llama3-8b/lora/sft"),
    ("qwen3_lora_sft.yaml", "Qwen/Qwen3-4B-Instruct-2507", "saves/qwen3-4b/lora/sft"),
    ("llama3_lora_reward.yaml", "meta-llama/Meta-Llama-3-8B-Instruct", "saves/llama3-8b/lora/reward"),
    ("llama3_lora_dpo.yaml", "meta-llama/Meta-Llama-3-8B-Instruct", "saves/llama3-8b/lora/dpo"),
])
def test_llama_factory_example_runs(tmp_path, tiny_model, monkeypatch, capsys, name, hub_id, output_dir):
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference (LLaMA-Factory's demo data) is not present")
    data = tmp_path / "data"
    data.mkdir()
    for file_name in ("dataset_info.json", "alpaca_en_demo.json", "dpo_en_demo.json"):
        shutil.copy(REFERENCE / file_name, data / file_name)
    shutil.copy(REPO / "data" / "identity.json", data / "identity.json")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "example.yaml"
    config.write_text((EXAMPLES / name).read_text().replace(hub_id, tiny_model))
    # Only run length (and, for pairs, their length) is overridden to keep the test short; the file is unchanged.
    shorter = ["max_steps=2", "max_samples=20", "eval_steps=1", "logging_steps=1"]
    if "sft" not in name:  # pairs of 2048-token answers: fewer and shorter ones keep the test quick
        shorter += ["gradient_accumulation_steps=2", "cutoff_len=512"]
    assert main(["train", str(config), *shorter]) == 0
    err = capsys.readouterr().err
    assert "preprocessing_num_workers" in err and "ddp_timeout" not in err  # read: the collective timeout
    out = tmp_path / output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in records if "loss" in r] == [1, 2]
    if "reward" in name:
        assert (out / "value_head.safetensors").is_file() and "accuracy" in records[-1]
    if "dpo" in name:
        assert "rewards/accuracies" in records[-1] and (out / "training_rewards_accuracies.png").is_file()
