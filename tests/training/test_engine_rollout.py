"""RL rollouts on the decode scheduler equal today's: `generate`, then a forward per model over the answers
(a separate code path), to 1e-5 in fp32: the answers, pi_old, entropy, values, the reference's log-probs and
the shared-base reward model's scores."""

import pytest
import torch

from tests.training.test_rl import _random_lora_reward_model
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
