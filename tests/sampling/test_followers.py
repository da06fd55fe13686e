"""Rows that follow another row: they read its prompt and its answer as it is drawn, in the same passes,
under their own adapter, and their hidden states equal one forward of that model over the same tokens."""

import pytest
import torch

from tests.sampling.test_scheduler import GREEDY, SAMPLED, _adapter, alone, prompts, request, with_side_sets
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import lora_modules
from tunesmith.sampling.rows import RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import BASE, OWN


def forward_states(model, ids, adapter):
    """The final hidden states of one plain forward of `ids` under `adapter` (the independent reference)."""
    with torch.no_grad(), _adapter(model, adapter):
        return model.model(torch.tensor([ids])).last_hidden_state[0]


class Recorder:
    """Collects a row's read states by position."""

    def __init__(self):
        self.states = {}

    def __call__(self, states, start):
        for offset, state in enumerate(states):
            assert start + offset not in self.states  # every position is read once
            self.states[start + offset] = state

    def stacked(self):
        assert sorted(self.states) == list(range(len(self.states)))
        return torch.stack([self.states[i] for i in range(len(self.states))])


def follower(prompt, leader_settings, adapter, recorder, **fields):
    return RowRequest(prompt, leader_settings, [1], adapter=adapter, follows=0, on_prompt=recorder, **fields)


@pytest.mark.parametrize("prefill_tokens,in_step,merged", [(512, True, None), (7, True, None), (512, False, None),
                                                            (7, False, OWN), (512, True, OWN)])
def test_followers_read_the_leaders_answer_and_equal_one_forward(make_tiny_model, prefill_tokens, in_step, merged):
    """In step or after the answer, with the policy's LoRA folded into the weights (RL) or not."""
    model = with_side_sets(make_tiny_model("llama", seed=3))
    scheduler = DecodeScheduler(model, max_rows=9, prefill_tokens=prefill_tokens, merged=merged)
    groups, expected = [], []
    for index, prompt in enumerate(prompts(3, seed=4)):
        settings = SAMPLED[index] if index else GREEDY
        recorders = (Recorder(), Recorder())
        groups.append((scheduler.submit([request(prompt, settings, OWN, seed=50 + index),
                                         follower(prompt, settings, BASE, recorders[0], in_step=in_step),
                                         follower(prompt, settings, "kind", recorders[1], in_step=in_step)]),
                       prompt, recorders))
        expected.append(alone(model, prompt, settings, OWN, seed=50 + index))
    for (group, prompt, recorders), answer in zip(groups, expected):
        generation = group.result(timeout=60)
        assert generation.response_ids[0] == answer  # followers change nothing of their leader's answer
        assert generation.response_ids[1:] == [[], []]  # they draw nothing
        for recorder, adapter in zip(recorders, (BASE, "kind")):
            torch.testing.assert_close(recorder.stacked(), forward_states(model, prompt + answer, adapter),
                                       atol=1e-5, rtol=1e-4)


def test_answer_of_adds_tokens_after_the_answer_or_stops_short(make_tiny_model):
    model = with_side_sets(make_tiny_model("qwen2", seed=5))
    prompt = prompts(1, seed=6)[0]
    tail, short = Recorder(), Recorder()
    DecodeScheduler(model, max_rows=3).run([
        request(prompt, GREEDY, OWN),
        follower(prompt, GREEDY, "terse", tail, answer_of=lambda answer: answer + [5, 6, 7], extra_positions=3),
        follower(prompt, GREEDY, BASE, short, answer_of=lambda answer: answer[:-1])])
    answer = alone(model, prompt, GREEDY, OWN)
    torch.testing.assert_close(tail.stacked(), forward_states(model, prompt + answer + [5, 6, 7], "terse"),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short.stacked(), forward_states(model, prompt + answer[:-1], BASE), atol=1e-5,
                               rtol=1e-4)


