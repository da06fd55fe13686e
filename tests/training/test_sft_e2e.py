"""End-to-end SFT on a tiny random model: it learns, resumes bit for bit, saves atomically, reports errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.demos.sft_demo import greedy_answers
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import load_adapter
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.training import checkpoint
from tunesmith.training.configure import build_config
from tunesmith.training.run import run_training


def train(settings: dict) -> dict:
    return run_training(build_config(settings), say=lambda *_: None)


def log_lines(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("finetuning_type,lr,steps", [("lora", 1e-2, 100), ("full", 3e-3, 80)])
def test_sft_overfits_and_reproduces_targets(base_settings, tiny_records, finetuning_type, lr, steps):
    settings = {**base_settings, "finetuning_type": finetuning_type, "learning_rate": lr, "max_steps": steps,
                "per_device_train_batch_size": 4, "lora_rank": 16, "lr_scheduler_type": "constant",
                "logging_steps": 10}
    metrics = train(settings)
    assert metrics["loss"] < 0.05
    out = Path(settings["output_dir"])
    tokenizer = load_tokenizer(str(out))
    if finetuning_type == "lora":
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        model = load_model(settings["model_name_or_path"], torch.float32, torch.device("cpu"))
        load_adapter(model, out, trainable=False)
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        model = load_model(str(out), torch.float32, torch.device("cpu"))
    for record in tiny_records[:3]:
        assert greedy_answers(model, tokenizer, [record["instruction"]]) == [record["output"]]


def test_resume_equals_uninterrupted_run(base_settings, tmp_path):
    """Resuming from the step-3 checkpoint of a 6-step run reproduces the run's end bit for bit."""
    full = {**base_settings, "output_dir": str(tmp_path / "full"), "save_steps": 3, "lora_dropout": 0.1}
    train(full)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)  # what a run killed after its step-3 save leaves...
    for name in ("adapter_model.safetensors", "adapter_config.json", "all_results.json"):
        (resumed_dir / name).unlink()  # ...has no final outputs
    train({**full, "output_dir": str(resumed_dir), "resume_from_checkpoint": "true"})
    expected = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [r["loss"] for r in log_lines(tmp_path / "full")] == [r["loss"] for r in log_lines(resumed_dir)]
    assert len(log_lines(resumed_dir)) == 6


def test_interrupted_save_leaves_no_complete_looking_checkpoint(tmp_path):
    def write_then_die(folder):
        (folder / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 5, write_then_die, keep=None)
    assert not (tmp_path / "checkpoint-5").exists()
    assert checkpoint.list_checkpoints(tmp_path) == []
    checkpoint.save_checkpoint(tmp_path, 6, lambda folder: (folder / "x").write_text("1"), keep=None)
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-6"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # the leftover was cleaned up


def test_save_total_limit_keeps_newest(base_settings):
    train({**base_settings, "save_steps": 1, "save_total_limit": 2})
    names = [p.name for p in checkpoint.list_checkpoints(Path(base_settings["output_dir"]))]
    assert names == ["checkpoint-4", "checkpoint-5"]


