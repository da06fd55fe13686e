"""End-to-end reward-model and DPO training on a tiny random model and synthetic preference pairs.

The pairs (`preference_records`) differ only in the kindness of the answer's words, so a reward model
or a DPO policy that learns anything learns that; held-out pairs are fresh word combinations.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.data.pairs import collate_pairs
from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import load_adapter
from tunesmith.model.loading import load_model
from tunesmith.model.reward_model import RewardModel
from tunesmith.training import loop
from tunesmith.training.configure import build_config
from tunesmith.training.pairs import ReferenceLogps, pair_logps
from tunesmith.training.reference import Reference
from tunesmith.training.run import prepare_training, run_training

LN2 = math.log(2)
CPU = torch.device("cpu")


def train(settings: dict) -> dict:
    return run_training(build_config(settings), say=lambda *_: None)


def log_lines(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "trainer_log.jsonl").read_text().splitlines()]


def train_records(output_dir) -> list[dict]:
    return [r for r in log_lines(output_dir) if "loss" in r]


def conversation(record: dict, answer: str) -> list[dict]:
    return [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def pref_data_dir(tmp_path_factory):
    """A dataset folder with `pairs`: 200 synthetic alpaca ranking records (read-only, shared by the module)."""
    folder = tmp_path_factory.mktemp("pref_data")
    (folder / "pairs.json").write_text(json.dumps(preference_records(200, seed=0)))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    return folder


@pytest.fixture(scope="module")
def pref_base(tiny_model, pref_data_dir) -> dict:
    """Settings shared by every preference run here; each test adds stage, output_dir and what it exercises."""
    return {
        "model_name_or_path": tiny_model, "dataset": "pairs", "dataset_dir": str(pref_data_dir),
        "cutoff_len": 64, "lora_rank": 8, "logging_steps": 10, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8, "max_steps": 60, "save_steps": 0, "seed": 0,
    }


@pytest.fixture(scope="module")
def trained_rm(pref_base, tmp_path_factory) -> tuple[Path, dict]:
    """A LoRA reward model trained 60 steps with a 20% eval split: (output_dir, returned metrics)."""
    out = tmp_path_factory.mktemp("rm") / "out"
    metrics = train({**pref_base, "stage": "rm", "val_size": 0.2, "learning_rate": 5e-3, "output_dir": str(out)})
    return out, metrics


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_dpo_step0_loss_is_ln2_when_policy_is_reference(pref_base, tmp_path, finetuning_type):
    """At step 0 the policy is the reference, so every pair's DPO loss is ln 2 and every reward is 0."""
    config = build_config({**pref_base, "stage": "dpo", "finetuning_type": finetuning_type,
                           "output_dir": str(tmp_path / "out")})
    run = prepare_training(config)
    metrics = loop.evaluate(run.model, run.stage, loop.RunData(train=[], eval=run.data.train[:4]), run.config.train)
    assert abs(metrics["eval_loss"] - LN2) < 1e-5  # a mean over the 4 pairs
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[f"eval_{key}"]) < 1e-5, key
    if run.device.type == "cpu":  # bit-identical there, so every pair is a tie, and a tie is not "accurate";
        assert metrics["eval_rewards/accuracies"] == 0  # GPU kernels leave ~1e-7 of noise that decides the sign
    # rewards are zero because the policy's log-probs equal the reference's, not because both are empty
    assert metrics["eval_logps/chosen"] < -1 and metrics["eval_logps/rejected"] < -1


