"""rollouts.jsonl (ppo, grpo) and pairs.jsonl (dpo, kto): what a board reads, checked against trainer_log.jsonl
and against numbers computed here independently; resume truncation, the off switch and the key's check."""

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.model.loading import load_tokenizer
from tunesmith.training.configure import build_config
from tunesmith.training.rl import build_prompt_rows
from tunesmith.training.run import run_training
from tunesmith.training.sample_logs import (
    PAIRS_FILE,
    ROLLOUTS_FILE,
    append_lines,
    reset_sample_logs,
    token_texts,
)
from tunesmith.training.tracking import read_log

REWARD_FILE = "def count_a(completions):\n    return [completion.count('a') / 4 for completion in completions]\n"
TOKEN_LISTS = ("logprobs", "ref_logprobs", "kl", "values", "advantages")


@pytest.fixture
def rl_settings(base_settings, tmp_path):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    return {**base_settings, "stage": "grpo", "reward_function": f"{tmp_path / 'reward.py'}:count_a",
            "max_new_tokens": 8, "cutoff_len": 64, "max_steps": 3, "ppo_epochs": 2, "learning_rate": 5e-3,
            "per_device_train_batch_size": 2}


@pytest.fixture
def pair_settings(tiny_model, tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(preference_records(16, seed=0)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    return {"model_name_or_path": tiny_model, "stage": "dpo", "dataset": "pairs", "dataset_dir": str(tmp_path),
            "cutoff_len": 64, "lora_rank": 8, "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
            "learning_rate": 1e-2, "pref_beta": 0.1, "save_steps": 0, "seed": 0, "output_dir": str(tmp_path / "out")}


def train(settings: dict) -> Path:
    run_training(build_config(settings), say=lambda *_: None)
    return Path(settings["output_dir"])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_step(lines: list[dict]) -> dict[int, list[dict]]:
    steps = defaultdict(list)
    for line in lines:
        steps[line["step"]].append(line)
    return dict(steps)


def train_steps(output_dir: Path) -> list[int]:
    return [record["current_steps"] for record in read_log(output_dir) if "loss" in record]


def check_rollout_line(line: dict, tokenizer) -> None:
    """Token lists as long as the answer, and token texts that concatenate to it."""
    n = len(line["token_ids"])
    assert n > 0 and len(line["tokens"]) == n
    assert all(line[key] is None or len(line[key]) == n for key in TOKEN_LISTS)
    assert "".join(line["tokens"]) == tokenizer.decode(line["token_ids"], skip_special_tokens=False)
    assert isinstance(line["reward"], float) and isinstance(line["truncated"], bool)


def test_grpo_logs_each_steps_first_group_with_the_stages_own_numbers(rl_settings, tiny_model):
    settings = {**rl_settings, "num_generations": 3}  # log_rollouts_steps unset: follows logging_steps (1)
    out = train(settings)
    steps = by_step(read_lines(out / ROLLOUTS_FILE))
    assert sorted(steps) == train_steps(out) == [1, 2, 3]
    tokenizer = load_tokenizer(tiny_model)
    for lines in steps.values():
        assert [line["sample"] for line in lines] == [0, 1, 2] and {line["group"] for line in lines} == {0}
        assert len({line["prompt"] for line in lines}) == 1 and "rewards" not in lines[0]
        rewards = torch.tensor([line["reward"] for line in lines], dtype=torch.float64)
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # scale_rewards: group, eps 1e-4
        for line, advantage in zip(lines, expected.tolist()):
            check_rollout_line(line, tokenizer)
            assert line["values"] is None and line["trained"]
            assert line["advantages"] == pytest.approx([advantage] * len(line["token_ids"]), abs=1e-5)
            log_ratio = torch.tensor(line["ref_logprobs"]) - torch.tensor(line["logprobs"])
            assert line["kl"] == pytest.approx((torch.expm1(log_ratio) - log_ratio).tolist(), abs=1e-6)  # k3
    assert any(line["advantages"][0] != 0 for lines in steps.values() for line in lines)  # some group differed
    check_against_the_starting_model(steps[1], build_config(settings), tiny_model, tokenizer)


def check_against_the_starting_model(lines: list[dict], config, tiny_model: str, tokenizer) -> None:
    """Step 1 samples from a fresh adapter (B = 0): the policy and the reference are the base model, so both
    logged log-probs equal a plain transformers forward at the sampling temperature."""
    rows = build_prompt_rows(config.data.dataset, config.data, config.sampling.max_new_tokens, tokenizer)
    prompts = {tokenizer.decode(row["prompt_ids"], skip_special_tokens=False): row["prompt_ids"] for row in rows}
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for line in lines:
        prompt, answer = prompts[line["prompt"]], line["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits / config.sampling.temperature, -1).gather(1, torch.tensor(answer)[:, None])
        assert line["logprobs"] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)
        assert line["ref_logprobs"] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)


def test_ppo_logs_its_first_two_answers_with_values_kl_and_whitened_advantages(rl_settings, tiny_model):
    settings = {**rl_settings, "stage": "ppo", "log_rollouts_steps": 1, "logging_steps": 2}
    out = train(settings)
    steps = by_step(read_lines(out / ROLLOUTS_FILE))
    assert sorted(steps) == [1, 2, 3] and train_steps(out) == [2, 3]  # its own cadence; both log the last step
    tokenizer = load_tokenizer(tiny_model)
    for lines in steps.values():
        assert [(line["sample"], line["group"]) for line in lines] == [(0, 0), (1, 1)]
        for line in lines:
            check_rollout_line(line, tokenizer)
            kl = (torch.tensor(line["logprobs"], dtype=torch.float64) - torch.tensor(line["ref_logprobs"])).tolist()
            assert line["kl"] == pytest.approx(kl, abs=1e-6)  # k1, ppo's default estimator
            assert all(math.isfinite(value) for value in line["values"])
        # the two answers are the step's whole rollout here: advantages are whitened over their tokens
        advantages = torch.tensor([a for line in lines for a in line["advantages"]], dtype=torch.float64)
        assert abs(advantages.mean()) < 1e-5 and advantages.var(unbiased=False) == pytest.approx(1, abs=1e-4)


def test_ppo_with_a_group_logs_the_first_group(rl_settings):
    out = train({**rl_settings, "stage": "ppo", "advantage_estimator": "rloo", "num_generations": 3, "max_steps": 1})
    lines = read_lines(out / ROLLOUTS_FILE)
    assert [(line["step"], line["sample"], line["group"]) for line in lines] == [(1, 0, 0), (1, 1, 0), (1, 2, 0)]
    assert all(line["values"] is None and line["ref_logprobs"] is not None for line in lines)


def test_dpo_logs_four_fixed_pairs_whose_rewards_are_beta_times_the_summed_log_ratio(pair_settings, tiny_model):
    out = train({**pair_settings, "log_rollouts_steps": 2})
    steps = by_step(read_lines(out / PAIRS_FILE))
    assert sorted(steps) == [0, 2, 3]  # before training, every 2 steps, and the last
    tokenizer = load_tokenizer(tiny_model)
    assert len({tuple(line["prompt"] for line in lines) for lines in steps.values()}) == 1  # the same rows
    for step, lines in steps.items():
        assert [line["pair"] for line in lines] == [0, 1, 2, 3]
        for line in lines:
            for side in ("chosen", "rejected"):
                ids, ratio = line[f"{side}_token_ids"], line[f"{side}_logratio"]
                assert len(line[f"{side}_tokens"]) == len(ids) == len(ratio) == len(line[f"{side}_logps"])
                assert "".join(line[f"{side}_tokens"]) == tokenizer.decode(ids, skip_special_tokens=False)
                assert ratio == pytest.approx([p - r for p, r in zip(line[f"{side}_logps"], line[f"{side}_ref_logps"])],
                                              abs=1e-6)
                assert line[f"{side}_reward"] == pytest.approx(0.1 * sum(ratio), abs=1e-5)  # float32 sums
                if step == 0:  # the policy is the reference before the first update
                    assert max(abs(value) for value in ratio) < 1e-6 and abs(line[f"{side}_reward"]) < 1e-7
    assert any(abs(value) > 1e-3 for line in steps[3] for value in line["chosen_logratio"])  # it moved


def test_a_reference_free_loss_logs_the_rewards_dpo_logs(pair_settings):
    out = train({**pair_settings, "pref_loss": "simpo", "max_steps": 1})
    for line in read_lines(out / PAIRS_FILE):
        assert line["chosen_ref_logps"] is None and line["chosen_logratio"] is None
        logps = line["rejected_logps"]  # simpo's reward: beta x the policy's mean log-prob
        assert line["rejected_reward"] == pytest.approx(0.1 * sum(logps) / len(logps), abs=1e-6)


def test_kto_logs_each_answer_with_its_label(pair_settings, tmp_path):
    records = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": answer}],
                "label": label} for r in preference_records(8, seed=0) for answer, label in ((r["chosen"], True),
                                                                                            (r["rejected"], False))]
    (tmp_path / "kto.json").write_text(json.dumps(records))
    info = {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto": info}))
    out = train({**pair_settings, "stage": "kto", "dataset": "kto", "max_steps": 2})
    lines = read_lines(out / PAIRS_FILE)
    assert [(line["step"], line["pair"]) for line in lines] == [(s, p) for s in (0, 1, 2) for p in range(4)]
    assert {line["desirable"] for line in lines} == {True, False}
    for line in lines:
        assert not any(key.startswith("rejected") for key in line)
        assert line["chosen_reward"] == pytest.approx(0.1 * sum(line["chosen_logratio"]), abs=1e-5)


def test_a_resumed_run_keeps_the_lines_up_to_its_checkpoint_and_writes_the_rest_again(rl_settings, tmp_path):
    settings = {**rl_settings, "num_generations": 2, "max_steps": 4, "save_steps": 2}
    full = read_lines(train(settings) / ROLLOUTS_FILE)
    resumed = {**settings, "output_dir": str(tmp_path / "resumed")}
    out = train(resumed)
    train({**resumed, "resume_from_checkpoint": str(out / "checkpoint-2")})
    assert read_lines(out / ROLLOUTS_FILE) == full  # steps 3 and 4 once each, equal to the uninterrupted run's
    train({**resumed, "overwrite_output_dir": True, "max_steps": 1})  # a fresh run in the folder starts afresh
    assert [line["step"] for line in read_lines(out / ROLLOUTS_FILE)] == [1, 1]


def test_reset_sample_logs_keeps_the_checkpoints_steps(tmp_path):
    for name in (ROLLOUTS_FILE, PAIRS_FILE):
        append_lines(tmp_path / name, [{"step": step} for step in (0, 1, 2, 3)])
        with open(tmp_path / name, "a") as handle:
            handle.write('{"step": 1, "tokens": ["cut sh')  # a line a kill cut short
    reset_sample_logs(tmp_path, 2)
    assert [line["step"] for line in read_lines(tmp_path / PAIRS_FILE)] == [0, 1, 2]
    reset_sample_logs(tmp_path, None)
    assert not (tmp_path / PAIRS_FILE).exists() and not (tmp_path / ROLLOUTS_FILE).exists()


def test_lines_are_strict_json(tmp_path):
    append_lines(tmp_path / "x.jsonl", [{"step": 1, "kl": [0.5, float("nan"), float("-inf")], "reward": float("inf")}])
    assert json.loads((tmp_path / "x.jsonl").read_text()) == {"step": 1, "kl": [0.5, None, None], "reward": None}


def test_token_texts_concatenate_to_the_text_and_keep_characters_whole(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    text = "Hello wörld, 你好 🙂!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and "".join(texts) == text
    assert "🙂" in texts and "\ufffd" not in "".join(texts)  # a character split over tokens shows whole, once


def test_log_rollouts_steps_zero_writes_nothing_and_a_negative_value_is_named(rl_settings, pair_settings, tmp_path):
    out = train({**rl_settings, "log_rollouts_steps": 0, "max_steps": 1})
    assert not (out / ROLLOUTS_FILE).exists()
    out = train({**pair_settings, "log_rollouts_steps": 0, "max_steps": 1, "output_dir": str(tmp_path / "dpo")})
    assert not (out / PAIRS_FILE).exists()
    with pytest.raises(TunesmithError, match="log_rollouts_steps: -1"):
        build_config({**rl_settings, "log_rollouts_steps": -1})