def test_cli_train_writes_outputs_and_plot(base_settings, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**base_settings, "plot_loss": True, "preprocessing_num_workers": 4}))
    assert main(["train", str(config), "max_steps=3", "val_size=1"]) == 0
    out = Path(base_settings["output_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "trainer_log.jsonl",
                 "training_loss.png", "tokenizer_config.json", "all_results.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_steps"] == 3
    records = log_lines(out)
    assert [r["current_steps"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in records)
    assert "preprocessing_num_workers" in capsys.readouterr().err


def test_cli_reports_user_errors_without_traceback(base_settings, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**base_settings, "lora_rnak": 4}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lora_rnak" in err and "Did you mean `lora_rank`" in err and "Traceback" not in err
    Path(base_settings["output_dir"]).mkdir()
    (Path(base_settings["output_dir"]) / "junk").write_text("x")
    config.write_text(yaml.safe_dump(base_settings))
    assert main(["train", str(config)]) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err


def test_freeze_trains_only_last_layers(base_settings):
    settings = {**base_settings, "finetuning_type": "freeze", "freeze_trainable_layers": 1, "max_steps": 2}
    base = load_file(str(Path(base_settings["model_name_or_path"]) / "model.safetensors"))
    train(settings)
    tuned = load_file(str(Path(settings["output_dir"]) / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k].to(base[k].dtype))}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_stacked_adapters_resume_the_last(base_settings, tmp_path):
    first = {**base_settings, "output_dir": str(tmp_path / "a1"), "max_steps": 2}
    train(first)
    second = {**base_settings, "output_dir": str(tmp_path / "a2"), "max_steps": 2, "adapter_name_or_path": first["output_dir"]}
    train(second)
    a1 = load_file(str(tmp_path / "a1" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and any(not torch.equal(a1[k], a2[k]) for k in a1)


def test_eval_strategy_epoch_evaluates_once_per_epoch(base_settings):
    # 4 records, val_size 1 -> 3 train rows, batch 2 -> 2 micro-batches per epoch; 6 steps = 3 epochs.
    train({**base_settings, "val_size": 1, "eval_strategy": "epoch", "max_steps": 6})
    eval_steps = [r["current_steps"] for r in log_lines(base_settings["output_dir"]) if "eval_loss" in r]
    assert eval_steps == [2, 4, 6]


def test_epochs_are_exact_when_accumulation_does_not_divide_them(base_settings, tmp_path):
    # 4 rows, batch 1 -> 4 micro-batches per epoch; accumulation 3 -> steps of 3 + 1 micro-batches.
    settings = {**base_settings, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3,
                "max_steps": -1, "num_train_epochs": 2}
    train(settings)
    records = log_lines(settings["output_dir"])
    assert [r["epoch"] for r in records] == [0.75, 1.0, 1.75, 2.0]


def test_fresh_run_in_reused_folder_drops_stale_checkpoints(base_settings):
    out = Path(base_settings["output_dir"])
    (out / "checkpoint-99").mkdir(parents=True)
    train({**base_settings, "overwrite_output_dir": True, "save_steps": 2, "save_total_limit": 1})
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4"]


def test_report_to_tensorboard(base_settings):
    settings = {**base_settings, "report_to": "tensorboard", "max_steps": 2}
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(TunesmithError, match="pip install tensorboard"):
            train(settings)
        return
    train(settings)
    assert list((Path(settings["output_dir"]) / "runs").glob("events.out.tfevents.*"))


def test_bad_record_stops_the_run_or_is_skipped(base_settings, data_dir, tmp_path, capsys):
    records = json.loads((data_dir / "tiny.json").read_text()) + [{"instruction": "No answer here."}]
    (data_dir / "tiny.json").write_text(json.dumps(records))
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_settings))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tiny.json" in err and "4" in err and "Traceback" not in err
    assert main(["train", str(config), "skip_bad_records=true", "max_steps=1"]) == 0
    assert "skipped 1" in capsys.readouterr().err.lower()


def test_lora_sft_on_a_real_pretrained_llama(tmp_path):
    """stories260K (a real TinyStories Llama, sentencepiece, no chat template) with the `default` template."""
    model = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K_hf"
    if not model.is_dir():
        pytest.skip("../shared/assets/stories260K_hf is not present")
    repo_data = Path(__file__).resolve().parents[2] / "data"
    settings = {"model_name_or_path": str(model), "dataset": "identity", "dataset_dir": str(repo_data),
                "template": "default", "lora_target": "q_proj,v_proj", "cutoff_len": 128, "max_steps": 30,
                "logging_steps": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                "output_dir": str(tmp_path / "out"), "seed": 0}
    train(settings)
    losses = [r["loss"] for r in log_lines(tmp_path / "out")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == str(model)


def test_a_resume_multiplies_with_the_gemm_its_checkpoint_recorded(base_settings, tmp_path, monkeypatch):
    """Not with its own timing's choice, which on a machine near the threshold may differ from the run's."""
    from tunesmith.algorithms import linear

    full = {**base_settings, "output_dir": str(tmp_path / "full"), "save_steps": 3}
    train(full)
    state_file = tmp_path / "full" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["gemm"]["float32_gemm"] == ("onednn" if linear.onednn_is_faster() else "blas")
    recorded = "onednn" if linear._available() else "blas"  # what this resume must adopt
    state_file.write_text(json.dumps({**state, "gemm": {"float32_gemm": recorded}}))
    monkeypatch.delenv(linear.GEMM_VARIABLE, raising=False)
    monkeypatch.setattr(linear, "_CHOICE", [])
    monkeypatch.setattr(linear, "_timed_choice", lambda: pytest.fail("the resume timed the GEMM itself"))
    train({**full, "max_steps": 4, "resume_from_checkpoint": str(tmp_path / "full" / "checkpoint-3")})
    assert linear.onednn_is_faster() is (recorded == "onednn")