def test_reward_model_learns_and_scores_held_out_pairs(trained_rm):
    """rm training separates chosen from rejected on the eval split, and the saved model does on new pairs."""
    out, metrics = trained_rm
    assert metrics["eval_accuracy"] >= 0.95
    assert json.loads((out / "all_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors",
                 "tokenizer_config.json", "train_config.yaml"):
        assert (out / name).is_file(), name
    head = load_file(str(out / "value_head.safetensors"))
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
    hidden = head["v_head.summary.weight"].shape[1]
    assert head["v_head.summary.weight"].shape == (1, hidden) and head["v_head.summary.bias"].shape == (1,)

    reward_model = RewardModel.load(out)
    assert reward_model.model.config.hidden_size == hidden
    held_out = preference_records(40, seed=1)
    chosen = reward_model.score([conversation(r, r["chosen"]) for r in held_out])
    rejected = reward_model.score([conversation(r, r["rejected"]) for r in held_out])
    assert all(math.isfinite(s) for s in chosen + rejected)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy >= 0.95


def test_dpo_learns_preferences(pref_base, tmp_path):
    """DPO starts with zero reward margins (policy == reference) and ends preferring chosen answers."""
    settings = {**pref_base, "stage": "dpo", "val_size": 0.2, "learning_rate": 1e-2, "pref_beta": 0.1,
                "plot_loss": True, "output_dir": str(tmp_path / "out")}
    config = build_config(settings)
    before = prepare_training(config)
    start = loop.evaluate(before.model, before.stage, before.data, before.config.train)
    assert abs(start["eval_rewards/margins"]) < 1e-6 and abs(start["eval_rewards/chosen"]) < 1e-6
    assert abs(start["eval_loss"] - LN2) < 1e-5
    del before

    metrics = train(settings)
    records = train_records(settings["output_dir"])
    assert records[-1]["current_steps"] == 60
    assert records[-1]["rewards/accuracies"] > 0.9
    assert metrics["eval_rewards/margins"] > 1.0
    assert metrics["eval_loss"] < LN2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert all(key in r for r in records), key
    out = Path(settings["output_dir"])
    for name in ("training_loss.png", "training_rewards_accuracies.png", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "value_head.safetensors").exists()  # a DPO policy is a plain adapter


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_precomputed_reference_gives_the_same_run(pref_base, tmp_path, finetuning_type):
    """precompute_ref_logprobs only moves the reference forwards before training: the losses are unchanged."""
    settings = {**pref_base, "stage": "dpo", "finetuning_type": finetuning_type, "max_steps": 6, "val_size": 0.2,
                "logging_steps": 1, "learning_rate": 1e-2 if finetuning_type == "lora" else 1e-3}
    default_metrics = train({**settings, "output_dir": str(tmp_path / "default")})
    precomputed_metrics = train({**settings, "output_dir": str(tmp_path / "precomputed"),
                                 "precompute_ref_logprobs": True})
    assert abs(default_metrics["eval_loss"] - precomputed_metrics["eval_loss"]) < 1e-5  # eval rows' references too
    default, precomputed = train_records(tmp_path / "default"), train_records(tmp_path / "precomputed")
    assert len(default) == len(precomputed) == 6
    assert default[-1]["loss"] < default[0]["loss"]  # the comparison is over a run that moves
    for a, b in zip(default, precomputed):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["current_steps"], a["loss"], b["loss"])
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4


@pytest.mark.parametrize("variant", [
    {"pref_loss": "ipo"},
    {"pref_loss": "hinge"},
    {"pref_loss": "simpo"},
    {"pref_loss": "orpo"},
    {"pref_loss": "sigmoid", "dpo_label_smoothing": 0.1, "pref_ftx": 0.5},
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()))
def test_preference_loss_variants_train(pref_base, tmp_path, variant):
    """Every pref_loss (and cDPO with an SFT term) trains end to end with a finite, falling loss."""
    settings = {**pref_base, "stage": "dpo", "max_steps": 10, "logging_steps": 2, "learning_rate": 1e-2,
                "output_dir": str(tmp_path / "out"), **variant}
    metrics = train(settings)
    losses = [r["loss"] for r in train_records(settings["output_dir"])]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(metrics["loss"])
    assert losses[-1] < losses[0], losses


def test_dpo_from_sft_adapter_uses_sft_model_as_reference(base_settings, pref_base, tiny_model, tmp_path):
    """With adapter_name_or_path, the reference is base + SFT adapter (not the bare base), and step 0 is ln 2."""
    sft_dir = tmp_path / "sft"
    train({**base_settings, "max_steps": 20, "output_dir": str(sft_dir)})
    config = build_config({**pref_base, "stage": "dpo", "adapter_name_or_path": str(sft_dir),
                           "output_dir": str(tmp_path / "dpo")})
    run = prepare_training(config)
    rows = run.data.train[:4]
    metrics = loop.evaluate(run.model, run.stage, loop.RunData(train=[], eval=rows), run.config.train)
    assert abs(metrics["eval_loss"] - LN2) < 1e-5
    assert abs(metrics["eval_rewards/margins"]) < 1e-5
    batch = collate_pairs(rows, run.tokenizer.pad_token_id)
    reference = ReferenceLogps(Reference.of(run.model, torch.float32), config.train.logprob_chunk_size)
    ref = reference.compute(batch)
    ref_chosen, ref_rejected = ref.chosen, ref.rejected

    sft_model = load_model(tiny_model, torch.float32, CPU)
    load_adapter(sft_model, sft_dir, trainable=False)
    bare_model = load_model(tiny_model, torch.float32, CPU)
    with torch.no_grad():
        sft = pair_logps(sft_model, batch, config.train.logprob_chunk_size)
        bare = pair_logps(bare_model, batch, config.train.logprob_chunk_size)
    torch.testing.assert_close(ref_chosen, sft.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_rejected, sft.rejected, atol=1e-4, rtol=0)
    assert (ref_chosen - bare.chosen).abs().max() > 1e-2  # the SFT adapter really changed the reference


