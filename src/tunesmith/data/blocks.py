"""Run `prepare`'s per-record steps on every core, for files with one record per line.

JSON lines, and JSON arrays laid out one record per line (`[`, then `{...},` lines, then `]`, as
`jq -c` or a per-record json.dumps writes them), split at line ends into blocks of a few MB. Each
worker reads its own byte range, parses, runs the steps and returns the survivors already serialised,
with their line numbers relative to the block; the parent merges the blocks in order, so output,
line numbers, de-duplication ("first one wins") and sampling are exactly those of a sequential run.
Any other layout (a pretty-printed array) is read sequentially by `streams.read_stream`; so is a
one-per-line array that turns out to break the layout somewhere (the caller re-reads it sequentially,
which also gives the precise syntax error if it is malformed).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tunesmith.data.formats import BadRecord
from tunesmith.data.streams import dumps, loads

BLOCK_BYTES = 4 << 20
ARRAY_SHAPE = re.compile(rb"e*l\]|\]")  # e: record line ending in ",", l: the last record, ]: the close


@dataclass
class BlockResult:
    newlines: int
    begin: int
    kept: list = field(default_factory=list)
    """(line within the block, sample key or None, serialised record or None, dedup digest or None) for
    the surviving records, in order; the record is left out when its sample key cannot win."""
    unsent: int = 0
    """Surviving records left out altogether (their key cannot win and there is no dedup to tell)."""
    drops: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)
    """(line within the block, reason) for each bad record."""
    shape: bytes = b""
    """Array layout only: one letter per non-empty line (see ARRAY_SHAPE)."""
    broken: bool = False
    """Array layout only: a line is not one whole record, so the file must be read sequentially."""


def line_layout(path: Path) -> tuple[str, int] | None:
    """("lines", 0) for JSON lines; ("array", offset after the opening line) for a one-record-per-line
    array; None for anything else (read sequentially)."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    with path.open("rb") as f:
        head = f.read(1 << 20)
    start = len(head) - len(head.lstrip(b"\xef\xbb\xbf \t\r\n"))
    if head[start:start + 1] == b"{":
        return "lines", 0
    first_line_end = head.find(b"\n", start)
    if head[start:start + 1] != b"[" or head[start + 1:first_line_end].strip() or first_line_end < 0:
        return None
    second = head[first_line_end + 1:head.find(b"\n", first_line_end + 1)].strip()
    try:
        return ("array", first_line_end + 1) if isinstance(loads(second.removesuffix(b",")), dict) else None
    except ValueError:
        return None


def block_ranges(path: Path, start: int) -> list[tuple[int, int]]:
    """Byte ranges of about BLOCK_BYTES that end at line ends."""
    ranges = []
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        while start < size:
            f.seek(min(start + BLOCK_BYTES, size))
            f.readline()
            end = min(f.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


_worker: dict = {}


def init_worker(path: Path, layout: str, make_pipeline, options) -> None:
    """Build the steps in the worker itself (a tokenizer, for one, is loaded once per process)."""
    steps, digest = make_pipeline(options)
    seed = None if options.sample is None else options.seed
    _worker.update(path=path, layout=layout, steps=steps, digest=digest, seed=seed)


def process_block(task: tuple[int, int, float]) -> BlockResult:
    """Parse and run the steps over the bytes [begin, end) (with what `init_worker` set). Sample keys come
    from a generator seeded by the seed and `begin`, so they do not depend on which process runs the block;
    a record whose key is not below `threshold` cannot make the sample and is not serialised."""
    begin, end, threshold = task
    path, layout, steps, digest, seed = (_worker[key] for key in ("path", "layout", "steps", "digest", "seed"))
    with open(path, "rb") as f:
        f.seek(begin)
        data = f.read(end - begin)
    lines = data.split(b"\n")
    result = BlockResult(newlines=len(lines) - 1, begin=begin)
    keys = None if seed is None else random.Random(f"{seed}:{begin}")
    is_array, shape, kept, drops = layout == "array", bytearray(), result.kept, result.drops
    for index, raw in enumerate(lines):  # the hot loop: the common case costs one orjson call
        comma = is_array and raw.endswith(b",")
        try:
            record = orjson.loads(raw[:-1] if comma else raw)
        except orjson.JSONDecodeError:
            record, comma = _parse_slowly(raw, is_array, shape)
            if record is _SKIP:
                continue
            if record is _BROKEN:
                result.broken = True
                return result
            if isinstance(record, Exception):
                result.bad.append((index, f"invalid JSON ({record}); a JSON lines file needs one complete object "
                                          "per line"))
                continue
        if is_array:
            shape.append(101 if comma else 108)  # "e" or "l"
        if type(record) is not dict:
            result.bad.append((index, f"the record is a JSON {type(record).__name__}, not an object; every record "
                                      "must be {...}"))
            continue
        try:
            for name, step in steps:
                record = step(record)
                if record is None:
                    drops[name] += 1
                    break
            else:
                key = keys.random() if keys else None
                if keys and key >= threshold:  # cannot make the sample: not worth serialising
                    if digest:
                        kept.append((index, key, None, digest(record)))
                    else:
                        result.unsent += 1
                    continue
                kept.append((index, key, dumps(record), digest(record) if digest else None))
        except BadRecord as err:
            result.bad.append((index, str(err)))
    result.shape = bytes(shape)
    return result


_SKIP, _BROKEN = object(), object()


def _parse_slowly(raw: bytes, is_array: bool, shape: bytearray):
    """(record or _SKIP / _BROKEN / the parse error, had a trailing comma) for what orjson refused as is:
    blank lines, the array's "]", stray whitespace, and what only the stdlib reads (see streams.loads)."""
    line = raw.strip()
    if not line:
        return _SKIP, False
    if is_array and line == b"]":
        shape.append(93)
        return _SKIP, False
    comma = is_array and line.endswith(b",")
    try:
        return loads(line[:-1] if comma else line), comma
    except ValueError as err:
        return (_BROKEN if is_array else err), comma


def run_blocks(path: Path, layout: str, start: int, make_pipeline, options, workers: int, threshold):
    """BlockResults in file order, computed by `workers` processes (in this one for a single block).

    `make_pipeline(options)` -> (steps, digest function or None) runs once in each worker; `threshold()`
    is asked as each block is handed out, after the blocks before it were merged.
    """
    ranges = block_ranges(path, start)
    if workers <= 1 or len(ranges) <= 1:
        init_worker(path, layout, make_pipeline, options)
        for begin, end in ranges:
            yield process_block((begin, end, threshold()))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, init_worker, (path, layout, make_pipeline, options)) as pool:
        pending = deque()
        for begin, end in ranges:
            pending.append(pool.apply_async(process_block, ((begin, end, threshold()),)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
