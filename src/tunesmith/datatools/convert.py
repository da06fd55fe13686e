"""Convert records between the training formats, and check a dataset the way training will read it.

Formats (supervised and preference records alike):
- alpaca:   {instruction, input, output, system?, history?}; ranking: chosen / rejected instead of output
- sharegpt: {conversations: [{from: human|gpt, value}], system?}; ranking: chosen / rejected {from: gpt, value}
- openai:   {messages: [{role, content}]}; ranking: OpenAI's preference fine-tuning shape
            {input: {messages}, preferred_output: [{role: assistant, content}], non_preferred_output: [...]}

Every record is read through the same parsers as training (`formats.py`), so a record that converts
also trains, and `validate` reports exactly the records training would reject, with line numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from tunesmith.data.formats import CONVERTERS, BadRecord, PreferenceExample, check_turns
from tunesmith.data.registry import (
    OPENAI_TAGS,
    DatasetSpec,
    dataset_files,
    detect_spec,
    make_spec,
    resolve_dataset,
)
from tunesmith.data.streams import BadRecords, good_records
from tunesmith.datatools.writer import AtomicWriter, check_paths
from tunesmith.errors import TunesmithError

FORMATS = ("alpaca", "sharegpt", "openai")
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}


def _system_and_turns(messages: list) -> tuple[str | None, list]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _alpaca_prompt(prompt: list) -> dict:
    """instruction (the last user turn), history (earlier turns as [user, assistant] pairs) and system."""
    system, turns = _system_and_turns(prompt)
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    return {"instruction": turns[-1]["content"], "input": "", **({"system": system} if system else {}),
            **({"history": history} if history else {})}


def to_alpaca(example: list[dict] | PreferenceExample) -> dict:
    """An alpaca record: instruction, input, history and system, then output or chosen/rejected."""
    if isinstance(example, PreferenceExample):
        return {**_alpaca_prompt(example.prompt_messages), "chosen": example.chosen, "rejected": example.rejected}
    return {**_alpaca_prompt(example[:-1]), "output": example[-1]["content"]}


def to_sharegpt(example: list[dict] | PreferenceExample) -> dict:
    """A sharegpt record: human/gpt conversations, plus chosen/rejected for a preference pair."""
    prompt = example.prompt_messages if isinstance(example, PreferenceExample) else example
    system, turns = _system_and_turns(prompt)
    record = {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in turns]}
    if isinstance(example, PreferenceExample):
        record.update(chosen={"from": "gpt", "value": example.chosen}, rejected={"from": "gpt", "value": example.rejected})
    return {**record, **({"system": system} if system else {})}


def to_openai(example: list[dict] | PreferenceExample) -> dict:
    """An OpenAI record: chat messages, or the preference fine-tuning shape for a pair."""
    if isinstance(example, PreferenceExample):
        return {"input": {"messages": example.prompt_messages},
                "preferred_output": [{"role": "assistant", "content": example.chosen}],
                "non_preferred_output": [{"role": "assistant", "content": example.rejected}]}
    return {"messages": example}


WRITERS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai}


def openai_preference(record: dict) -> PreferenceExample:
    """OpenAI's preference record (input.messages, preferred_output, non_preferred_output) as a PreferenceExample."""
    messages = record.get("input", {}).get("messages") if isinstance(record.get("input"), dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise BadRecord("'input' must be {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
    answers = []
    for key in ("preferred_output", "non_preferred_output"):
        value = record.get(key)
        if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
            raise BadRecord(f"'{key}' must be a list holding one {{\"role\": \"assistant\", \"content\": ...}} message")
        answers.append(value[0]["content"])
    prompt = check_turns([{"role": m["role"], "content": m["content"]} for m in messages], "user")
    return PreferenceExample(prompt, *answers)


def is_openai_preference(record: dict) -> bool:
    """Whether the record has OpenAI's preference shape, which no dataset_info.json format describes."""
    return "preferred_output" in record and "non_preferred_output" in record


def reader_for(spec: DatasetSpec, first_record: dict) -> Callable[[dict], list[dict] | PreferenceExample]:
    """A function record -> conversation or PreferenceExample for `spec` (its format detected when "auto")."""
    if is_openai_preference(first_record):
        return openai_preference
    if spec.formatting == "auto":
        spec = detect_spec(spec.name, spec.path, first_record)
    convert = CONVERTERS[(spec.formatting, spec.ranking)]
    return lambda record: convert(record, spec)


def source_spec(path: Path, source_format: str, first_record: dict) -> DatasetSpec:
    """The spec of a file in a named format (ranking when its first record has chosen and rejected)."""
    if source_format == "auto":
        return DatasetSpec(name=str(path), path=path, formatting="auto")
    ranking = "chosen" in first_record and "rejected" in first_record
    if source_format == "openai":
        entry = {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": OPENAI_TAGS}
    else:
        entry = {"formatting": source_format}
    return make_spec(str(path), path, {**entry, "ranking": ranking})


def convert_file(input_path: str | Path, output_path: str | Path, target: str, source_format: str = "auto",
                 skip_bad: bool = False) -> BadRecords:
    """Rewrite every record of `input_path` in `target` format to `output_path` (atomically)."""
    if target not in WRITERS or source_format not in (*FORMATS, "auto"):
        raise TunesmithError(f"unknown format '{target if target not in WRITERS else source_format}'; choose one "
                             f"of {', '.join(FORMATS)}.")
    check_paths(Path(input_path), Path(output_path))
    bad, read = BadRecords(input_path, skip_bad), None
    with AtomicWriter(output_path) as writer:
        for where, record in good_records(bad):
            read = read or reader_for(source_spec(bad.path, source_format, record), record)
            try:
                writer.write(WRITERS[target](read(record)))
            except BadRecord as err:
                bad.add(where, str(err))
    return bad


def validate_dataset(name: str, dataset_dir: str | Path, keep: int = 20) -> tuple[int, list[BadRecords]]:
    """(good records, one BadRecords per file) for a dataset name or file, read as training reads it."""
    spec = resolve_dataset(name, dataset_dir)
    good, reports = 0, []
    for path in dataset_files(spec):
        bad, read = BadRecords(path, skip=True, keep=keep, writes=False), None
        for where, record in good_records(bad):
            read = read or reader_for(dataclasses.replace(spec, path=path), record)
            try:
                read(record)
                good += 1
            except BadRecord as err:
                bad.add(where, str(err))
        reports.append(bad)
    return good, reports