def test_full_finetuned_reward_model_folder(pref_base, tmp_path):
    """A full rm run saves a vanilla model.safetensors (no v_head keys) plus value_head.safetensors, loadable."""
    out = tmp_path / "out"
    train({**pref_base, "stage": "rm", "finetuning_type": "full", "max_steps": 3, "learning_rate": 1e-3,
           "output_dir": str(out)})
    assert (out / "config.json").is_file() and (out / "value_head.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "v_head" in k]
    reward_model = RewardModel.load(out)
    record = preference_records(1, seed=3)[0]
    scores = reward_model.score([conversation(record, record["chosen"]), conversation(record, record["rejected"])])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_score_cli(trained_rm, tiny_model, tmp_path, capsys):
    """`tunesmith score` prints one JSON line per answer or pair, and refuses a folder that is no reward model."""
    out, _ = trained_rm
    assert main(["score", str(out), "--prompt", "Describe the river.", "--response", "The river is calm, warm."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and math.isfinite(json.loads(lines[0])["score"])

    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(preference_records(10, seed=1)))
    assert main(["score", str(out), "--dataset", str(held_out), "--dataset-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 10 and all({"chosen", "rejected"} <= set(row) for row in rows)
    assert "accuracy" in captured.err

    assert main(["score", tiny_model, "--prompt", "Hi", "--response", "Hello"]) == 2
    assert "value_head.safetensors" in capsys.readouterr().err


def test_rm_resume_restores_value_head(pref_base, tmp_path):
    """Resuming an rm run from its step-3 checkpoint ends with the uninterrupted run's value head and adapter."""
    full = {**pref_base, "stage": "rm", "max_steps": 6, "save_steps": 3, "logging_steps": 1, "learning_rate": 5e-3,
            "lora_dropout": 0.1, "output_dir": str(tmp_path / "full")}
    train(full)
    assert (tmp_path / "full" / "checkpoint-3" / "value_head.safetensors").is_file()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "all_results.json"):
        (resumed_dir / name).unlink()
    train({**full, "output_dir": str(resumed_dir), "resume_from_checkpoint": "true"})
    for name in ("value_head.safetensors", "adapter_model.safetensors"):
        expected = load_file(str(tmp_path / "full" / name))
        got = load_file(str(resumed_dir / name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    assert [r["loss"] for r in log_lines(tmp_path / "full")] == [r["loss"] for r in log_lines(resumed_dir)]
    checkpoint_scores = RewardModel.load(tmp_path / "full" / "checkpoint-3").score([conversation(
        {"instruction": "Describe the river."}, "The river is calm.")])  # a checkpoint is a reward model too
    assert math.isfinite(checkpoint_scores[0])


@pytest.mark.parametrize("overrides,needle", [
    ({"pref_loss": "sigmod"}, "sigmoid"),
    ({"pref_loss": "ipo", "dpo_label_smoothing": 0.1}, "dpo_label_smoothing"),
    ({"packing": True}, "packing"),
])
def test_preference_config_errors(pref_base, overrides, needle):
    """Impossible preference settings are refused by build_config with a message naming the fix."""
    with pytest.raises(TunesmithError, match=needle):
        build_config({**pref_base, "stage": "dpo", **overrides})


def test_dpo_on_sft_dataset_fails_before_training(base_settings, tmp_path):
    """A dpo run on a non-ranking dataset stops with a message about ranking data, before any output is written."""
    settings = {**base_settings, "stage": "dpo", "output_dir": str(tmp_path / "dpo_out")}
    with pytest.raises(TunesmithError, match="ranking"):
        train(settings)
    assert not (tmp_path / "dpo_out").exists()
