"""`tunesmith data prepare`: the usual jq cleaning chain as one streaming pass.

    jq -c '.[]' demo.json                                   -> any input format, read record by record
    select(.a != null and .a != "" and ...)                 -> --require a,b
    {prompt: .a, response: .b}                              -> --rename a:prompt,b:response (keeps only those)
    .char_cnt = ((.prompt | length) + (.response | length)) -> --char-count char_cnt
    select(.char_cnt < 4096)                                -> --max-chars 4096 (and --min-chars)
    shuf | head -n 10000                                    -> --sample 10000 --seed 0 (reservoir sampling)

plus --select, token-count filters under a tokenizer, and exact de-duplication. The steps always run
in the order above (dedup and the token filter after the character filter, sampling last), each one a
function `record -> record or None` (None drops it). Character counts are Unicode code points, as
jq's `length` counts them; a null or missing field counts 0, as in jq. A record a step cannot handle
(not an object, a renamed field that is missing, a counted field that is not text) is a bad record:
the run stops at the first one, naming its line, unless `skip_bad` is set, in which case bad records
are counted and reported. The output is written atomically (see `writer.AtomicWriter`), the input
is only read. Memory stays flat: the reservoir holds `sample` records, dedup one 16-byte hash each.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.data.formats import BadRecord
from tunesmith.data.streams import BadRecords, good_records, json_type
from tunesmith.datatools.blocks import ARRAY_SHAPE, Pipeline, Step, apply_steps, line_layout, run_blocks
from tunesmith.datatools.writer import AtomicWriter, check_paths, dumps
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunesmith.datatools.blocks import Layout


@dataclass
class PrepareOptions:
    """What `prepare` does; every step is off unless set."""

    require: list[str] = field(default_factory=list)
    """Drop records where any of these fields is missing, null or "" (jq: select(.f != null and .f != ""))."""
    rename: list[tuple[str, str]] = field(default_factory=list)
    """(old, new) pairs; the output keeps only the renamed fields, in this order (jq: {new: .old, ...})."""
    select: list[str] = field(default_factory=list)
    """Keep only these fields, in this order (after rename)."""
    char_count: str | None = None
    """Add this field: the number of characters (code points) of the counted fields."""
    count_fields: list[str] = field(default_factory=list)
    """Fields whose characters (and tokens) are counted; default: the fields --rename/--select keep, or
    every text field when neither is given."""
    min_chars: int | None = None
    """Keep records with at least this many characters."""
    max_chars: int | None = None
    """Keep records with fewer than this many characters (jq: select(.char_cnt < N))."""
    tokenizer: str | None = None
    """Tokenizer folder (or hub id) for token counts."""
    load_tokenizer: Callable[[str], Any] | None = None
    """Loads `tokenizer` (the CLI passes `load_tokenizer` from the model layer's loading.py: the toolkit
    sits below that layer, so the caller brings it). Each worker process calls it once; where processes
    are spawned rather than forked it must pickle, so pass a module-level function."""
    token_count: str | None = None
    """Add this field: the number of tokens of the counted fields (no special tokens)."""
    min_tokens: int | None = None
    """Keep records with at least this many tokens."""
    max_tokens: int | None = None
    """Keep records with fewer than this many tokens."""
    dedup: list[str] | None = None
    """Drop exact duplicates: [] compares whole records, a list compares those fields; None keeps duplicates."""
    sample: int | None = None
    """Keep a uniform random sample of this many records (in input order)."""
    seed: int = 0
    """Seed of the sample."""
    skip_bad: bool = False
    """Skip and count bad records instead of stopping at the first one."""


@dataclass
class Report:
    """What happened to the records: per-step drops, bad records (skipped) and how many were written."""

    bad: BadRecords
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the user: records read, dropped per step, skipped as bad, and written."""
        c = self.counts
        parts = [f"read {c['read']}"] + [f"{label} {c[key]}" for key, label in DROP_LABELS if c[key]]
        parts += [f"bad {self.bad.count} (skipped)"] if self.bad.count else []
        return ", ".join(parts + [f"written {c['written']}"])


