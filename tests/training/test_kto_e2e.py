"""KTO end to end on the tiny model: it learns from unpaired labelled answers, logs TRL's metrics, reads
LLaMA-Factory's kto_en_demo format and runs its llama3_lora_kto.yaml; bad KTO data gets a clear error."""

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.training.configure import build_config
from tunesmith.training.run import run_training
from tunesmith.training.tracking import read_log

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO.parent / "shared" / "reference"
KTO_EN_DEMO = {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
               "columns": {"messages": "messages", "kto_tag": "label"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def kto_records(pairs: list[tuple[str, str, str]]) -> list[dict]:
    """kto_en_demo's shape: each pair's chosen answer labelled true, its rejected one false, unpaired."""
    records = []
    for prompt, chosen, rejected in pairs:
        for answer, label in ((chosen, True), (rejected, False)):
            records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                            "label": label})
    return records


@pytest.fixture
def kto_settings(tiny_model, tmp_path):
    pairs = [(r["instruction"], r["chosen"], r["rejected"]) for r in preference_records(100, seed=0)]
    (tmp_path / "kto.json").write_text(json.dumps(kto_records(pairs)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto_demo": {**KTO_EN_DEMO, "file_name": "kto.json"}}))
    return {"model_name_or_path": tiny_model, "stage": "kto", "dataset": "kto_demo", "dataset_dir": str(tmp_path),
            "cutoff_len": 64, "lora_rank": 8, "per_device_train_batch_size": 8, "max_steps": 40, "logging_steps": 10,
            "learning_rate": 1e-2, "pref_beta": 0.1, "val_size": 0.2, "save_steps": 0, "seed": 0,
            "output_dir": str(tmp_path / "out")}


def test_kto_learns_to_reward_desirable_answers_over_undesirable_ones(kto_settings):
    metrics = run_training(build_config(kto_settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(kto_settings["output_dir"])) if "loss" in line and "eval_loss" not in line]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"} <= set(lines[0])
    assert lines[-1]["rewards/chosen"] > 0 > lines[-1]["rewards/rejected"]
    assert metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"] > 0.5  # held-out answers too
    assert metrics["eval_loss"] < 0.5  # 1 - sigmoid(0) = 0.5 per answer where the policy is the reference
    assert (Path(kto_settings["output_dir"]) / "adapter_model.safetensors").is_file()


def test_kto_starts_at_half_when_the_policy_is_the_reference(kto_settings):
    from tunesmith.training import loop
    from tunesmith.training.run import prepare_training

    run = prepare_training(build_config(kto_settings))
    start = loop.evaluate(run.model, run.stage, run.data, run.config.train)
    assert start["eval_loss"] == pytest.approx(0.5, abs=1e-5) and start["eval_kl"] == pytest.approx(0.0, abs=1e-5)


def test_unbalanced_weights_are_warned_about(kto_settings):
    with pytest.warns(UserWarning, match="recommend 1 to 4/3"):
        run_training(build_config({**kto_settings, "kto_rejected_weight": 2.0, "max_steps": 1}), say=lambda *a: None)


@pytest.mark.parametrize("entry,records,needle", [
    ({"file_name": "bad.json"}, [{"instruction": "a", "output": "b"}], "has no KTO label"),
    ({"file_name": "bad.json", "columns": {"kto_tag": "label"}},
     [{"instruction": "a", "output": "b", "label": True}, {"instruction": "c", "output": "d", "label": "yes"}],
     r"record 1 .*must be true \(desirable answer\) or false"),
    ({"file_name": "bad.json", "columns": {"kto_tag": "label"}}, [{"instruction": "a", "output": "b", "label": True}],
     "needs at least 2 records"),
])
def test_bad_kto_data_is_named(kto_settings, tmp_path, entry, records, needle):
    (tmp_path / "bad.json").write_text(json.dumps(records))
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    (tmp_path / "dataset_info.json").write_text(json.dumps({**info, "bad": entry}))
    with pytest.raises(TunesmithError, match=needle):
        run_training(build_config({**kto_settings, "dataset": "bad", "val_size": 0}), say=lambda *a: None)


def test_llama_factory_kto_example_runs_on_its_demo_format(tmp_path, tiny_model, monkeypatch):
    """examples/train_lora/llama3_lora_kto.yaml, model changed, on a kto_en_demo.json made from
    LLaMA-Factory's dpo_en_demo.json (its own pairs, unpaired and labelled) under its own dataset_info entry."""
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference (LLaMA-Factory's demo data) is not present")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REFERENCE / "dataset_info.json", data / "dataset_info.json")
    assert json.loads((data / "dataset_info.json").read_text())["kto_en_demo"] == KTO_EN_DEMO
    pairs = [(r["conversations"][-1]["value"], r["chosen"]["value"], r["rejected"]["value"])
             for r in json.loads((REFERENCE / "dpo_en_demo.json").read_text())[:12]]
    (data / "kto_en_demo.json").write_text(json.dumps(kto_records(pairs)))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "kto.yaml"
    config.write_text((REPO / "tests/fixtures/llama_factory/llama3_lora_kto.yaml").read_text()
                      .replace("meta-llama/Meta-Llama-3-8B-Instruct", tiny_model))
    assert main(["train", str(config), "max_steps=2", "eval_steps=1", "logging_steps=1",
                 "gradient_accumulation_steps=2", "cutoff_len=256"]) == 0
    out = tmp_path / "saves/llama3-8b/lora/kto"
    assert (out / "adapter_model.safetensors").is_file()
    assert "rewards/chosen" in "".join((out / "trainer_log.jsonl").read_text().splitlines())


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_kto_trains_every_finetuning_type(kto_settings, finetuning_type):
    settings = {**kto_settings, "finetuning_type": finetuning_type, "learning_rate": 1e-4, "max_steps": 2,
                "val_size": 0, "logging_steps": 1}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "loss" in line]
    assert len(lines) == 2 and lines[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # the copy is the reference
