"""Read a local data file into a list of records (one dict per example), for training.

Supported like LLaMA-Factory's local files: `.json` (a list of objects, or JSON lines saved under a
.json name), `.jsonl`, `.csv` (every value is a string) and `.parquet`. The parsing itself is
`streams.read_stream`, shared with `tunesmith data`, so both name the same file and line for the same
problem.

Usage: `records = read_records(Path("data/alpaca_en_demo.json"))`.
"""

import warnings
from pathlib import Path

from tunesmith.data.streams import FORMATS, BadRecords, good_records

SKIP_HINT = "set skip_bad_records: true to drop bad records"


def read_located(path: Path, skip_bad_records: bool = False) -> list[tuple[int, dict]]:
    """(line or row, record) for every record; an unreadable one is an error naming its line, or with
    `skip_bad_records` a warning that says how many were skipped."""
    bad = BadRecords(Path(path), skip_bad_records, writes=False, hint=SKIP_HINT)
    located = list(good_records(bad))
    if bad.count:
        warnings.warn(f"{path}: skipped {bad.count} unreadable record(s); first: {bad.examples[0]}", stacklevel=2)
    return located


def read_records(path: Path, skip_bad_records: bool = False) -> list[dict]:
    """The file's records (see `read_located`)."""
    return [record for _, record in read_located(path, skip_bad_records)]


READERS = FORMATS  # the file types a dataset may use