DROP_LABELS = [("require", "dropped by --require"), ("chars", "dropped by character count"),
               ("tokens", "dropped by token count"), ("dedup", "duplicates"), ("sample", "not sampled")]


# The steps run once per record, millions of times: plain loops, no generators or helper calls.
def require_step(fields: list[str]) -> Step:
    """Drop records where any of `fields` is missing, null or ""."""
    def require(record: dict):
        for name in fields:
            value = record.get(name)
            if value is None or value == "":
                return None
        return record
    return require


def reshape_step(rename: list[tuple[str, str]], select: list[str]) -> Step:
    """Rename (keeping only the renamed fields), then select; a missing source field is a bad record."""
    def reshape(record: dict):
        if rename:
            try:
                record = {new: record[old] for old, new in rename}
            except KeyError as err:
                raise _missing(record, err.args[0], "--rename") from None
        if select:
            try:
                record = {name: record[name] for name in select}
            except KeyError as err:
                raise _missing(record, err.args[0], "--select") from None
        return record
    return reshape


def _missing(record: dict, name: str, flag: str) -> BadRecord:
    return BadRecord(f"{flag} names field '{name}', which this record lacks (it has: {', '.join(record) or 'nothing'}); "
                     f"add --require {name} to drop such records")


def counted_texts(record: dict, fields: list[str] | None) -> list[str]:
    """The texts whose length is counted: `fields` (null or missing count as "", like jq's length, and
    anything else that is not text is a bad record), or with `fields=None` every text field."""
    if fields is None:
        return [value for value in record.values() if isinstance(value, str)]
    texts = []
    for name in fields:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise not_text(name, value)
        texts.append(value)
    return texts


def not_text(name: str, value: Any) -> BadRecord:
    """The bad-record error for a counted field whose value is not a string."""
    return BadRecord(f"field '{name}' is a JSON {json_type(value)}, not text, so its characters cannot be counted; "
                     "fix the record or name the text fields with --count-fields")


def kept_fields(options: PrepareOptions) -> list[str]:
    """The fields --rename/--select keep ([] when neither is given: every field stays)."""
    return options.select or [new for _, new in options.rename]


def counted_fields(options: PrepareOptions) -> list[str] | None:
    """The fields whose characters and tokens are counted; None means every text field."""
    return options.count_fields or kept_fields(options) or None


def char_step(options: PrepareOptions) -> Step:
    """Count the counted fields' characters, keep the record if in range, and add the count if asked."""
    fields = counted_fields(options)

    def chars(record: dict):
        count = 0
        for name in fields or record:
            value = record.get(name)
            if type(value) is str:
                count += len(value)
            elif value is not None and fields:
                raise not_text(name, value)
        return _keep_in_range(record, count, options.min_chars, options.max_chars, options.char_count)
    return chars


def token_step(options: PrepareOptions) -> Step:
    """Like `char_step` for tokens; loads the tokenizer once, when the step is built."""
    tokenizer, fields = options.load_tokenizer(options.tokenizer), counted_fields(options)

    def tokens(record: dict):
        count = token_count(tokenizer, counted_texts(record, fields))
        return _keep_in_range(record, count, options.min_tokens, options.max_tokens, options.token_count)
    return tokens


