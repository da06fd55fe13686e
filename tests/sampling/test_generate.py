"""KV-cache sampling: greedy output equals transformers' generate, padding changes nothing, filters are exact."""

import torch

from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.sampling.generate import SamplingSettings, filter_logits, generate

PROMPTS = [[5, 9, 17, 3], [40, 2], [7, 7, 7, 7, 7, 7, 8]]
STOP = [1]


def test_greedy_matches_transformers_generate_and_padding_changes_nothing(make_tiny_model):
    model = make_tiny_model("qwen2")
    model.set_attn_implementation(VARLEN_SDPA)
    settings = SamplingSettings(max_new_tokens=12, do_sample=False)
    batched = generate(model, PROMPTS, settings, STOP, pad_id=0)
    for prompt, response, stopped in zip(PROMPTS, batched.response_ids, batched.stopped):
        alone = generate(model, [prompt], settings, STOP, pad_id=0)
        assert alone.response_ids == [response]
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=STOP,
                                   pad_token_id=0)[0, len(prompt):].tolist()
        cut = reference.index(1) + 1 if 1 in reference else len(reference)
        assert response == reference[:cut]
        assert stopped == (1 in reference)


def test_groups_reuse_the_prompt_and_sampling_is_seeded(make_tiny_model):
    model = make_tiny_model("llama")
    greedy = generate(model, PROMPTS[:2], SamplingSettings(max_new_tokens=6, do_sample=False), STOP, 0, num_samples=3)
    assert len(greedy.response_ids) == 6
    assert greedy.response_ids[0] == greedy.response_ids[1] == greedy.response_ids[2]
    assert greedy.response_ids[0] == generate(model, PROMPTS[:1], SamplingSettings(6, do_sample=False), STOP, 0).response_ids[0]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.5)
    first = generate(model, PROMPTS, settings, STOP, 0, 4, torch.Generator().manual_seed(3))
    again = generate(model, PROMPTS, settings, STOP, 0, 4, torch.Generator().manual_seed(3))
    assert first == again
    assert len({tuple(r) for r in first.response_ids[:4]}) > 1  # a group's samples differ
    assert all(len(r) == 8 or r[-1] in STOP for r in first.response_ids)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_k=0, top_p=0.8)) == [False, True, False, True]


def test_sampling_draws_from_the_distribution():
    from tunesmith.sampling.generate import next_tokens

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().expand(20000, 4).clone()
    tokens = next_tokens(logits, SamplingSettings(temperature=1.0), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_repetition_penalty_matches_transformers(make_tiny_model):
    model = make_tiny_model("llama", seed=2)
    settings = SamplingSettings(max_new_tokens=10, do_sample=False, repetition_penalty=1.8)
    ours = generate(model, PROMPTS, settings, STOP, 0)
    for prompt, response in zip(PROMPTS, ours.response_ids):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=STOP,
                                   pad_token_id=0, repetition_penalty=1.8)[0, len(prompt):].tolist()
        cut = reference.index(1) + 1 if 1 in reference else len(reference)
        assert response == reference[:cut]
    plain = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10, do_sample=False), STOP, 0)
    assert plain.response_ids != ours.response_ids  # the penalty changed something


def test_on_step_streams_tokens_and_ends_rows(make_tiny_model):
    model = make_tiny_model("qwen2")
    seen = []

    def on_step(tokens):
        seen.append(tokens)
        return [1] if len(seen) == 3 else None  # row 1 ends after its third token

    out = generate(model, PROMPTS, SamplingSettings(max_new_tokens=8, do_sample=False), [], 0, on_step=on_step)
    assert [len(r) for r in out.response_ids] == [8, 3, 8] and out.stopped == [False, False, False]
    assert [step[0] for step in seen] == out.response_ids[0]
    assert all(step[1] == 0 for step in seen[3:])  # padding once it ended
