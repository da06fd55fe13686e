"""`tunesmith data stats`: record count, totals, percentiles and a histogram of record lengths or a field.

    tunesmith data stats out.jsonl --field char_cnt        # = jq -c ".char_cnt // 0" | awk '{s+=$1} END {print s}'
    tunesmith data stats out.jsonl                         # characters of every text field, per record
    tunesmith data stats out.jsonl --tokenizer saves/m     # and tokens under that tokenizer

A numeric `--field` is summed as jq's `.field // 0` does (missing, null and false count 0); any
other type is a bad record. One 8-byte number per record is kept, for exact percentiles.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunesmith.data.formats import BadRecord
from tunesmith.data.streams import BadRecords, good_records, json_type
from tunesmith.datatools.prepare import counted_texts, token_count
from tunesmith.errors import TunesmithError

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Column:
    """One measured quantity over all records."""

    name: str
    values: array

    def summary(self) -> dict:
        """total, mean, min, max and the PERCENTILES of the values (just total 0 when there are none)."""
        values = sorted(self.values)
        if not values:
            return {"total": 0}
        total = sum(values)
        out = {"total": int(total) if float(total).is_integer() else total, "mean": total / len(values),
               "min": values[0], "max": values[-1]}
        out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def histogram(values: Sequence[float], bins: int) -> list[tuple[float, float, int]]:
    """(low, high, count) for `bins` equal-width bins over [min, max]; the last bin includes max."""
    if bins < 1:
        raise TunesmithError(f"--bins {bins}: a histogram needs at least 1 bin.")
    if not values:
        return []
    low, high = min(values), max(values)
    width = (high - low) / bins or 1
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width, count) for i, count in enumerate(counts)]


def field_value(record: dict, name: str, from_csv: bool) -> float:
    """The field as a number, as jq's `.field // 0` reads it (CSV text parsed); other types are bad records."""
    value = record.get(name)
    if value is None or value is False or (from_csv and value == ""):  # jq's `// 0`
        return 0
    if from_csv and isinstance(value, str):  # CSV keeps every value as text
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"field '{name}' is a JSON {json_type(value)} ({str(value)[:40]!r}), not a number")
    return value


def collect(bad: BadRecords, field: str | None, tokenizer: Callable | None = None) -> tuple[int, list[Column]]:
    """(records, columns): the field's values, or per-record character counts (and token counts under
    `tokenizer`, a loaded Hugging Face tokenizer that the caller brings: this layer cannot load one)."""
    names = [field] if field else ["chars"] + (["tokens"] if tokenizer is not None else [])
    columns = [Column(name, array("d")) for name in names]
    records, from_csv = 0, bad.path.suffix.lower() == ".csv"
    for where, record in good_records(bad):
        try:
            row = [field_value(record, field, from_csv)] if field else _lengths(record, tokenizer)
        except BadRecord as err:
            bad.add(where, str(err))
            continue
        records += 1
        for column, value in zip(columns, row):
            column.values.append(value)
    return records, columns


def _lengths(record: dict, tokenizer) -> list[int]:
    texts = counted_texts(record, None)
    row = [sum(len(text) for text in texts)]
    if tokenizer is not None:
        row.append(token_count(tokenizer, texts))
    return row


def format_report(bad: BadRecords, records: int, columns: list[Column], bins: int) -> str:
    """The printed report: record count, then each column's summary line and its text histogram."""
    skipped = f" ({bad.count} bad records skipped)" if bad.count else ""
    lines = [f"{bad.path}: {records} records{skipped}"]
    for column in columns:
        summary = column.summary()
        lines.append(f"{column.name}: " + "  ".join(f"{key} {_number(value)}" for key, value in summary.items()))
        rows = histogram(column.values, bins)
        peak = max((count for _, _, count in rows), default=0) or 1
        for low, high, count in rows:
            lines.append(f"  {_number(low):>10} - {_number(high):<10} {'#' * round(40 * count / peak):<40} {count}")
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) and not value.is_integer() else str(int(value))