def token_count(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    """Tokens of the texts together, without special tokens."""
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def _keep_in_range(record: dict, count: int, low: int | None, high: int | None, count_field: str | None):
    """The record (with `count_field` = count, if asked) when low <= count < high, else None."""
    if (low is not None and count < low) or (high is not None and count >= high):
        return None
    if count_field:
        record[count_field] = count
    return record


def record_digest(record: dict) -> bytes:
    """16 bytes that equal records share (keys sorted: field order does not make a record different)."""
    return hashlib.blake2b(dumps(record, sort_keys=True), digest_size=16).digest()


def build_steps(options: PrepareOptions) -> list[tuple[str, Step]]:
    """(report key, step) in the fixed order of the module docstring, up to de-duplication."""
    steps = []
    if options.require:
        steps.append(("require", require_step(options.require)))
    if options.rename or options.select:
        steps.append(("reshape", reshape_step(options.rename, options.select)))
    if options.char_count or options.min_chars is not None or options.max_chars is not None:
        steps.append(("chars", char_step(options)))
    if options.token_count or options.min_tokens is not None or options.max_tokens is not None:
        if not options.tokenizer:
            raise TunesmithError("token counts need a tokenizer: add --tokenizer PATH (a model or tokenizer folder).")
        if options.load_tokenizer is None:
            raise TunesmithError("token counts need a way to load the tokenizer: set PrepareOptions.load_tokenizer "
                                 "(the CLI passes the model layer's load_tokenizer).")
        steps.append(("tokens", token_step(options)))
    return steps


def make_pipeline(options: PrepareOptions) -> Pipeline:
    """(steps, digest function or None): what runs per record wherever records are parsed. De-duplication
    only hashes there; which copy is first is decided in input order by `Sink`."""
    fields = options.dedup
    digest = None if fields is None else (lambda record: record_digest({k: record.get(k) for k in fields}
                                                                      if fields else record))
    return build_steps(options), digest


class Sample:
    """A uniform random sample of `size` records: each surviving record draws a random key and the `size`
    smallest keys win (reservoir sampling by random keys; memory holds `size` records). Whoever parses a
    record can drop it without serialising it once its key is not below `threshold()`."""

    def __init__(self, size: int):
        self.size, self.heap = size, []  # (-key, position, item): the largest winning key on top

    def threshold(self) -> float:
        """Keys at or above this cannot make the sample (infinite while the reservoir is not full)."""
        if self.size == 0:
            return 0.0
        return -self.heap[0][0] if len(self.heap) == self.size else math.inf

    def offer(self, key: float, position: int | tuple[int, int], item: bytes) -> None:
        """Put `item` in the sample if its key is among the `size` smallest so far."""
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, (-key, position, item))
        elif key < -self.heap[0][0]:
            heapq.heapreplace(self.heap, (-key, position, item))

    def in_order(self) -> list:
        """The sampled items in input order (by position), not key order."""
        return [item for _, _, item in sorted(self.heap, key=lambda entry: entry[1])]


class Sink:
    """Where surviving records go, in input order: de-duplication, then the sample or the output file."""

    def __init__(self, writer: AtomicWriter, options: PrepareOptions, counts: Counter):
        self.writer, self.counts, self.seen, self.survivors = writer, counts, set(), 0
        self.sample = None if options.sample is None else Sample(options.sample)

    def threshold(self) -> float:
        """The sample's key threshold; infinite without a sample (every record is needed)."""
        return self.sample.threshold() if self.sample else math.inf

    def add(self, position: int | tuple[int, int], key: float | None, record_json: bytes | None,
            digest: bytes | None) -> None:
        """Take the next surviving record in input order: drop it if a duplicate, else sample or write it."""
        if digest is not None:
            if digest in self.seen:
                self.counts["dedup"] += 1
                return
            self.seen.add(digest)
        self.survivors += 1
        if self.sample is None:
            self.writer.write_json(record_json)
        elif record_json is not None:
            self.sample.offer(key, position, record_json)

    def close(self) -> None:
        """Write the sample, in input order, and count the records it left out."""
        if self.sample is not None:
            kept = self.sample.in_order()
            self.counts["sample"] = self.survivors - len(kept)
            for record_json in kept:
                self.writer.write_json(record_json)


