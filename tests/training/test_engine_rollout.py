"""RL rollouts on the decode scheduler equal today's: `generate`, then a forward per model over the answers
(a separate code path), to 1e-5 in fp32: the answers, pi_old, entropy, values, the reference's log-probs and
the shared-base reward model's scores."""

from pathlib import Path

import pytest
import torch

from tests.training.test_rl import _random_lora_reward_model
from tests.training.test_sample_logs import read_lines
from tunesmith.config import SamplingSettings
from tunesmith.data.templates import get_template
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.model.reward_model import RewardModel
from tunesmith.model.value_head import attach_value_head
from tunesmith.training import engine_rollout
from tunesmith.training.reference import Reference
from tunesmith.training.rewards import ModelRewards
from tunesmith.training.rollout import RolloutSettings, sample_and_score
from tunesmith.training.sample_logs import ROLLOUTS_FILE
from tunesmith.training.scoring import Scorer

PROMPTS = ["Say hello.", "Name a colour.", "Count to three.", "Describe the river in the morning light."]


class CountingSource:
    """The reward model as the scorer's source, counting the answers it scores by its own forward."""

    def __init__(self, reward_model):
        self.inner = ModelRewards(reward_model)
        self.reward_model = reward_model
        self.scored = 0

    def __call__(self, items):
        self.scored += len(items)
        return self.inner(items)


@pytest.fixture
def policy_parts(tiny_model, tmp_path):
    _random_lora_reward_model(tiny_model, tmp_path / "rm", "all")
    policy = load_model(tiny_model, torch.float32, torch.device("cpu"))
    inject_lora(policy, "all", 4, 8)
    torch.manual_seed(11)
    for _, module in lora_modules(policy):  # a policy that has moved away from its reference
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    attach_value_head(policy)
    reward_model = RewardModel.sharing_base(policy, tmp_path / "rm", tiny_model, None)
    tokenizer = load_tokenizer(tiny_model)
    template = get_template(None, tokenizer)
    rows = [{"prompt_ids": template.encode_prompt(tokenizer, [{"role": "user", "content": text}]),
             "messages": [{"role": "user", "content": text}], "reference": None} for text in PROMPTS]
    return policy, reward_model, tokenizer, rows, template.stop_token_ids(tokenizer)


@pytest.mark.parametrize("group,with_values,in_step", [(1, True, True), (3, False, True), (3, True, False)])
def test_a_rollout_on_the_engine_equals_generate_then_forwards(policy_parts, group, with_values, in_step, monkeypatch):
    """Reference and reward rows in step with the policy's (as on a GPU) or reading each answer after it (CPU)."""
    monkeypatch.setattr(engine_rollout, "in_step_pays", lambda model: in_step)
    policy, reward_model, tokenizer, rows, stop_ids = policy_parts
    sampling = SamplingSettings(max_new_tokens=12, temperature=0.9)
    seeds = list(range(100, 100 + len(rows) * group))
    results = {}
    for engine in (False, True):
        source = CountingSource(reward_model)
        scorer = Scorer(source, tokenizer, None, False, None)
        settings = RolloutSettings(sampling, tokenizer.pad_token_id, 1024, 8, engine=engine)
        results[engine] = sample_and_score(policy, rows, settings, scorer, stop_ids, group, with_values,
                                           Reference.of(policy, torch.float32), seeds), source.scored
    (before, scored_before), (after, scored_after) = results[False], results[True]
    assert after.response_ids == before.response_ids
    # A random-init model's answers often hold tokens that do not survive decode + encode (U+FFFD). In step,
    # the reward model scores those by its own forward, and its rows every other answer; a row that reads
    # after the answer reads the reward model's own encoding of its text, whatever the answer's tokens.
    assert scored_before == len(before)
    if in_step:
        assert scored_after == sum(not _encodes_as_sampled(reward_model, tokenizer, row, answer)
                                   for row, answer in zip([r for r in rows for _ in range(group)], before.response_ids))
        assert scored_after < len(before)
    else:
        assert scored_after == 0
    compared = ("mask", "old_logps", "entropy", "ref_logps", "raw_scores", "stopped")
    for name in compared + (("old_values",) if with_values else ()):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=1e-5, rtol=1e-5, msg=name)
    assert (before.old_logps - before.ref_logps).abs().max() > 1e-2  # the reference really is another model


