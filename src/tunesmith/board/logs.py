"""trainer_log.jsonl as chart series, read incrementally and thinned for display.

A run appends one JSON line per logging step (LLaMA-Factory's fields, so LLaMA-Factory's own output
folders read the same). `LogFile` parses only the bytes appended since its last read, so a board that
polls a training run every second does a small read each time; a file that shrank (a resumed run
truncates its log) is read again from the start. Each metric is kept as a `Series` (x = step and
x = seconds since the start), extended as lines arrive; `chart_groups` pairs each `eval_<m>` with `<m>`
so train and eval share a chart. `thin_indices` keeps a long series drawable: per bucket its first,
lowest, highest and last points, so spikes survive (100k lines become a few thousand points).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import orjson

NOT_METRICS = frozenset({"current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time"})


class LogFile:
    """A JSONL file's records, re-read from where the last read stopped; with `charted`, its metric
    series too, extended with each new record (so a poll of a 100k-line log costs only the new lines)."""

    def __init__(self, path: Path, charted: bool = False) -> None:
        self.path, self.charted = path, charted
        self.lock = threading.Lock()  # requests run on a thread pool: one reads new bytes at a time
        self._start_over()

    def _start_over(self) -> None:
        self.offset, self.records, self.partial = 0, [], b""
        self.series: dict[str, Series] = {}

    def refresh(self) -> list[dict]:
        """Every complete record so far (a line still being written waits for its newline). Hold `lock`
        while reading `records` or `series` if other threads may refresh meanwhile."""
        with self.lock:
            return self._read_new()

    def _read_new(self) -> list[dict]:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size < self.offset:  # truncated or replaced: start over
            self._start_over()
        if size > self.offset:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = self.partial + handle.read(size - self.offset)
            self.offset = size
            *lines, self.partial = chunk.split(b"\n")
            new = [record for record in map(_parse, lines) if record is not None]
            self.records.extend(new)
            if self.charted:
                add_to_series(self.series, new)
        return self.records

    @property
    def version(self) -> int:
        """Changes whenever new bytes were read: a client that saw this version needs nothing new."""
        return self.offset


def _parse(line: bytes) -> dict | None:
    """One record, or None for a blank or damaged line (a log is never worth refusing to show)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class Series:
    """One metric's points as columns: step, seconds since the start (None when unknown), value."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.values = [], [], []

    def __len__(self) -> int:
        return len(self.values)

    def points(self, max_points: int | None = None) -> list[list]:
        """[[step, seconds, value], ...], thinned to about `max_points` when longer."""
        kept = range(len(self)) if max_points is None else thin_indices(self.values, max_points)
        return [[self.steps[i], self.seconds[i], self.values[i]] for i in kept]


def add_to_series(series: dict[str, Series], records: list[dict]) -> None:
    """Append every numeric field of `records` (log order) to its metric's series."""
    for record in records:
        step = record.get("current_steps")
        if not isinstance(step, (int, float)):
            continue
        seconds = elapsed_seconds(record.get("elapsed_time"))
        for key, value in record.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                column = series.get(key) or series.setdefault(key, Series())
                column.steps.append(step)
                column.seconds.append(seconds)
                column.values.append(value)


def chart_series(records: list[dict]) -> dict[str, list[list]]:
    """{metric: [[step, seconds, value], ...]} for every numeric field, in log order."""
    series: dict[str, Series] = {}
    add_to_series(series, records)
    return {name: column.points() for name, column in series.items()}


def thin_indices(values: list[float], max_points: int) -> list[int]:
    """The indices of at most about `max_points` of `values` to draw: per bucket its first, lowest, highest
    and last, so spikes survive; all of them when there are few."""
    count = len(values)
    if count <= max_points:
        return list(range(count))
    buckets = max(max_points // 4, 1)
    size = -(-count // buckets)  # ceil: equal buckets, the last one padded
    padded = np.full(buckets * size, np.nan)
    padded[:count] = values
    grid = padded.reshape(buckets, size)
    starts = np.arange(buckets) * size
    live = starts < count
    lows = starts[live] + np.nanargmin(grid[live], axis=1)
    highs = starts[live] + np.nanargmax(grid[live], axis=1)
    lasts = np.minimum(starts[live] + size, count) - 1
    return np.unique(np.concatenate([starts[live], lows, highs, lasts])).tolist()


def thin(points: list[list], max_points: int) -> list[list]:
    """At most about `max_points` of [step, seconds, value] points (see `thin_indices`), in order."""
    return [points[i] for i in thin_indices([p[2] for p in points], max_points)]


def elapsed_seconds(text: object) -> float | None:
    """transformers' "H:MM:SS" (or "2 days, H:MM:SS") elapsed_time in seconds."""
    if not isinstance(text, str):
        return None
    try:
        days = 0
        if "day" in text:
            head, _, text = text.partition(", ")
            days = int(head.split()[0])
        hours, minutes, seconds = (float(part) for part in text.split(":"))
    except (ValueError, IndexError):
        return None
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


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
