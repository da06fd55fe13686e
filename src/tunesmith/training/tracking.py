"""Where training progress goes: trainer_log.jsonl (LLaMA-Factory's fields), the report_to trackers, the loss plot.

Only rank 0 writes, so the same code runs unchanged under torchrun.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tunesmith.training.run_files import CONFIG_FILE
from tunesmith.training.trackers import TrackedRun, chosen_trackers, start_trackers

LOG_FILE = "trainer_log.jsonl"
COUNTERS = ("current_steps", "total_steps", "percentage")
"""Fields of a log line that are not metrics: current_steps is the trackers' step (x axis), the others follow."""


class Tracker:
    """Appends one JSON line per logging step and sends its numbers to the report_to trackers (rank 0 only)."""

    def __init__(self, output_dir: Path, report_to: list[str], is_main: bool) -> None:
        self.path = output_dir / LOG_FILE
        self.is_main = is_main
        self.trackers = start_trackers(report_to, _tracked_run(output_dir)) if is_main else []

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line (rank 0 only); its numbers also go to each tracker at current_steps."""
        if not self.is_main:
            return
        with open(self.path, "a") as handle:
            handle.write(strict_json(record) + "\n")
        metrics = scalars(record)
        for tracker in self.trackers:
            tracker.log(metrics, record["current_steps"])

    def close(self) -> None:
        """Finish every tracker (once); the JSON log is closed after every line already."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """What trackers plot of a log line: its numbers under their own names, less the COUNTERS, the time
    strings and non-finite values (which trainer_log.jsonl writes as null)."""
    return {key: value for key, value in record.items()
            if key not in COUNTERS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def _tracked_run(output_dir: Path) -> TrackedRun:
    """The run as trackers see it: named `run_name` (LLaMA-Factory's key) or after output_dir, its params the
    train_config.yaml run.py wrote."""
    config_path = output_dir / CONFIG_FILE
    config = (yaml.safe_load(config_path.read_text()) if config_path.exists() else {}) or {}
    return TrackedRun(name=config.get("run_name") or output_dir.resolve().name, output_dir=output_dir, config=config)


def strict_json(record: dict[str, Any], indent: int | None = None) -> str:
    """JSON that every parser reads: a NaN or infinite value is written as null (json.dumps would write NaN)."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in record.items()}
    return json.dumps(clean, indent=indent, allow_nan=False)


def truncate_log(output_dir: Path, after_step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log reads as one run."""
    path = output_dir / LOG_FILE
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("current_steps", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The records of trainer_log.jsonl in order, or [] before the first logging step wrote it."""
    path = output_dir / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(output_dir: Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> list[Path]:
    """training_<key>.png for each key present in the log: raw curve plus an exponential moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    written = []
    for key in keys:
        points = [(r["current_steps"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        steps, values = zip(*points)
        figure = plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, _smooth(values), color="#1f77b4", label="smoothed")
        plt.title(f"{key} of {output_dir}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = output_dir / f"training_{key.replace('/', '_')}.png"
        figure.savefig(path, format="png", dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _smooth(values: Sequence[float]) -> list[float]:
    """LLaMA-Factory's smoothing: an EMA whose weight grows with the number of points."""
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def require_reporter(report_to: list[str]) -> None:
    """Fail before any work when report_to names a tracker whose package is not installed."""
    chosen_trackers(report_to)
