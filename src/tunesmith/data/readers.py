"""Read a local data file into a list of records (one dict per example).

Supported like LLaMA-Factory's local files: `.json` (a list of objects, or JSON lines saved
under a .json name), `.jsonl`, `.csv` (every value is a string) and `.parquet` (via pyarrow).

Usage: `records = read_records(Path("data/alpaca_en_demo.json"))`.
"""

import csv
import json
from pathlib import Path

from tunesmith.errors import TunesmithError


def _read_json_lines(path: Path, text: str) -> list:
    records = []
    for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise TunesmithError(
                f"{path}: line {line_no} is not valid JSON ({err.msg} at column {err.colno}). "
                "A JSON lines file needs one complete JSON object per line; fix or remove that line."
            ) from err
    return records


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # "Extra data" means a valid first value followed by more: JSON lines under a .json name.
        if err.msg == "Extra data":
            return _read_json_lines(path, text)
        raise TunesmithError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}). "
            "The file must hold a JSON list of objects ([{...}, {...}]) or one JSON object per line."
        ) from err
    if not isinstance(data, list):
        raise TunesmithError(
            f"{path}: the top-level JSON value is a {type(data).__name__}, but a dataset file must be a "
            "list of records ([{...}, {...}]) or JSON lines."
        )
    return data


def _read_jsonl(path: Path) -> list:
    return _read_json_lines(path, path.read_text(encoding="utf-8-sig"))


def _read_csv(path: Path) -> list:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq  # imported lazily: only parquet users pay for pyarrow's import time

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise TunesmithError(f"{path}: cannot be read as parquet ({err}). Re-export the file.") from err


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def read_records(path: Path) -> list[dict]:
    """Return the file's records; every record must be a JSON object / table row."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TunesmithError(
            f"{path}: unsupported file type '{path.suffix}'. Supported: {', '.join(READERS)}; "
            "convert the file to one of these."
        )
    if not path.is_file():
        raise TunesmithError(f"{path}: file not found. Check `file_name` in dataset_info.json or the path.")
    try:
        records = reader(path)
    except UnicodeDecodeError as err:
        raise TunesmithError(f"{path}: not UTF-8 text ({err.reason}); save the file as UTF-8.") from err
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise TunesmithError(
                f"{path}: record {index} (0-based index) is a {type(record).__name__}, not an object; "
                'every record must be a JSON object such as {"instruction": ..., "output": ...}.'
            )
    return records
