"""Offline tokenizer training and random-init model folders: round trip, ChatML, seeding, shapes."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.errors import TunesmithError
from tunesmith.model.init_model import SIZE_PRESETS, build_config, init_model
from tunesmith.model.tokenizer_build import corpus_texts, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts(), vocab_size=2048)


def test_tokenizer_round_trips_unicode_and_whitespace(tokenizer):
    text = "Héllo wörld, 日本語 · русский · 🙂🚀\n\t  two  spaces, <b>tags</b> & x² ≈ π\r\n\x00end"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_special_tokens_are_single_ids_and_pad_differs_from_eos(tokenizer):
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(token).input_ids) == 1, token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected


def test_training_is_deterministic(tokenizer):
    again = train_tokenizer(corpus_texts(), vocab_size=2048)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) == 2048


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_loads_back_and_gives_finite_logits(tmp_path, arch):
    path = init_model(tmp_path / arch, arch=arch, size="tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size >= len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_same_weights(tmp_path):
    first = load_file(init_model(tmp_path / "a", size="tiny", seed=3) / "model.safetensors")
    second = load_file(init_model(tmp_path / "b", size="tiny", seed=3) / "model.safetensors")
    other = load_file(init_model(tmp_path / "c", size="tiny", seed=4) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert all(tensor.dtype == torch.float32 for tensor in first.values())


def _meta_param_count(arch: str, size: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForCausalLM.from_config(build_config(arch, size))
    return sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once


def test_40m_preset_has_about_40m_params():
    assert 35e6 <= _meta_param_count("qwen2", "40m") <= 45e6
    assert SIZE_PRESETS["40m"]["tie_word_embeddings"]


def test_qwen2_05b_preset_matches_qwen2_05b():
    config = build_config("qwen2", "qwen2-0.5b")
    assert config.rope_parameters["rope_theta"] == 1e6
    assert 490e6 <= _meta_param_count("qwen2", "qwen2-0.5b") <= 500e6  # Qwen2-0.5B: 494M


def test_vocab_is_padded_to_the_preset(tokenizer):
    config = build_config("llama", "40m", tokenizer)
    assert config.vocab_size == 32000
    assert config.eos_token_id == tokenizer.eos_token_id


def test_unknown_arch_and_size_are_user_errors(tmp_path):
    with pytest.raises(TunesmithError, match="gpt9"):
        init_model(tmp_path / "x", arch="gpt9")
    with pytest.raises(TunesmithError, match="huge"):
        init_model(tmp_path / "y", size="huge")
