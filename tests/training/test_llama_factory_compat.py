"""LLaMA-Factory's own example YAMLs run unchanged but for model_name_or_path (and test-speed overrides).

The YAML texts are LLaMA-Factory's examples/train_lora/{llama3,qwen3}_lora_sft.yaml verbatim; the data
folder holds LLaMA-Factory's dataset_info.json and alpaca_en_demo.json from ../shared/reference plus
tunesmith's identity.json, as in a LLaMA-Factory checkout.
"""

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.cli import main

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO.parent / "shared" / "reference"

LLAMA3_LORA_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

QWEN3_LORA_SFT = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


@pytest.mark.parametrize("text,hub_id,output_dir", [
    (LLAMA3_LORA_SFT, "meta-llama/Meta-Llama-3-8B-Instruct", "saves/llama3-8b/lora/sft"),
    (QWEN3_LORA_SFT, "Qwen/Qwen3-4B-Instruct-2507", "saves/qwen3-4b/lora/sft"),
])
def test_llama_factory_example_runs(tmp_path, tiny_model, monkeypatch, capsys, text, hub_id, output_dir):
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference (LLaMA-Factory's demo data) is not present")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dataset_info.json", "alpaca_en_demo.json"):
        shutil.copy(REFERENCE / name, data / name)
    shutil.copy(REPO / "data" / "identity.json", data / "identity.json")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "example.yaml"
    config.write_text(text.replace(hub_id, tiny_model))
    # Only run length is overridden, to keep the test short; the file itself is unchanged.
    assert main(["train", str(config), "max_steps=2", "max_samples=20", "eval_steps=1", "logging_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "preprocessing_num_workers" in err and "ddp_timeout" in err
    out = tmp_path / output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in records if "loss" in r] == [1, 2]
