"""trainer_log.jsonl as chart series, read incrementally and thinned for display.

A run appends one JSON line per logging step (LLaMA-Factory's fields, so LLaMA-Factory's own output
folders read the same). `LogFile` parses only the bytes appended since its last read, so a board that
polls a training run every second does a small read each time; a file that shrank (a resumed run
truncates its log) is read again from the start. `chart_series` turns the records into one series per
metric with x = step and x = seconds since the start, and pairs each `eval_<m>` with `<m>` so train
and eval share a chart. `thin` keeps a long series drawable: per bucket its first, lowest, highest and
last points, so spikes survive (100k lines become a few thousand points).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NOT_METRICS = frozenset({"current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time"})


class LogFile:
    """A JSONL file's records, re-read from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.records, self.partial = path, 0, [], b""

    def refresh(self) -> list[dict]:
        """Every complete record so far (a line still being written waits for its newline)."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size < self.offset:  # truncated or replaced: start over
            self.offset, self.records, self.partial = 0, [], b""
        if size > self.offset:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = self.partial + handle.read(size - self.offset)
            self.offset = size
            *lines, self.partial = chunk.split(b"\n")
            self.records.extend(record for record in map(_parse, lines) if record is not None)
        return self.records

    @property
    def version(self) -> int:
        """Changes whenever new bytes were read: a client that saw this version needs nothing new."""
        return self.offset


def _parse(line: bytes) -> dict | None:
    """One record, or None for a blank or damaged line (a log is never worth refusing to show)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def elapsed_seconds(text: object) -> float | None:
    """transformers' "H:MM:SS" (or "2 days, H:MM:SS") elapsed_time in seconds."""
    if not isinstance(text, str):
        return None
    days = 0
    if "day" in text:
        head, _, text = text.partition(", ")
        days = int(head.split()[0])
    try:
        hours, minutes, seconds = (float(part) for part in text.split(":"))
    except ValueError:
        return None
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def chart_series(records: list[dict]) -> dict[str, list[list[float | None]]]:
    """{metric: [[step, seconds, value], ...]} for every numeric field, in log order."""
    series: dict[str, list[list[float | None]]] = {}
    for record in records:
        step = record.get("current_steps")
        if not isinstance(step, (int, float)):
            continue
        seconds = elapsed_seconds(record.get("elapsed_time"))
        for key, value in record.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append([step, seconds, value])
    return series


FIRST_CHARTS = ("loss", "reward", "score", "kl", "rewards/chosen", "rewards/margins", "rewards/accuracies", "lr",
                "grad_norm", "tokens_per_second")


def chart_groups(names: list[str]) -> dict[str, list[str]]:
    """Charts by metric: each eval_<m> joins <m>'s chart when <m> is logged, else gets its own. The
    charts a reader looks at first come first, then the rest by name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        base = name[len("eval_"):] if name.startswith("eval_") else name
        groups.setdefault(base if base in names else name, []).append(name)
    rank = {name: i for i, name in enumerate(FIRST_CHARTS)}
    return dict(sorted(groups.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def thin(points: list[list], max_points: int) -> list[list]:
    """At most about `max_points` points: per bucket its first, lowest, highest and last (in order)."""
    if len(points) <= max_points:
        return points
    buckets = max(max_points // 4, 1)
    size = len(points) / buckets
    kept: list[list] = []
    for b in range(buckets):
        bucket = points[int(b * size):int((b + 1) * size)]
        if not bucket:
            continue
        lowest = min(bucket, key=lambda p: p[2])
        highest = max(bucket, key=lambda p: p[2])
        chosen = {id(p): p for p in (bucket[0], lowest, highest, bucket[-1])}
        kept.extend(sorted(chosen.values(), key=lambda p: (p[0], p[1] or 0)))
    return kept


def last_value(records: list[dict], *keys: str) -> float | None:
    """The latest logged value of the first of `keys` that was ever logged."""
    for key in keys:
        for record in reversed(records):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
    return None


def read_json(path: Path) -> dict | None:
    """A small JSON file, or None when it is missing or damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
