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
are counted and reported. The output is written atomically (see `streams.AtomicWriter`), the input
is only read. Memory stays flat: the reservoir holds `sample` records, dedup one 16-byte hash each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.formats import BadRecord
from tunesmith.data.streams import AtomicWriter, BadRecords, good_records
from tunesmith.errors import TunesmithError

Step = Callable[[dict], "dict | None"]


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
        c = self.counts
        parts = [f"read {c['read']}"] + [f"{label} {c[key]}" for key, label in DROP_LABELS if c[key]]
        parts += [f"bad {self.bad.count} (skipped)"] if self.bad.count else []
        return ", ".join(parts + [f"written {c['written']}"])


DROP_LABELS = [("require", "dropped by --require"), ("chars", "dropped by character count"),
               ("tokens", "dropped by token count"), ("dedup", "duplicates"), ("sample", "not sampled")]


def require_step(fields: list[str]) -> Step:
    def require(record: dict):
        return record if all(record.get(name) not in (None, "") for name in fields) else None
    return require


def reshape_step(rename: list[tuple[str, str]], select: list[str]) -> Step:
    """Rename (keeping only the renamed fields), then select; a missing source field is a bad record."""
    def reshape(record: dict):
        if rename:
            record = {new: _field(record, old, "--rename") for old, new in rename}
        if select:
            record = {name: _field(record, name, "--select") for name in select}
        return record
    return reshape


def _field(record: dict, name: str, flag: str):
    try:
        return record[name]
    except KeyError:
        raise BadRecord(f"{flag} names field '{name}', which this record lacks (it has: "
                        f"{', '.join(record) or 'nothing'}); add --require {name} to drop such records") from None


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
            raise BadRecord(f"field '{name}' is a {type(value).__name__}, not text, so its characters cannot be "
                            "counted; fix the record or name the text fields with --count-fields")
        texts.append(value)
    return texts


def counted_fields(options: PrepareOptions) -> list[str] | None:
    if options.count_fields:
        return options.count_fields
    return options.select or [new for _, new in options.rename] or None


def char_step(options: PrepareOptions) -> Step:
    fields = counted_fields(options)

    def chars(record: dict):
        count = sum(len(text) for text in counted_texts(record, fields))
        if not _in_range(count, options.min_chars, options.max_chars):
            return None
        if options.char_count:
            record[options.char_count] = count
        return record
    return chars


def token_step(options: PrepareOptions) -> Step:
    from tunesmith.model.loading import load_tokenizer  # lazily: transformers only when tokens are counted

    tokenizer, fields = load_tokenizer(options.tokenizer), counted_fields(options)

    def tokens(record: dict):
        texts = counted_texts(record, fields)
        count = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
        if not _in_range(count, options.min_tokens, options.max_tokens):
            return None
        if options.token_count:
            record[options.token_count] = count
        return record
    return tokens


def _in_range(value: int, low: int | None, high: int | None) -> bool:
    return (low is None or value >= low) and (high is None or value < high)


def dedup_step(fields: list[str]) -> Step:
    """Keep the first of each group of equal records (or equal `fields`); remembers a 16-byte hash per record."""
    seen: set[bytes] = set()

    def dedup(record: dict):
        key = {name: record.get(name) for name in fields} if fields else record
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()
        if digest in seen:
            return None
        seen.add(digest)
        return record
    return dedup


def build_steps(options: PrepareOptions) -> list[tuple[str, Step]]:
    """(report key, step) in the fixed order of the module docstring."""
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
        steps.append(("tokens", token_step(options)))
    if options.dedup is not None:
        steps.append(("dedup", dedup_step(options.dedup)))
    return steps


class Reservoir:
    """A uniform sample of `size` items from a stream of unknown length (Algorithm R), kept in input order."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen, self.items = size, random.Random(seed), 0, []

    def offer(self, item) -> None:
        if self.seen < self.size:
            self.items.append((self.seen, item))
        else:
            slot = self.rng.randrange(self.seen + 1)
            if slot < self.size:
                self.items[slot] = (self.seen, item)
        self.seen += 1

    def in_order(self) -> list:
        return [item for _, item in sorted(self.items, key=lambda pair: pair[0])]


def clean_records(options: PrepareOptions, bad: BadRecords, counts: Counter):
    """The records that pass every step, in input order (sampling excluded); drops counted per step."""
    steps = build_steps(options)
    for where, record in good_records(bad):
        try:
            for key, step in steps:
                record = step(record)
                if record is None:
                    counts[key] += 1
                    break
            else:
                yield record
        except BadRecord as err:
            bad.add(where, str(err))


def prepare(input_path: str | Path, output_path: str | Path, options: PrepareOptions) -> Report:
    """Run the steps over `input_path` and write the survivors to `output_path` (atomically)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and input_path.exists() and os.path.samefile(input_path, output_path):
        raise TunesmithError(f"{output_path}: the output would overwrite the input; write to another file.")
    report = Report(bad=BadRecords(input_path, options.skip_bad))
    records = clean_records(options, report.bad, report.counts)
    with AtomicWriter(output_path) as writer:
        if options.sample is not None:
            reservoir = Reservoir(options.sample, options.seed)
            for record in records:
                reservoir.offer(record)
            records = reservoir.in_order()
            report.counts["sample"] = reservoir.seen - len(records)
        for record in records:
            writer.write(record)
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
