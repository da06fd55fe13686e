"""Resolve a dataset name to a local file and its format, the way LLaMA-Factory's `dataset_info.json` does.

An entry looks like `{"file_name": "x.json", "formatting": "alpaca"|"sharegpt", "ranking": bool,
"columns": {...}, "tags": {...}}`; missing fields take LLaMA-Factory's defaults below. A name may
also be a path to a local json/jsonl/csv/parquet file; its format is then detected from the records
(see `detect_spec`). Hub entries (hf_hub_url, ms_hub_url, ...) cannot be used offline. A key of the
wrong JSON type (`"ranking": "false"`, `"columns": [...]`) is an error naming the file, entry and key.

Usage: `spec = resolve_dataset("alpaca_en_demo", "data")`, then `read_records(spec.path)`.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.readers import READERS
from tunesmith.data.streams import json_type
from tunesmith.errors import TunesmithError

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    **SHAREGPT_TAGS,
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
}
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# The JSON type each entry key must have, and how to say it. A wrong type would otherwise crash deep in
# the loader, or worse pass silently: `"ranking": "false"` is a non-empty string, so Python reads it as true.
ENTRY_TYPES = {
    "file_name": (str, "a string: the data file's (or folder's) path inside dataset_dir"),
    "formatting": (str, '"alpaca" or "sharegpt"'),
    "ranking": (bool, "true or false (a JSON boolean, unquoted)"),
    "columns": (dict, 'an object mapping columns to the names in the file, e.g. {"prompt": "instruction"}'),
    "tags": (dict, 'an object mapping tags to keys or role names, e.g. {"role_tag": "role"}'),
    "num_samples": (int, "a whole number"),
    **{key: (str, "a string") for key in ("split", "subset", "folder", *HUB_KEYS)},
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where its file is and how to read its records."""

    name: str
    """Registry name, or the path as given."""
    path: Path
    """Local file, or a folder whose supported files are read in name order."""
    formatting: str = "alpaca"
    """"alpaca" (instruction/input/output columns) or "sharegpt" (a list of messages)."""
    ranking: bool = False
    """True for preference data: chosen/rejected responses instead of one response."""
    columns: dict = field(default_factory=dict)
    """Logical column -> column name in the file (prompt, query, response, history, system, messages, chosen, rejected, tools)."""
    tags: dict = field(default_factory=dict)
    """sharegpt message keys and role names (role_tag, content_tag, user_tag, assistant_tag, ...)."""


def make_spec(name: str, path: Path, entry: dict) -> DatasetSpec:
    """Fill LLaMA-Factory's defaults into one dataset_info.json entry."""
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise TunesmithError(
            f"dataset '{name}': formatting '{formatting}' is not supported; use \"alpaca\" or \"sharegpt\"."
        )
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    tags = {**SHAREGPT_TAGS, **entry.get("tags", {})} if formatting == "sharegpt" else {}
    return DatasetSpec(
        name=name,
        path=path,
        formatting=formatting,
        ranking=bool(entry.get("ranking", False)),
        columns={**defaults, **entry.get("columns", {})},
        tags=tags,
    )


def detect_spec(name: str, path: Path, first_record: dict) -> DatasetSpec:
    """Guess the format of a plain file from its first record (sharegpt if it holds a message list)."""
    ranking = "chosen" in first_record and "rejected" in first_record
    # system and history are optional in every record (absent reads as none), so they are always mapped:
    # a file whose first record happens to lack them must not lose them in the records that have them
    columns = {"system": "system", "history": "history"} | ({"chosen": "chosen", "rejected": "rejected"} if ranking else {})
    for column in ("conversations", "messages"):
        messages = first_record.get(column)
        if isinstance(messages, list):
            is_openai = bool(messages) and isinstance(messages[0], dict) and "role" in messages[0]
            columns.pop("history", None)
            entry = {"formatting": "sharegpt", "ranking": ranking, "columns": {**columns, "messages": column}}
            return make_spec(name, path, {**entry, "tags": OPENAI_TAGS if is_openai else {}})
    return make_spec(name, path, {"ranking": ranking, "columns": columns})


