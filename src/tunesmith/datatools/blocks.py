"""Run `prepare`'s per-record steps on every core, for JSON lines and JSON arrays.

A JSON lines file splits at line ends. A JSON array splits where a line starts a top-level record: a
`{` at the indentation of its first record (column 0 when written one record per line, as `jq -c` or a
per-record json.dumps writes; two spaces for json.dump(indent=2)). Each block of a few MB is read,
parsed, filtered and serialised by a worker; the parent merges the blocks in order, so output, line
numbers and de-duplication ("first one wins") are exactly those of a sequential run. The sample is
the same for the same file and seed whatever the number of processes; it is not the sample that the
sequential reader would draw (its random keys come in another order), nor that of the same records
laid out differently.

Splitting an array at a line that only looks like a record start (a nested object at the same
indentation) cannot go unnoticed: the piece before it then ends inside an unclosed record and does not
parse. When every piece parses as one value followed by a comma (the last by the closing bracket),
the pieces are the array's records. If any does not, the caller reads the file sequentially instead
(`tunesmith.data.streams.read_stream`), which also gives the precise error when the file is malformed. CSV, parquet
and other layouts are always read sequentially.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import BadRecord
from tunesmith.data.streams import UNREADABLE, loads, not_an_object, parse_json_line
from tunesmith.datatools.writer import dumps

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WORKER_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
BLOCK_BYTES = 4 << 20
MAX_BLOCK_BYTES = 64 << 20
ARRAY_SHAPE = re.compile(rb"e*l\]|\]")  # e: record line ending in ",", l: the last record, ]: the close

Step = Callable[[dict], "dict | None"]
"""A per-record step: the record (perhaps changed), or None to drop it."""
Pipeline = tuple[list[tuple[str, Step]], Callable[[dict], bytes] | None]
"""(steps, digest function or None), as `prepare.make_pipeline` builds it."""


@dataclass(frozen=True)
class Layout:
    kind: str
    """"lines" (JSON lines) or "array"."""
    start: int
    """Byte offset of the first record (after an array's opening line)."""
    first_line: int = 1
    """Line number of the byte at `start`."""
    indent: bytes = b""
    """An array's record indentation."""

    def record_starts(self, data: bytes) -> list[int]:
        """Offsets in `data` of the lines that start a record (a literal search: a ^ pattern is 10x slower)."""
        head = self.indent + b"{"
        starts = [0] if data.startswith(head) else []
        return starts + [match.start() + 1 for match in re.finditer(re.escape(b"\n" + head), data)]


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
    """Array only: one letter per record, e (followed by ",") or l (not), and ] for the closing bracket."""
    broken: bool = False
    """Array only: a piece is not one whole record, so the file must be read sequentially."""


def line_layout(path: Path) -> Layout | None:
    """The layout of a .json/.jsonl file that can be split into blocks, or None (read it sequentially)."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    with path.open("rb") as f:
        head = f.read(1 << 20)
    start = len(head) - len(head.lstrip(b"\xef\xbb\xbf \t\r\n"))
    if head[start:start + 1] == b"{":
        return Layout("lines", 0)
    first_line_end = head.find(b"\n", start)
    if head[start:start + 1] != b"[" or first_line_end < 0 or head[start + 1:first_line_end].strip():
        return None
    record = re.compile(rb"^([ \t]*)\{", re.M).search(head, first_line_end + 1)
    if record is None or head[first_line_end + 1:record.start()].strip():
        return None
    return Layout("array", first_line_end + 1, head.count(b"\n", 0, first_line_end + 1) + 1, record.group(1))


def block_ranges(path: Path, layout: Layout) -> list[tuple[int, int]] | None:
    """Byte ranges of about BLOCK_BYTES that end where a line (JSON lines) or a record (array) starts;
    None when a block would grow past MAX_BLOCK_BYTES (say, an array written on a single line)."""
    record_head = layout.indent + b"{"
    ranges, start = [], layout.start
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        while start < size:
            f.seek(min(start + BLOCK_BYTES, size))
            line = f.readline(MAX_BLOCK_BYTES)  # finish the line the seek landed in
            while layout.kind == "array" and line and f.tell() - start < MAX_BLOCK_BYTES:
                line_start = f.tell()
                line = f.readline(MAX_BLOCK_BYTES)
                if line.startswith(record_head):
                    f.seek(line_start)
                    break
            end = min(f.tell(), size)
            if end - start >= MAX_BLOCK_BYTES:
                return None
            ranges.append((start, end))
            start = end
    return ranges


_worker: dict = {}


def init_worker(path: Path, layout: Layout, pipeline: Pipeline, seed: int | None) -> None:
    """What `process_block` uses: `pipeline` is (steps, digest function or None); `seed` None: no sample."""
    steps, digest = pipeline
    _worker.update(path=path, layout=layout, steps=steps, digest=digest, seed=seed)


def init_pool_worker(path: Path, layout: Layout, recipe: tuple[Callable[[Any], Pipeline], Any],
                     seed: int | None, parent: int | None = None) -> None:
    """A pool worker builds its own steps from `recipe` = (make_pipeline, options): closures do not
    pickle, and a tokenizer is loaded once per process. `parent`: the pid of the process that owns the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # signals are the parent's to handle: it stops the pool
    for name in ("SIGTERM", "SIGHUP"):  # and removes the temporary output; terminate() must kill, and so
        if hasattr(signal, name):  # must a closed terminal, not the handler inherited from the parent
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (`_pool`): what came meanwhile lands now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
    if parent is not None:
        die_with_parent(parent)
    make_pipeline, options = recipe
    init_worker(path, layout, make_pipeline(options), seed)


def die_with_parent(parent: int) -> None:
    """On Linux, have the kernel kill this worker the moment `parent` dies. After a kill -9 of the parent,
    workers would otherwise print a BrokenPipeError traceback each as they send their result, or block
    for ever on the pool's queues (whose other ends the other workers hold open). The parent's pipes
    close a moment before that signal comes, so a broken pipe kills quietly too (SIGPIPE's own default):
    the worker that dies so may hold a queue lock, but every other worker is being killed as well."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if os.getppid() != parent:  # it died before the request was in place
        os._exit(1)


def process_block(task: tuple[int, int, float]) -> BlockResult:
    """Parse and run the steps over the bytes [begin, end) (with what `init_worker` set). Sample keys come
    from a generator seeded by the seed and `begin`, so they do not depend on which process runs the block;
    a record whose key is not below `threshold` cannot make the sample and is not serialised."""
    begin, end, threshold = task
    path, layout, steps, digest, seed = (_worker[key] for key in ("path", "layout", "steps", "digest", "seed"))
    with open(path, "rb") as f:
        f.seek(begin)
        data = f.read(end - begin)
    result = BlockResult(newlines=data.count(b"\n"), begin=begin)
    keys = None if seed is None else random.Random(f"{seed}:{begin}")
    kept, drops = result.kept, result.drops
    pieces = _json_lines(data, result) if layout.kind == "lines" else _array_records(data, result)
    for index, record in pieces:  # the hot loop
        try:
            record = apply_steps(steps, record, drops)
        except BadRecord as err:
            result.bad.append((index, str(err)))
            continue
        if record is None:
            continue
        key = keys.random() if keys else None
        if keys and key >= threshold:  # cannot make the sample: not worth serialising
            if digest:
                kept.append((index, key, None, digest(record)))
            else:
                result.unsent += 1
            continue
        kept.append((index, key, dumps(record), digest(record) if digest else None))
    return result


def apply_steps(steps: list, record: dict, drops: Counter) -> dict | None:
    """The record after every (name, step), or None, counted under the name of the step that dropped it."""
    for name, step in steps:
        record = step(record)
        if record is None:
            drops[name] += 1
            return None
    return record


def _json_lines(data: bytes, result: BlockResult):
    """(line within the block, record) for each line; unreadable lines and non-objects go to result.bad."""
    for index, raw in enumerate(data.split(b"\n")):
        record = parse_json_line(raw)
        if type(record) is dict:
            yield index, record
        elif record is not None:
            result.bad.append((index, record.reason))


def _array_records(data: bytes, result: BlockResult):
    """(line within the block, record) for each array record; sets result.broken and stops if a piece is
    not exactly one record (see the module docstring)."""
    starts = _worker["layout"].record_starts(data)
    if not starts:  # an empty array's "]", or a block that does not start at a record
        rest = data.strip()
        result.broken, result.shape = rest not in (b"", b"]"), rest
        return
    if data[:starts[0]].strip():
        result.broken = True
        return
    shape, line, previous = bytearray(), 0, 0
    for i, start in enumerate(starts):
        line += data.count(b"\n", previous, start)
        previous = start
        piece = data[start:starts[i + 1] if i + 1 < len(starts) else len(data)].rstrip()
        closing = piece.endswith(b"]")
        if closing:
            piece = piece[:-1].rstrip()
        comma = piece.endswith(b",")
        try:
            record = loads(piece[:-1] if comma else piece)
        except UNREADABLE:
            result.broken = True
            return
        shape += (b"e" if comma else b"l") + (b"]" if closing else b"")
        if type(record) is dict:
            yield line, record
        else:
            result.bad.append((line, not_an_object(record)))
    result.shape = bytes(shape)


def _pool(workers: int, init_args: tuple) -> multiprocessing.pool.Pool:
    """A pool of `init_pool_worker` processes, forked (spawned where fork is missing) with SIGINT, SIGTERM and
    SIGHUP blocked. A worker inherits the parent's Python-level handlers, and a signal that reaches it before
    `init_pool_worker` resets them would be lost: Python drops a signal whose handler has meanwhile become
    SIG_DFL. Pool.terminate() could then wait for ever for a worker that missed its SIGTERM."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if not hasattr(signal, "pthread_sigmask"):
        return context.Pool(workers, init_pool_worker, init_args)
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:  # the pool's own threads start here too, and keep the mask: signals go to the main thread
        return context.Pool(workers, init_pool_worker, init_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def run_blocks(path: Path, layout: Layout, pipeline: Pipeline, recipe: tuple[Callable[[Any], Pipeline], Any],
               workers: int, threshold: Callable[[], float]) -> Iterator[BlockResult | None]:
    """BlockResults in file order, computed by `workers` processes (in this one, with `pipeline`, for a
    single block); a single None when the file cannot be split into blocks.

    Pool workers build their own pipeline from `recipe` = (make_pipeline, options). `threshold()` is
    asked as each block is handed out, after the blocks before it were merged.
    """
    ranges = block_ranges(path, layout)
    if ranges is None:
        yield None
        return
    options = recipe[1]
    seed = None if options.sample is None else options.seed
    if workers <= 1 or len(ranges) <= 1:
        init_worker(path, layout, pipeline, seed)
        for begin, end in ranges:
            yield process_block((begin, end, threshold()))
        return
    with _pool(workers, (path, layout, recipe, seed, os.getpid())) as pool:
        pending = deque()
        for begin, end in ranges:
            pending.append(pool.apply_async(process_block, ((begin, end, threshold()),)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
