"""Write record files atomically, in the format their suffix names: .jsonl, .json (an array), .csv, .parquet.

`AtomicWriter(path)` writes to a hidden temporary file beside `path`, `.<name>.tmp-<pid>`, and renames
it over `path` only when the `with` block ends without an error: an interrupted run never leaves a
half-written file under the final name. Ctrl-C unwinds the `with` block, which deletes the temporary file;
SIGTERM and SIGHUP delete it too, unless someone else handles them (the CLI turns SIGTERM into an
unwinding exit). A kill -9 cannot be caught, so each writer first deletes the temporary files
of `path` whose process is gone. `dumps` is the compact JSON every toolkit command writes (as `jq -c`
does), and `check_paths` refuses an input/output pair before anything is written.

Usage: `with AtomicWriter("out.jsonl") as writer: writer.write(record)`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import orjson

from tunesmith.data.streams import file_format, loads
from tunesmith.errors import TunesmithError

_OPEN_TEMPS: dict[Path, int] = {}
"""Temporary files being written -> the pid that writes them, for the signal handler to delete."""


def dumps(record: Any, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON with non-ASCII text kept as is, like `jq -c`. Values JSON has no type for
    (parquet's bytes, decimals, dates) are written as text."""
    try:
        return orjson.dumps(record, default=_as_text, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError:  # integers beyond 64 bits, lone surrogates: the stdlib writes them (escaped)
        text = json.dumps(record, sort_keys=sort_keys, separators=(",", ":"), default=_as_text)
        return text.encode()


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def check_paths(input_path: Path, output_path: Path) -> None:
    """Before anything is written: the input exists, the output is a writable file path and not the input."""
    file_format(input_path)
    if not input_path.is_file():
        raise TunesmithError(f"{input_path}: file not found.")
    file_format(output_path)
    if output_path.is_dir():
        raise TunesmithError(f"{output_path}: is a folder; give a file path for the output.")
    if output_path.exists() and os.path.samefile(input_path, output_path):
        raise TunesmithError(f"{output_path}: the output would overwrite the input; write to another file.")


class AtomicWriter:
    """Write records to `path` through a temporary file renamed into place on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.format = file_format(self.path)
        self.temp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.count = 0
        self._rows: list[dict] = []  # parquet buffers rows into row groups
        self._csv = self._parquet = self._fields = None
        self._abandoned = False
        self._signals: dict = {}

    def __enter__(self) -> AtomicWriter:
        _OPEN_TEMPS[self.temp] = os.getpid()  # before the file exists: a signal may come as soon as it does
        self._signals = _clean_up_on_signals()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)
            self._open()
        except OSError as err:
            self._forget()
            raise TunesmithError(f"{self.path}: cannot write there ({err.strerror}).") from err
        return self

    def _forget(self) -> None:
        """Put the signal handlers back and drop the temporary file from the ones a signal deletes."""
        for sig, handler in self._signals.items():
            signal.signal(sig, handler)
        _OPEN_TEMPS.pop(self.temp, None)

    def _open(self) -> None:
        if self.format == ".csv":
            self.file = self.temp.open("w", encoding="utf-8", newline="")
        else:
            self.file = None if self.format == ".parquet" else self.temp.open("wb")
        if self.format == ".json":
            self.file.write(b"[")

    def write_json(self, data: bytes) -> None:
        """Write one record given as its compact JSON (what `dumps` returns)."""
        if self.format == ".jsonl":
            self.file.write(data + b"\n")
            self.count += 1
        elif self.format == ".json":
            self.file.write((b"\n" if self.count == 0 else b",\n") + data)
            self.count += 1
        else:
            self.write(loads(data))

    def write(self, record: dict) -> None:
        """Write one record in the file's format (JSON records go through `write_json`)."""
        if self.format in (".jsonl", ".json"):
            self.write_json(dumps(record))
            return
        if self.format == ".csv":
            self._write_csv(record)
        else:
            self._write_parquet(record)
        self.count += 1

    def _write_parquet(self, record: dict) -> None:
        if self._fields is None:
            self._fields = set(record)
        if set(record) != self._fields:  # from_pylist would silently drop or null-fill the difference
            raise TunesmithError(f"{self.path}: record {self.count + 1} has fields {sorted(record)}, but the first "
                                 f"had {sorted(self._fields)}; parquet needs the same fields in every record. Use "
                                 "--select, or write .jsonl.")
        self._rows.append(record)
        if len(self._rows) >= 8192:
            self._flush_parquet()

    def _write_csv(self, record: dict) -> None:
        if self._csv is None:
            self._csv = csv.DictWriter(self.file, fieldnames=list(record))
            self._csv.writeheader()
        extra = set(record) - set(self._csv.fieldnames)
        if extra:
            raise TunesmithError(f"{self.path}: record {self.count + 1} has fields {sorted(extra)} that the first "
                                 "record lacks; a CSV file has one header. Use --select, or write .jsonl.")
        self._csv.writerow({k: v if isinstance(v, (str, int, float)) or v is None else dumps(v).decode()
                            for k, v in record.items()})

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        try:
            table = pa.Table.from_pylist(self._rows, schema=self._parquet.schema if self._parquet else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise TunesmithError(f"{self.path}: records do not share one column layout ({err}); parquet needs the "
                                 "same fields and types in every record. Write .jsonl instead.") from err
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.temp, table.schema)
        self._parquet.write_table(table)
        self._rows = []

    def abandon(self) -> None:
        """Leave the final path as it was: the temporary file is deleted on exit, not renamed."""
        self._abandoned = True

    def __exit__(self, exc_type, exc, tb) -> None:
        self._forget()
        try:
            if exc_type is None and not self._abandoned:
                self._finish()
                os.replace(self.temp, self.path)
        finally:
            if self.file is not None and not self.file.closed:
                self.file.close()
            if self._parquet is not None and (exc_type is not None or self._abandoned):
                self._parquet.close()
            self.temp.unlink(missing_ok=True)

    def _finish(self) -> None:
        if self.format == ".json":
            self.file.write(b"\n]\n" if self.count else b"]\n")
        elif self.format == ".parquet":
            self._flush_parquet()
            if self._parquet is None:  # no record at all: an empty table with no columns
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({}), self.temp)
            else:
                self._parquet.close()
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the `.<name>.tmp-<pid>` files of `path` that a process now gone left behind (a kill -9)."""
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match[1])) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_up_on_signals() -> dict:
    """Where nothing else handles SIGTERM or SIGHUP, handle them by deleting the open temporary files, then
    dying of the signal as before; returns the handlers to restore. (Raising SystemExit instead would be
    lost if the signal landed in code that ignores exceptions, such as an at-fork hook.) Only the main
    thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _remove_temps_and_die)
    return saved


def _remove_temps_and_die(signum: int, frame: object) -> None:
    for temp, owner in list(_OPEN_TEMPS.items()):
        if owner == os.getpid():  # a forked child inherits the table, not the files' ownership
            temp.unlink(missing_ok=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
