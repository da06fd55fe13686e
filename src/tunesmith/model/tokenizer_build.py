"""Train a small byte-level BPE tokenizer offline, with Qwen2-style ChatML special tokens.

Byte-level BPE (GPT-2; Radford et al. 2019): text is first mapped to its UTF-8 bytes, each byte
to one of 256 printable symbols, and BPE merges are learned over those symbols. Because all 256
bytes are in the initial alphabet, every string is encodable and decode(encode(text)) == text.

The special tokens follow Qwen2-Instruct: eos = `<|im_end|>` (ends every chat turn, so generation
stops after the assistant's answer), pad = `<|endoftext|>` (distinct from eos), and the ChatML
`chat_template`. No default system prompt, on purpose: the template renders exactly the messages
given, which keeps the loss masks of the data module easy to check by hand.

Usage:
    tokenizer = train_tokenizer(corpus_texts(), vocab_size=2048)
    tokenizer.save_pretrained(out_dir)
"""

from collections.abc import Iterable
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Llama-3's chat markers too, so the built-in `llama3` template also runs on tiny offline models.
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, *LLAMA3_TOKENS]  # ids 0..6: trained vocabularies start with them

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_texts() -> list[str]:
    """The paragraphs of the templated English corpus shipped in `tunesmith/resources/corpus.txt`."""
    text = resources.files("tunesmith").joinpath("resources/corpus.txt").read_text(encoding="utf-8")
    return [paragraph for paragraph in text.split("\n\n") if paragraph]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges on `texts` up to `vocab_size` entries (specials included).

    Deterministic for a given corpus and size. Training stops early when no pair is left to
    merge, so a small corpus may give fewer than `vocab_size` tokens; models pad their
    embedding to their own vocab size.
    """
    # use_regex splits words, numbers and punctuation first (GPT-2's pattern), so merges never
    # cross a word boundary; add_prefix_space=False keeps decode(encode(text)) == text.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, *LLAMA3_TOKENS],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would turn " ," into "," and break the round trip
    )
