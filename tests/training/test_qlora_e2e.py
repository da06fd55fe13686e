"""QLoRA end to end on the tiny model: LoRA SFT on a 4-bit (and 8-bit) base learns, and its adapter is an
ordinary PEFT adapter of the unquantized base; DPO on a 4-bit base starts at ln 2 (its reference is the same
quantized base with the adapter off); keys that cannot work are refused before anything loads."""

import json
import math

import pytest
import torch

from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapters
from tunesmith.model.loading import load_model
from tunesmith.training import loop
from tunesmith.training.configure import build_config
from tunesmith.training.run import prepare_training, run_training

pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def losses(output_dir) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_sft_learns_and_saves_a_plain_peft_adapter(base_settings, tmp_path, bits):
    from peft import PeftModel

    out, full = tmp_path / "out", tmp_path / "full"
    said = []
    run_training(build_config({**base_settings, "quantization_bit": bits, "max_steps": 12, "output_dir": str(out)}),
                 say=said.append)
    run_training(build_config({**base_settings, "max_steps": 12, "output_dir": str(full)}), say=lambda *_: None)
    assert any(f"base in {bits}-bit" in line for line in said)
    quantized, reference = losses(out), losses(full)
    assert sum(quantized[-3:]) / 3 < sum(quantized[:3]) / 3 - 2  # it learns...
    assert abs(sum(quantized[-3:]) - sum(reference[-3:])) / 3 < 0.5  # ...as LoRA on the fp32 base does
    base = base_settings["model_name_or_path"]
    ids = torch.tensor([[5, 9, 17, 3, 250, 1000, 42]])
    ours = load_model(base, torch.float32, CPU).eval()
    apply_adapters(ours, [str(out)], trainable_last=False)
    peft = PeftModel.from_pretrained(load_model(base, torch.float32, CPU), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base


def test_dpo_on_a_4bit_base_uses_that_base_as_its_reference(tiny_model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pairs.json").write_text(json.dumps(preference_records(16, seed=0)))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    settings = {"model_name_or_path": tiny_model, "dataset": "pairs", "dataset_dir": str(folder), "stage": "dpo",
                "cutoff_len": 64, "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                "save_steps": 0, "quantization_bit": 4, "learning_rate": 1e-2, "output_dir": str(tmp_path / "out")}
    run = prepare_training(build_config(settings))
    metrics = loop.evaluate(run.model, run.stage, loop.RunData(train=[], eval=run.data.train[:4]), run.config.train)
    assert abs(metrics["eval_loss"] - math.log(2)) < 1e-5
    run_training(build_config(settings), say=lambda *_: None)
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "out"))


@pytest.mark.parametrize("extra,command,message", [
    ({"quantization_bit": 4, "finetuning_type": "full"}, "train", "set `finetuning_type: lora`"),
    ({"quantization_bit": 3}, "train", "must be 4 or 8"),
    ({"quantization_bit": 4, "quantization_method": "gptq"}, "train", "tunesmith quantizes with bitsandbytes"),
    ({"quantization_bit": 4, "quantization_type": "int4"}, "train", "quantization_type"),
    ({"quantization_bit": 4, "export_dir": "x"}, "export", "remove `quantization_bit`"),
    ({"quantization_bit": 4, "stage": "dpo", "adapter_name_or_path": "sft"}, "train", "cannot take a merge"),
])
def test_quantization_keys_that_cannot_work_are_refused(base_settings, extra, command, message):
    with pytest.raises(TunesmithError, match=message):
        build_config({**base_settings, **extra}, command=command)


def test_stacking_adapters_on_a_4bit_base_is_refused(base_settings, tmp_path):
    first = tmp_path / "first"
    run_training(build_config({**base_settings, "max_steps": 1, "output_dir": str(first)}), say=lambda *_: None)
    with pytest.raises(TunesmithError, match="cannot be merged into a 4/8-bit"):
        run_training(build_config({**base_settings, "quantization_bit": 4, "stage": "sft",
                                   "adapter_name_or_path": f"{first},{first}", "output_dir": str(tmp_path / "b")}),
                     say=lambda *_: None)
