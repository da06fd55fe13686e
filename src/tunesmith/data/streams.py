"""Read record files one record at a time, so memory stays flat however large the file.

`read_stream(path)` yields `(where, record)`: `where` is the 1-based line the record starts on
(JSON, JSON lines, CSV) or its row number (parquet), for error messages a user can jump to. A record
that cannot be read (malformed JSON, not an object) comes as a `Malformed` in place of the record,
so the caller decides whether to stop or skip (`BadRecords`, `good_records`). A JSON array is decoded
element by element from a sliding text buffer with the stdlib's C scanner, never loaded whole.

Training reads its files through here (`readers.py`), and so does the cleaning toolkit in
datatools/ (`tunesmith data`), so both name the same file and line for the same problem.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tunesmith.errors import TunesmithError

FORMATS = (".json", ".jsonl", ".csv", ".parquet")
CHUNK_CHARS = 1 << 20
MAX_RECORD_CHARS = 256 << 20  # a "record" larger than this is a malformed file, not data
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def loads(data: bytes | str) -> Any:
    """orjson, or the stdlib for what orjson refuses and jq reads (lone surrogate escapes, NaN, huge integers)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


UNREADABLE = (ValueError, RecursionError)  # bad JSON, bad UTF-8, 4300-digit integers; nesting too deep


@dataclass(frozen=True)
class Malformed:
    """A record that could not be read; `reason` says why and how to fix it."""

    reason: str
    fatal: bool = False
    """True when reading cannot go on past it (a syntax error inside a JSON array)."""


def file_format(path: Path) -> str:
    """The file's lower-case suffix, after checking that it is a format we can read."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise TunesmithError(f"{path}: unsupported file type '{suffix or '(none)'}'. Use one of {', '.join(FORMATS)}.")
    return suffix


def read_stream(path: str | Path) -> Iterator[tuple[int, dict | Malformed]]:
    """`(line or row, record)` for every record of a .json/.jsonl/.csv/.parquet file, in file order."""
    path = Path(path)
    suffix = file_format(path)
    if not path.is_file():
        raise TunesmithError(f"{path}: file not found.")
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".parquet":
        return _parquet_records(path)
    with path.open("rb") as f:
        first = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return _json_array_records(path) if first == b"[" else _json_line_records(path)


def _as_record(value) -> dict | Malformed:
    if isinstance(value, dict):
        return value
    return Malformed(not_an_object(value))


def unreadable_reason(err: Exception) -> str:
    """A user-facing reason for a decoding error (bad UTF-8, bad JSON, nesting too deep)."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text ({err.reason}); save the file as UTF-8"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg} at column {err.colno})"
    if isinstance(err, RecursionError):
        return "invalid JSON (nested too deeply)"
    return f"invalid JSON ({err})"


def not_an_object(value: Any) -> str:
    """The reason given for a JSON value that is not an object, so cannot be a record."""
    return f"the record is a JSON {json_type(value)}, not an object; every record must be {{...}}"