def load_dataset_info(dataset_dir: str | Path) -> dict:
    """Parse `<dataset_dir>/dataset_info.json`; an absent file is an empty registry."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TunesmithError(
            f"{info_path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix the file."
        ) from err
    except UnicodeDecodeError as err:
        raise TunesmithError(f"{info_path}: not UTF-8 text ({err.reason}); save the file as UTF-8.") from err
    if not isinstance(info, dict):
        raise TunesmithError(
            f"{info_path}: the file is a JSON {json_type(info)}, but it must be an object mapping dataset names to "
            'entries, e.g. {"my_data": {"file_name": "my_data.json"}}.'
        )
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise TunesmithError(
                f'{info_path}: dataset "{name}" is a JSON {json_type(entry)} ({_shown(entry)}), but each dataset '
                'must be an object, e.g. {"file_name": "my_data.json"}; fix that entry.'
            )
    return info


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def check_entry(name: str, entry: dict, info_path: Path) -> None:
    """Refuse a dataset_info.json entry whose known keys have the wrong JSON type (see ENTRY_TYPES)."""
    for key, (expected, wanted) in ENTRY_TYPES.items():
        value = entry.get(key)
        # bool is an int in Python: only a real number passes as int, only true/false as bool
        if key in entry and not (isinstance(value, expected) and (expected is bool or not isinstance(value, bool))):
            raise _entry_error(name, key, value, wanted, info_path)
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
        raise _entry_error(name, "formatting", entry["formatting"], ENTRY_TYPES["formatting"][1], info_path)
    for key in ("columns", "tags"):
        for inner, value in entry.get(key, {}).items():
            if not isinstance(value, str):
                raise _entry_error(name, f"{key}.{inner}", value, "a string: a key name in the data file", info_path)


def _entry_error(name: str, key: str, value: object, wanted: str, info_path: Path) -> TunesmithError:
    return TunesmithError(
        f'{info_path}: dataset "{name}", key "{key}" is the JSON {json_type(value)} {_shown(value)}, but it must be '
        f"{wanted}. Fix that key of the entry."
    )


def _hub_error(name: str, entry: dict, info_path: Path) -> TunesmithError:
    url = next(entry[key] for key in HUB_KEYS if key in entry)
    return TunesmithError(
        f"dataset '{name}' in {info_path} points to the hub ('{url}'), which tunesmith cannot reach: "
        "it only reads local files. Download the data once (e.g. `huggingface-cli download --repo-type dataset "
        f'{url}`), save it as json/jsonl/csv/parquet in the dataset_dir and set "file_name" in that entry.'
    )


def _unknown_error(name: str, info: dict, info_path: Path) -> TunesmithError:
    close = difflib.get_close_matches(name, list(info), n=5, cutoff=0.5)
    hint = f"Closest names: {', '.join(close)}. " if close else ""
    missing = "" if info_path.is_file() else " (no such file)"
    return TunesmithError(
        f"dataset '{name}' is neither an entry of {info_path}{missing} nor an existing "
        f'{"/".join(READERS)} file. {hint}Add an entry with "file_name" to dataset_info.json or give a file path.'
    )


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Spec of a registered name, or of a plain file path (formatting "auto": pass its first record to `detect_spec`)."""
    info = load_dataset_info(dataset_dir)
    info_path = Path(dataset_dir) / "dataset_info.json"
    if name in info:
        entry = info[name]
        check_entry(name, entry, info_path)
        if "file_name" not in entry:
            if any(key in entry for key in HUB_KEYS):
                raise _hub_error(name, entry, info_path)
            raise TunesmithError(f"dataset '{name}' in {info_path} has no \"file_name\"; add one.")
        return make_spec(name, Path(dataset_dir) / entry["file_name"], entry)
    for candidate in (Path(name), Path(dataset_dir) / name):
        if candidate.exists() and (candidate.is_dir() or candidate.suffix.lower() in READERS):
            return DatasetSpec(name=name, path=candidate, formatting="auto")
    raise _unknown_error(name, info, info_path)


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files to read: the spec's file, or a folder's supported files in name order."""
    if spec.path.is_dir():
        files = sorted(p for p in spec.path.iterdir() if p.suffix.lower() in READERS)
        if not files:
            raise TunesmithError(
                f"dataset '{spec.name}': folder {spec.path} holds no {'/'.join(READERS)} file."
            )
        return files
    return [spec.path]