def run_sequential(pipeline: Pipeline, seed: int, bad: BadRecords, counts: Counter, sink: Sink) -> None:
    """Any format and layout, one record at a time."""
    steps, digest = pipeline
    keys = random.Random(f"{seed}")
    for where, record in good_records(bad):
        try:
            record = apply_steps(steps, record, counts)
            if record is not None:
                sink.add(where, keys.random(), dumps(record), digest(record) if digest else None)
        except BadRecord as err:
            bad.add(where, str(err))


def run_parallel(pipeline: Pipeline, options: PrepareOptions, bad: BadRecords, counts: Counter, sink: Sink, layout: Layout,
                 workers: int) -> bool:
    """JSON lines or an array, in blocks on `workers` processes; False if the array's layout breaks (the
    caller then starts over sequentially)."""
    line, shape = layout.first_line, []
    for block in run_blocks(bad.path, layout, pipeline, (make_pipeline, options), workers, sink.threshold):
        if block is None or block.broken:
            return False
        for index, reason in block.bad:
            bad.add(line + index, reason)
        counts.update(block.drops)
        for index, key, record_json, digest in block.kept:
            sink.add((block.begin, index), key, record_json, digest)
        sink.survivors += block.unsent
        shape.append(block.shape)
        line += block.newlines
    return layout.kind == "lines" or ARRAY_SHAPE.fullmatch(b"".join(shape)) is not None


def prepare(input_path: str | Path, output_path: str | Path, options: PrepareOptions, workers: int | None = None
            ) -> Report:
    """Run the steps over `input_path` and write the survivors to `output_path` (atomically).

    JSON lines and JSON arrays run in blocks on `workers` processes (default: every core); see `blocks.py`.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    check_paths(input_path, output_path)
    check_options(options)
    pipeline = make_pipeline(options)  # a bad option or tokenizer fails here, before any worker starts
    layout = line_layout(input_path)
    report = None
    if layout:
        report = _run(input_path, output_path, options, pipeline, layout, workers or usable_cores())
    return report or _run(input_path, output_path, options, pipeline, None, 1)


def check_options(options: PrepareOptions) -> None:
    """Reject negative limits and --count-fields that --rename/--select would drop, before reading anything."""
    for name in ("min_chars", "max_chars", "min_tokens", "max_tokens", "sample"):
        value = getattr(options, name)
        if value is not None and value < 0:
            raise TunesmithError(f"--{name.replace('_', '-')} {value}: must be 0 or more.")
    kept = kept_fields(options)
    gone = [name for name in options.count_fields if kept and name not in kept]
    if gone:  # they would count 0 in every record, and the filter would pass everything
        raise TunesmithError(f"--count-fields {','.join(gone)}: --rename/--select keep only {','.join(kept)}; "
                             "count fields by the names they have after renaming.")


def usable_cores() -> int:
    """The cores this process may run on (a container's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(input_path: Path, output_path: Path, options: PrepareOptions, pipeline: Pipeline, layout: Layout | None,
         workers: int) -> Report | None:
    """One attempt: in parallel when `layout` is given (None if the file breaks it), else sequentially."""
    report = Report(bad=BadRecords(input_path, options.skip_bad))
    with AtomicWriter(output_path) as writer:
        sink = Sink(writer, options, report.counts)
        if layout is None:
            run_sequential(pipeline, options.seed, report.bad, report.counts, sink)
        elif not run_parallel(pipeline, options, report.bad, report.counts, sink, layout, workers):
            writer.abandon()
            return None
        sink.close()
    report.counts.update(read=report.bad.count + sum(report.counts.values()) + writer.count, written=writer.count)
    return report


def parse_rename(text: str) -> list[tuple[str, str]]:
    """"a:b,c:d" -> [("a", "b"), ("c", "d")]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        old, sep, new = item.partition(":")
        if not sep or not old or not new:
            raise TunesmithError(f"--rename item '{item}' is not old:new; write e.g. --rename input_text:prompt")
        pairs.append((old, new))
    return pairs