def json_type(value: Any) -> str:
    """JSON's name for the type of a decoded value, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def parse_json_line(raw: bytes) -> dict | Malformed | None:
    """One line of a JSON lines file: its record, a Malformed, or None for a blank line."""
    try:
        return _as_record(loads(raw))
    except UNREADABLE as err:
        if not raw.strip():
            return None
        return Malformed(unreadable_reason(err) + "; a JSON lines file needs one complete object per line")


def _json_line_records(path: Path):
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            record = parse_json_line(raw)
            if record is not None:
                yield line_no, record


class _TextWindow:
    """A sliding window over a text file: `text[pos:]` is what has not been consumed yet."""

    def __init__(self, f):
        self.f, self.text, self.pos, self.line, self.eof = f, "", 0, 1, False
        self.more()

    def more(self) -> None:
        """Drop the consumed text and append the next chunk (as large as what is left, so that a huge
        record is re-scanned a logarithmic number of times, not once per chunk)."""
        chunk = self.f.read(max(CHUNK_CHARS, len(self.text) - self.pos))
        self.eof = not chunk
        self.text, self.pos = self.text[self.pos:] + chunk, 0

    def skip_whitespace(self) -> str:
        """The next non-whitespace character ("" at the end of the file), counting lines on the way."""
        while True:
            end = _WHITESPACE.match(self.text, self.pos).end()
            self.line += self.text.count("\n", self.pos, end)
            self.pos = end
            if end < len(self.text) or self.eof:
                return self.text[end:end + 1]
            self.more()

    def advance(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end


def _json_array_records(path: Path):
    try:
        yield from _json_array_body(path)
    except UnicodeDecodeError as err:
        yield None, Malformed(unreadable_reason(err), fatal=True)


def _json_array_body(path: Path):
    with path.open(encoding="utf-8-sig") as f:
        window = _TextWindow(f)
        window.skip_whitespace()
        window.advance(window.pos + 1)  # the "["
        need_comma = after_comma = False  # a record was just read / a "," was just read
        while True:
            char = window.skip_whitespace()
            problem = None
            if char == "]":
                window.advance(window.pos + 1)
                if window.skip_whitespace():
                    problem = "text after the closing ']' of the JSON array; remove it"
                elif after_comma:
                    problem = "a trailing ',' before the closing ']'; remove it"
                else:
                    return
            elif char == "":
                problem = "the JSON array is not closed with ']' (the file ends early)"
            elif need_comma and char != ",":
                problem = f"expected ',' or ']' between records, found {char!r}"
            if problem:
                yield window.line, Malformed(problem, fatal=True)
                return
            if need_comma:
                window.advance(window.pos + 1)
                need_comma, after_comma = False, True
                continue
            line, value = window.line, _decode_next(window)
            yield line, value if isinstance(value, Malformed) else _as_record(value)
            if isinstance(value, Malformed):
                return
            need_comma, after_comma = True, False


def _decode_next(window: _TextWindow):
    """Decode one JSON value at the window's position, pulling more text while it may be cut off."""
    while True:
        try:
            value, end = _DECODER.raw_decode(window.text, window.pos)
        except json.JSONDecodeError as err:
            # An error near the end of the window (or an unterminated string) may only mean the value
            # continues in the next chunk; anywhere else it is a real syntax error.
            cut_off = err.msg.startswith("Unterminated string") or err.pos >= len(window.text) - 64
            if cut_off and not window.eof and len(window.text) - window.pos < MAX_RECORD_CHARS:
                window.more()
                continue
            line = window.line + window.text.count("\n", window.pos, err.pos)
            return Malformed(f"invalid JSON at line {line} ({err.msg}); reading cannot continue past a syntax "
                             "error inside a JSON array: fix it, or convert the file to JSON lines", fatal=True)
        except UNREADABLE as err:
            return Malformed(unreadable_reason(err), fatal=True)
        if end >= len(window.text) and not window.eof:  # a number at the very end may continue
            window.more()
            continue
        window.advance(end)
        return value


def _csv_records(path: Path):
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB limit would reject long texts
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        start = 2  # the header is line 1; a quoted value may span lines, so a record starts after the last
        try:
            for row in reader:
                if None in row:
                    yield start, Malformed(f"the row has {len(row[None])} more cell(s) than the header")
                else:
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as err:
            yield start, Malformed(f"malformed CSV ({err})", fatal=True)
        except UnicodeDecodeError as err:
            yield start, Malformed(unreadable_reason(err), fatal=True)


def _parquet_records(path: Path):
    import pyarrow.parquet as pq  # lazily: only parquet users pay for pyarrow's import

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=8192)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise TunesmithError(f"{path}: cannot be read as parquet ({err}). Re-export the file.") from err


class BadRecords:
    """What to do with bad records: stop at the first (the default) or skip them, counting and keeping a few."""

    def __init__(self, path: Path, skip: bool, keep: int = 5, writes: bool = True,
                 hint: str = "pass --skip-bad to skip and count bad records"):
        self.path, self.skip, self.keep, self.writes, self.hint = Path(path), skip, keep, writes, hint
        self.count, self.examples = 0, []

    def add(self, where: int | None, reason: str, fatal: bool = False) -> None:
        """Record one bad record; raise unless skipping (always when `fatal`: reading cannot go on)."""
        place = str(self.path)
        if where is not None:
            place += f": {'row' if self.path.suffix.lower() == '.parquet' else 'line'} {where}"
        if fatal or not self.skip:
            fix = "" if fatal else f"; fix it, or {self.hint}"
            raise TunesmithError(f"{place}: {reason}{fix}." + (" Nothing was written." if self.writes else ""))
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{place}: {reason}")


def good_records(bad: BadRecords) -> Iterator[tuple[int, dict]]:
    """`read_stream` without the malformed records, which go to `bad` (stopping the run unless skipped)."""
    for where, record in read_stream(bad.path):
        if isinstance(record, Malformed):
            bad.add(where, record.reason, record.fatal)
        else:
            yield where, record
