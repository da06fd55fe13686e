"""Entry points the training stages call: load datasets by name, encode, split, pack.

Pipeline for SFT (split happens on samples, before packing, so eval never shares a row with train):

    examples = encode_sft_examples(load_conversations(names, dataset_dir), template, tokenizer, cutoff_len)
    train, eval = split_train_eval(examples, val_size=0.1, seed=42)
    train = pack_examples(train, cutoff_len)

`build_sft_examples` does load + encode (+ pack) in one call when no eval split is wanted.
Bad records raise a TunesmithError naming file and record index; with `skip_bad_records=True` they
are dropped and a warning reports how many (and the first reason).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.data.encode import IGNORE_INDEX, clip_messages, encode_sft, text_char_limit
from tunesmith.data.formats import CONVERTERS, PROMPT_CONVERTERS, BadRecord, to_kto_example
from tunesmith.data.packing import pack_examples
from tunesmith.data.readers import read_located, read_records
from tunesmith.data.registry import dataset_files, detect_spec, resolve_dataset
from tunesmith.data.templates import ChatTemplate, get_template
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _convert_file(path, located: list, spec, skip_bad_records: bool, prompts: bool = False, convert=None) -> list:
    convert = convert or (PROMPT_CONVERTERS[spec.formatting] if prompts else CONVERTERS[(spec.formatting, spec.ranking)])
    converted, bad = [], []
    for index, (line, record) in enumerate(located):
        try:
            converted.append(convert(record, spec))
        except BadRecord as err:
            where = f"record {index} (0-based index, line {line})"
            if not skip_bad_records:
                raise TunesmithError(
                    f"{path}: {where} of dataset '{spec.name}' ({spec.formatting}): {err}. "
                    "Fix the record, or set skip_bad_records: true to drop bad records."
                ) from err
            bad.append((where, err))
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} bad record(s) of {len(located)}; first: {bad[0][0]}: {bad[0][1]}",
            stacklevel=3,
        )
    return converted


def _kto_examples(name: str, path, located: list, spec, skip_bad_records: bool) -> list:
    """KTOExamples of a supervised dataset whose dataset_info entry maps the `kto_tag` column."""
    if spec.ranking or "kto_tag" not in spec.columns:
        raise TunesmithError(f"dataset '{name}' ({path}) has no KTO label: stage kto reads supervised records "
                             "(alpaca or sharegpt, not ranking) with a boolean column mapped as kto_tag in "
                             f'dataset_info.json, e.g. "{name}": {{"file_name": ..., "columns": {{"kto_tag": "label"}}}}.')
    return _convert_file(path, located, spec, skip_bad_records, convert=to_kto_example)


def _ranking_prompts(name: str, path, located: list, spec, skip_bad_records: bool) -> list:
    """The prompts of a preference dataset's records (conversations ending with the user turn), with a
    notice that their answers are not used."""
    warnings.warn(f"dataset '{name}' ({path}) is a preference (ranking) dataset: reinforcement learning reads only "
                  "its prompts; the chosen and rejected answers are ignored.", stacklevel=4)
    return [example.prompt_messages for example in _convert_file(path, located, spec, skip_bad_records)]


def _load(names, dataset_dir, ranking: bool, max_samples, skip_bad_records: bool, prompts: bool = False,
          kto: bool = False) -> list:
    if max_samples is not None and max_samples < 1:  # a slice [:-1] would quietly drop the last record
        raise TunesmithError(f"max_samples must be a positive number of records per dataset, got {max_samples}; "
                             "leave it unset to use every record.")
    loaded = []
    for name in [names] if isinstance(names, str) else names:
        spec = resolve_dataset(name, dataset_dir)
        items = []
        for path in dataset_files(spec):
            located = read_located(path, skip_bad_records)
            if not located:
                continue
            if spec.formatting == "auto":
                spec = detect_spec(name, spec.path, located[0][1])
            if prompts and spec.ranking:  # RL prompts may come from preference data (the book's PPO recipe)
                items += _ranking_prompts(name, path, located, spec, skip_bad_records)
                continue
            if kto:
                items += _kto_examples(name, path, located, spec, skip_bad_records)
                continue
            if spec.ranking != ranking:
                kind = (
                    "a preference (ranking) dataset" if spec.ranking else "not a preference (ranking) dataset"
                )
                use = "a preference stage (dpo, rm)" if spec.ranking else 'sft, or mark it "ranking": true'
                raise TunesmithError(f"dataset '{name}' ({path}) is {kind}; use it with {use}.")
            items += _convert_file(path, located, spec, skip_bad_records, prompts)
        if not items:
            raise TunesmithError(f"dataset '{name}' ({spec.path}) holds no usable record.")
        loaded += items[:max_samples]  # like LLaMA-Factory, max_samples applies to each dataset
    return loaded


def load_conversations(names: str | list[str], dataset_dir: str | Path, max_samples: int | None = None,
                       skip_bad_records: bool = False) -> list:
    """Conversations [{"role", "content"}, ...] ending with an assistant turn, from one or more datasets."""
    return _load(names, dataset_dir, False, max_samples, skip_bad_records)


def load_prompt_conversations(names: str | list[str], dataset_dir: str | Path, max_samples: int | None = None,
                              skip_bad_records: bool = False) -> list:
    """Conversations ending with a user turn (prompt-only records) or with an assistant turn (the record's
    own answer), from one or more SFT datasets: PPO and GRPO prompts."""
    return _load(names, dataset_dir, False, max_samples, skip_bad_records, prompts=True)


def load_kto_examples(names: str | list[str], dataset_dir: str | Path, max_samples: int | None = None,
                      skip_bad_records: bool = False) -> list:
    """KTOExample(prompt_messages, completion, desirable) from one or more datasets with a kto_tag column."""
    return _load(names, dataset_dir, False, max_samples, skip_bad_records, kto=True)


def load_preference_examples(names: str | list[str], dataset_dir: str | Path, max_samples: int | None = None,
                             skip_bad_records: bool = False) -> list:
    """PreferenceExample(prompt_messages, chosen, rejected) from one or more ranking datasets."""
    return _load(names, dataset_dir, True, max_samples, skip_bad_records)


def encode_sft_examples(
    conversations: list[list[dict]],
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[dict]:
    """encode_sft on every conversation (over-long texts cut first, see `clip_messages`), dropping those
    left without any trained token."""
    limit = text_char_limit(tokenizer, cutoff_len)
    clipped = [clip_messages(messages, limit) for messages in conversations]
    warn_clipped(sum(new is not old for new, old in zip(clipped, conversations)), limit, cutoff_len)
    examples = [
        encode_sft(messages, template, tokenizer, cutoff_len, train_on_prompt, mask_history)
        for messages in clipped
    ]
    kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
    if len(kept) < len(examples):
        warnings.warn(
            f"dropped {len(examples) - len(kept)} sample(s) with no response token left after cutoff_len={cutoff_len}",
            stacklevel=2,
        )
    return kept


def warn_clipped(count: int, limit: int, cutoff_len: int) -> None:
    """The one-line notice for records whose texts were cut to `limit` characters before tokenizing."""
    if count:
        warnings.warn(f"{count} record(s) hold a text longer than {limit} characters, far beyond cutoff_len="
                      f"{cutoff_len} tokens: cut to {limit} characters before tokenizing, then truncated as usual",
                      stacklevel=3)


def build_sft_examples(
    dataset: str | list[str],
    dataset_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
    max_samples: int | None,
    packing: bool,
    skip_bad_records: bool = False,
) -> list:
    """Load, encode and (if `packing`) pack the named datasets; returns rows for `collate`."""
    chat_template = get_template(template, tokenizer)
    conversations = load_conversations(dataset, dataset_dir, max_samples, skip_bad_records)
    examples = encode_sft_examples(
        conversations, chat_template, tokenizer, cutoff_len, train_on_prompt, mask_history
    )
    return pack_examples(examples, cutoff_len) if packing else examples


def split_train_eval(examples: list, val_size: float, seed: int) -> tuple:
    """(train, eval) after a seeded shuffle; val_size < 1 is a fraction, >= 1 a number of samples."""
    eval_count = int(round(len(examples) * val_size)) if val_size < 1 else int(val_size)
    if val_size <= 0 or not 0 < eval_count < len(examples):
        raise TunesmithError(
            f"val_size={val_size} leaves {eval_count} eval sample(s) of {len(examples)}; choose a fraction in "
            "(0, 1) or a count between 1 and the number of samples minus one."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[eval_count:]], [examples[i] for i in order[:eval_count]]


def is_ranking_dataset(name: str, dataset_dir: str | Path) -> bool:
    """Whether a dataset holds preference pairs (its dataset_info.json entry, or a plain file's first record)."""
    spec = resolve_dataset(name, dataset_dir)
    if spec.formatting != "auto":
        return spec.ranking
    for path in dataset_files(spec):
        records = read_records(path)
        if records:
            return detect_spec(name, spec.path, records[0]).ranking
    return False


def train_and_eval_rows(encode: Callable[[list[str]], list], dataset: list[str], eval_dataset: list[str] | None,
                        val_size: float, seed: int) -> tuple[list, list]:
    """Training rows, and eval rows from eval_dataset or a seeded val_size split (none without either)."""
    examples = encode(dataset)
    if eval_dataset:
        return examples, encode(eval_dataset)
    if val_size > 0:
        return split_train_eval(examples, val_size, seed)
    return examples, []
