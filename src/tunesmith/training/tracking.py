"""Where training progress goes: trainer_log.jsonl (LLaMA-Factory's fields), tensorboard, the loss plot.

Only rank 0 writes, so the same code runs unchanged under torchrun.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

LOG_FILE = "trainer_log.jsonl"


class Tracker:
    """Appends one JSON line per logging step and mirrors scalars to tensorboard when asked."""

    def __init__(self, output_dir: Path, report_to: str, is_main: bool) -> None:
        self.path = output_dir / LOG_FILE
        self.is_main = is_main
        self.writer = _tensorboard_writer(output_dir) if report_to == "tensorboard" and is_main else None

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line (rank 0 only); its float fields also go to tensorboard at current_steps."""
        if not self.is_main:
            return
        with open(self.path, "a") as handle:
            handle.write(strict_json(record) + "\n")
        if self.writer is not None:
            step = record["current_steps"]
            for key, value in record.items():
                if isinstance(value, float) and key not in ("epoch", "percentage"):
                    self.writer.add_scalar(f"train/{key}" if "eval" not in key else key.replace("_", "/", 1), value, step)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the tensorboard writer, if any; the JSON log is closed after every line already."""
        if self.writer is not None:
            self.writer.close()


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


def require_reporter(report_to: str) -> None:
    """Fail before any work when report_to names a package that is not installed."""
    if report_to != "tensorboard":
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise TunesmithError(
            "report_to: tensorboard needs the tensorboard package: `pip install tensorboard` "
            "(or `pip install tunesmith[tensorboard]`), or set report_to: none.") from None


def _tensorboard_writer(output_dir: Path) -> SummaryWriter:
    """A writer into output_dir/runs, where transformers' Trainer also puts its tensorboard logs."""
    require_reporter("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output_dir / "runs"))