def _encodes_as_sampled(reward_model, tokenizer, row, answer):
    text = tokenizer.decode(answer, skip_special_tokens=True)
    ids = reward_model.encode(row["messages"] + [{"role": "assistant", "content": text}])
    return ids[:len(row["prompt_ids"]) + len(answer)] == row["prompt_ids"] + answer


@pytest.mark.parametrize("stage,extra", [("ppo", {"reward_model": "rm"}), ("grpo", {"num_generations": 3})])
def test_training_with_rollout_engine_logs_what_training_without_it_logs(rl_settings, tmp_path, stage, extra):
    """The same run through the CLI's path, with and without `rollout_engine`: the same answers, scores and
    losses at every step (to float rounding), so the engine is a speed switch, not another algorithm."""
    from tunesmith.training.configure import build_config
    from tunesmith.training.run import run_training
    from tunesmith.training.tracking import read_log

    settings = {**rl_settings, "stage": stage, "per_device_train_batch_size": 2, "max_steps": 2, "ppo_epochs": 1}
    if "reward_model" in extra:
        _random_lora_reward_model(settings["model_name_or_path"], tmp_path / "rm", "all")
        settings.pop("reward_function")
        extra = {"reward_model": str(tmp_path / "rm")}
    logs = []
    for engine in (False, True):
        out = tmp_path / f"out_{engine}"
        run_training(build_config({**settings, **extra, "output_dir": str(out), "rollout_engine": engine}),
                     say=lambda *a: None)
        logs.append([{k: v for k, v in line.items() if isinstance(v, float) and not k.startswith("time/")
                      and k not in ("tokens_per_second", "step_seconds", "elapsed_time", "remaining_time")}
                     for line in read_log(out) if "score" in line])
    assert len(logs[0]) == 2 and [line.keys() for line in logs[0]] == [line.keys() for line in logs[1]]
    for before, after in zip(*logs):
        for key in before:
            assert after[key] == pytest.approx(before[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("stage,engine,epochs", [("grpo", False, 2), ("ppo", True, 1)])
def test_bf16_sampling_is_corrected_by_truncated_importance_weights(rl_settings, stage, engine, epochs):
    """rollout_dtype: bf16 samples under autocast, pi_old is the fp32 learner's forward, and each token is
    weighed by min(pi_old / pi_sampler, cap): the logs say how far the two were apart and the mean weight."""
    from tunesmith.training.configure import build_config
    from tunesmith.training.run import run_training
    from tunesmith.training.tracking import read_log

    settings = {**rl_settings, "stage": stage, "per_device_train_batch_size": 2, "max_steps": 2, "ppo_epochs": epochs,
                "rollout_engine": engine, "rollout_dtype": "bf16", "rollout_is_cap": 2.0}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "score" in line]
    assert len(lines) == 2
    for line in lines:
        assert 0 < line["rollout_is/log_ratio"] < 0.5  # bf16 rounding, not another model
        assert 0.5 < line["rollout_is/weight"] <= 2.0
    answers = read_lines(Path(settings["output_dir"]) / ROLLOUTS_FILE)  # rollouts.jsonl shows both policies
    assert len(answers) >= 4
    for answer in answers:
        pi_old, pi_sampler = torch.tensor(answer["logprobs"]), torch.tensor(answer["sampler_logprobs"])
        assert len(pi_sampler) == len(answer["token_ids"]) and not torch.equal(pi_old, pi_sampler)
        expected = (pi_old - pi_sampler).exp().clamp(max=2.0)
        assert answer["is_weights"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
    fp32 = {**settings, "output_dir": settings["output_dir"] + "_fp32", "rollout_dtype": None}
    run_training(build_config(fp32), say=lambda *a: None)
    assert not any("rollout_is/weight" in line for line in read_log(Path(fp32["output_dir"])))  # the sampler is pi_old


@pytest.mark.parametrize("engine", [False, True])
def test_grpo_takes_pi_old_from_its_update_and_learns_what_a_forward_of_its_own_gives(rl_settings, engine,
                                                                                     monkeypatch):
    """GRPO with bf16 sampling and one optimizer step per rollout takes pi_old from the update's own first
    forward (detached), as TRL does, instead of a forward over the answers: the trained adapter and the
    logged sampler gap and weights equal those of a run that runs the forward (to rounding: the rollout's
    forward runs merged weights), and the policy's forwards over the answers are one fewer per step."""
    from safetensors.torch import load_file

    from tunesmith.training import rollout
    from tunesmith.training.configure import build_config
    from tunesmith.training.run import run_training
    from tunesmith.training.stages import grpo
    from tunesmith.training.tracking import read_log

    forwards = []
    counted = rollout.chunked_response_forward
    monkeypatch.setattr(rollout, "chunked_response_forward", lambda *a, **k: forwards.append(1) or counted(*a, **k))
    settings = {**rl_settings, "stage": "grpo", "per_device_train_batch_size": 2, "max_steps": 2, "ppo_epochs": 1,
                "num_generations": 3, "rollout_engine": engine, "rollout_dtype": "bf16", "rollout_is_cap": 1.2,
                "ppo_kl_coef": 0.1}
    runs = {}
    for deferred in (True, False):
        monkeypatch.setattr(grpo, "update_sees_pi_old", lambda *_, deferred=deferred: deferred)
        forwards.clear()
        folder = f"{settings['output_dir']}_{deferred}"
        run_training(build_config({**settings, "output_dir": folder}), say=lambda *a: None)
        lines = [line for line in read_log(Path(folder)) if "score" in line]
        runs[deferred] = (load_file(Path(folder) / "adapter_model.safetensors"), lines, len(forwards))
    (weights, lines, count), (expected_weights, expected_lines, expected_count) = runs[True], runs[False]
    assert count == expected_count - 2  # the reference's forward stays; the policy's is gone, each step
    for name, tensor in expected_weights.items():
        assert torch.allclose(weights[name], tensor, rtol=1e-4, atol=1e-6), name
    for line, expected in zip(lines, expected_lines, strict=True):
        for key in ("rollout_is/log_ratio", "rollout_is/weight", "kl", "loss"):
            assert line[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        assert 0 < line["rollout_is/weight"] <= 1.2
    answers = read_lines(Path(f"{settings['output_dir']}_True") / ROLLOUTS_FILE)  # pi_old lived in the update only
    assert answers and all(a["logprobs"] is None and a["is_weights"] is None and a["sampler_logprobs"]
                           for a in answers)


def test_pi_old_comes_from_the_update_only_where_the_update_runs_pi_old(tiny_model):
    from tunesmith.training.rollout import update_sees_pi_old

    model = load_model(tiny_model, torch.float32, torch.device("cpu"))
    inject_lora(model, "all", 4, 8)
    assert update_sees_pi_old(model, ppo_epochs=1, ppo_buffer_size=1)
    assert not update_sees_pi_old(model, ppo_epochs=2, ppo_buffer_size=1)  # the second pass has moved on
    assert not update_sees_pi_old(model, ppo_epochs=1, ppo_buffer_size=2)  # so has the second mini-batch
    with_dropout = load_model(tiny_model, torch.float32, torch.device("cpu"))
    inject_lora(with_dropout, "all", 4, 8, dropout=0.1)
    assert not update_sees_pi_old(with_dropout, ppo_epochs=1, ppo_buffer_size=1)  # train mode draws its own
    model.config.attn_pdrop = 0.1  # GPT-2's name, applied functionally
    assert not update_sees_pi_old(model, ppo_epochs=1, ppo_buffer_size=1)
    model.config.attn_pdrop = 0.0
    model.config.text_config = {"router_jitter_noise": 0.01}  # a nested config's train-mode noise
    assert not update_sees_pi_old(model, ppo_epochs=1, ppo_buffer_size=1)


def test_a_bad_rollout_dtype_or_cap_is_named(rl_settings):
    from tunesmith.errors import TunesmithError
    from tunesmith.training.configure import build_config

    for key, value, message in (("rollout_dtype", "int8", "bf16 or fp16"), ("rollout_is_cap", -1.0, "positive")):
        with pytest.raises(TunesmithError, match=message):
            build_config({**rl_settings, key: value})