def test_a_follower_whose_answer_of_does_not_extend_what_it_read_ends_diverged(make_tiny_model):
    model = with_side_sets(make_tiny_model("llama", seed=2))
    prompt = prompts(1, seed=8)[0]
    recorder = Recorder()
    group = DecodeScheduler(model, max_rows=2).submit([
        request(prompt, GREEDY, OWN),
        follower(prompt, GREEDY, BASE, recorder, answer_of=lambda answer: [3] + answer)])
    group.result(timeout=60)
    assert group.rows[1].diverged
    answer = group.rows[0].tokens
    assert len(recorder.states) == len(prompt) + len(answer) - 1  # what it read in step (all but the last token)
    longer = DecodeScheduler(model, max_rows=2).submit([
        request(prompt, GREEDY, OWN), follower(prompt, GREEDY, BASE, Recorder(), answer_of=lambda a: a + [4, 4])])
    longer.result(timeout=60)
    assert longer.rows[1].diverged  # two more positions than its extra_positions (0) reserve


def test_a_leader_sees_the_hidden_state_each_token_was_drawn_from(make_tiny_model):
    model = with_side_sets(make_tiny_model("llama", seed=9))
    prompt = prompts(1, seed=1)[0]
    hidden, logits = [], []
    DecodeScheduler(model).run([request(prompt, SAMPLED[0], OWN, seed=3, on_hidden=hidden.append,
                                        on_logits=lambda row_logits, token: logits.append(row_logits))])
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(torch.stack(hidden)), torch.stack(logits), atol=1e-5, rtol=1e-4)


def test_a_follower_must_follow_an_earlier_drawing_row(make_tiny_model):
    scheduler = DecodeScheduler(make_tiny_model("llama", seed=1))
    prompt = [5, 6, 7]
    for rows in ([request(prompt, GREEDY), RowRequest(prompt, GREEDY, [1], follows=1)],  # itself
                 [request(prompt, GREEDY), RowRequest(prompt, GREEDY, [1], follows=0),
                  RowRequest(prompt, GREEDY, [1], follows=1)]):  # a follower
        with pytest.raises(TunesmithError, match="follow an earlier row"):
            scheduler.submit(rows)


def test_rows_of_every_adapter_answer_as_alone_with_the_policy_folded_in(make_tiny_model):
    model = with_side_sets(make_tiny_model("qwen2", seed=4))
    rows = [(prompt, GREEDY, [None, "kind", BASE, OWN, "terse"][i % 5]) for i, prompt in enumerate(prompts(10, seed=3))]
    scheduler = DecodeScheduler(model, max_rows=6, prefill_tokens=20, merged=OWN)
    groups = [scheduler.submit([request(*row)]) for row in rows]
    assert [group.result(timeout=60).response_ids[0] for group in groups] == [alone(model, *row) for row in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_the_policy_folded_in_a_side_adapter_on_some_layers_and_base_rows_run_their_own_weights(
        make_tiny_model, dtype):
    """A reward LoRA may adapt fewer layers than the policy's (load_side_adapter allows it): on the others its
    rows run the base, not the folded policy. bf16 weights are not folded (round(W + BA) - BA is not W)."""
    model = with_side_sets(make_tiny_model("llama", seed=3)).to(dtype)
    for path, layer in lora_modules(model):
        if not path.endswith(("q_proj", "v_proj")):
            del layer.side["kind"]
    prompt = prompts(1, seed=4)[0]
    runs = {}
    for merged in (OWN, None):
        side, base = Recorder(), Recorder()
        DecodeScheduler(model, max_rows=3, merged=merged).run([
            request(prompt, GREEDY, OWN), follower(prompt, GREEDY, "kind", side), follower(prompt, GREEDY, BASE, base)])
        runs[merged] = side.stacked(), base.stacked()
    if dtype == torch.bfloat16:  # not folded: the same computation as without `merged`
        torch.testing.assert_close(runs[OWN], runs[None], atol=0, rtol=0)
        return
    answer = alone(model, prompt, GREEDY, OWN)
    for states, adapter in zip(runs[OWN], ("kind", BASE)):
        torch.testing.assert_close(states, forward_states(model, prompt + answer, adapter), atol=1e-5, rtol=1e-4)
