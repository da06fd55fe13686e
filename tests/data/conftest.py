"""Fixtures for the data tests: a tiny offline BPE tokenizer with Qwen-style special tokens,
and the shared LLaMA-Factory reference folder (the dataset writer is in tests/conftest.py)."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Give three tips for staying healthy.",
    "Eat a balanced diet, exercise regularly and sleep well.",
    "You are a helpful assistant. Hello, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_tokenizer(special_tokens=CHATML_TOKENS + LLAMA3_TOKENS, chat_template=CHATML_JINJA):
    """Qwen-like: eos <|im_end|>, pad <|endoftext|> (distinct), byte fallback covers any text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if "<|begin_of_text|>" in special_tokens else None,
        extra_special_tokens=[t for t in special_tokens if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_tokenizer():
    return build_tokenizer


REFERENCE_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    """LLaMA-Factory's reference data beside the checkout (../shared/reference); skip when absent."""
    if not (REFERENCE_DIR / "dataset_info.json").is_file():
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
