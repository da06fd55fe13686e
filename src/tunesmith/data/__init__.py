"""Data pipeline: dataset_info.json registry -> records -> conversations -> token ids with loss masks -> packed rows.

readers.py (files -> records), registry.py (names -> files + format), formats.py (alpaca/sharegpt ->
conversations), templates.py (conversations -> per-turn token ids), encode.py (labels, truncation),
packing.py (rows and batches), dataset.py (the entry points below).
"""

from tunesmith.data.dataset import (
    build_sft_examples,
    encode_sft_examples,
    load_conversations,
    load_preference_examples,
    split_train_eval,
)
from tunesmith.data.encode import IGNORE_INDEX, encode_pair, encode_sft
from tunesmith.data.formats import PreferenceExample
from tunesmith.data.packing import collate, pack_examples
from tunesmith.data.templates import ChatTemplate, get_template

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplate",
    "PreferenceExample",
    "build_sft_examples",
    "collate",
    "encode_pair",
    "encode_sft",
    "encode_sft_examples",
    "get_template",
    "load_conversations",
    "load_preference_examples",
    "pack_examples",
    "split_train_eval",
]
