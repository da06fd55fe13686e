"""LLaMA-Factory's own example YAMLs run unchanged but for model_name_or_path (and test-speed overrides).

tests/fixtures/llama_factory/ holds LLaMA-Factory's examples/train_lora/{llama3,qwen3}_lora_sft.yaml
verbatim; the data folder holds LLaMA-Factory's dataset_info.json and alpaca_en_demo.json from ../shared/reference plus
tunesmith's identity.json, as in a LLaMA-Factory checkout.
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
])
def test_llama_factory_example_runs(tmp_path, tiny_model, monkeypatch, capsys, name, hub_id, output_dir):
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference (LLaMA-Factory's demo data) is not present")
    data = tmp_path / "data"
    data.mkdir()
    for file_name in ("dataset_info.json", "alpaca_en_demo.json"):
        shutil.copy(REFERENCE / file_name, data / file_name)
    shutil.copy(REPO / "data" / "identity.json", data / "identity.json")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "example.yaml"
    config.write_text((EXAMPLES / name).read_text().replace(hub_id, tiny_model))
    # Only run length is overridden, to keep the test short; the file itself is unchanged.
    assert main(["train", str(config), "max_steps=2", "max_samples=20", "eval_steps=1", "logging_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "preprocessing_num_workers" in err and "ddp_timeout" in err
    out = tmp_path / output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in records if "loss" in r] == [1, 2]
