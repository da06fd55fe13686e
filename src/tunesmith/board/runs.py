"""The runs under the board's root: where they are, what they are, how far they got, whether they live.

A run folder is one holding train_config.yaml or trainer_log.jsonl (tunesmith's and LLaMA-Factory's
output_dir). A run is named by its path relative to the root; `RunFolders.resolve` turns a name back
into a folder only when it stays under the root (no `..`, no absolute path, no symlink out), which is
the board's one rule for reading files. Status comes from run_status.json (training/heartbeat.py):
a "running" run whose heartbeat is older than a few beats died without saying so and reads as failed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from tunesmith.board.logs import LogFile, last_value, read_json
from tunesmith.training.run_files import CONFIG_FILE, CONSOLE_FILE, RESULTS_FILE, STATUS_FILE
from tunesmith.training.sample_logs import PAIRS_FILE, ROLLOUTS_FILE
from tunesmith.training.tracking import LOG_FILE

SKIPPED = {"node_modules", "__pycache__", ".git"}  # folders no run lives in
STATES = ("running", "finished", "failed", "stopped")
READ_FILES = (CONFIG_FILE, LOG_FILE, STATUS_FILE, RESULTS_FILE, CONSOLE_FILE, ROLLOUTS_FILE, PAIRS_FILE)
"""The files of a run the board shows: none may lead out of the root."""
MISSED_BEATS = 4  # a running status this many heartbeats old belongs to a dead process
MAX_DEPTH = 6


class NotARun(LookupError):
    """The name is not a run folder under the root (the server answers 404, saying nothing more)."""


@dataclass
class RunFolders:
    """The root and a per-run log cache, so polling re-reads only new lines."""

    root: Path
    logs: dict[Path, LogFile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    def names(self) -> list[str]:
        """Every run folder under the root, by relative name (symlinked folders are not followed)."""
        found = []
        for folder, subfolders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            is_run = CONFIG_FILE in files or LOG_FILE in files
            if is_run:
                found.append(Path(folder).relative_to(self.root).as_posix())
            skipped = SKIPPED | ({"runs"} if is_run else set())  # a run's tensorboard folder holds no run
            subfolders[:] = [] if depth >= MAX_DEPTH else sorted(
                name for name in subfolders if name not in skipped and not name.startswith((".", "checkpoint-")))
        return sorted(found)

    def resolve(self, name: str) -> Path:
        """The run folder called `name`, or NotARun when it is no run folder inside the root."""
        parts = PurePosixPath(name).parts
        if not name or "\\" in name or "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts:
            raise NotARun(name)
        folder = (self.root / name).resolve()
        if not folder.is_relative_to(self.root) or not folder.is_dir():
            raise NotARun(name)
        if not ((folder / CONFIG_FILE).is_file() or (folder / LOG_FILE).is_file()):
            raise NotARun(name)
        if any(not (folder / file).resolve().is_relative_to(self.root) for file in READ_FILES):
            raise NotARun(name)  # a file the board would show is a symlink out of the root
        return folder

    def records(self, folder: Path, file_name: str = LOG_FILE) -> LogFile:
        """One of the run's JSONL files (trainer_log.jsonl unless named), refreshed."""
        log = self.logs.get(folder / file_name) or self.logs.setdefault(
            folder / file_name, LogFile(folder / file_name, charted=file_name == LOG_FILE))
        log.refresh()
        return log

    def summary(self, name: str) -> dict:
        """One line of the runs table."""
        folder = self.resolve(name)
        config = read_config(folder)
        log = self.records(folder)
        status = run_status(folder)
        with log.lock:  # another request may be extending the records
            records = log.records
            return {
                "name": name, "stage": config.get("stage", "sft"), "model": config.get("model_name_or_path"),
                "dataset": _as_text(config.get("dataset")), "finetuning_type": config.get("finetuning_type"),
                "status": status["status"], "error": status.get("error"),
                "step": last_value(records, "current_steps"), "total_steps": last_value(records, "total_steps"),
                "loss": last_value(records, "loss"), "score": last_value(records, "score", "reward", "eval_loss"),
                "tokens_per_second": last_value(records, "tokens_per_second"),
                "started": status.get("started") or _modified(folder / CONFIG_FILE) or _modified(folder / LOG_FILE),
                "updated": status.get("updated") or _modified(folder / LOG_FILE),
            }


def read_config(folder: Path) -> dict:
    """train_config.yaml as a mapping ({} when missing or unreadable)."""
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8", errors="replace"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def run_status(folder: Path, now: float | None = None) -> dict:
    """{"status": running | finished | failed | stopped | unknown, ...the status file's fields}."""
    status = read_json(folder / STATUS_FILE)
    if status is None or status.get("status") not in STATES:  # no heartbeat (an older run, LLaMA-Factory's)
        return {"status": "finished" if (folder / RESULTS_FILE).is_file() else "unknown"}
    if status["status"] == "running":
        age = (now or time.time()) - _number(status.get("updated"))
        if age > MISSED_BEATS * (_number(status.get("heartbeat_seconds")) or 5) + 5:
            return {**status, "status": "failed",
                    "error": f"the process stopped reporting {age:.0f} s ago without saying why (killed?)"}
    return status


def checkpoints(folder: Path) -> list[dict]:
    """The run's checkpoint-N folders: step, name, size in bytes, time written. Symlinks are not followed,
    and a checkpoint removed while it is measured (rotation, a save in progress) is left out."""
    found = []
    for path in folder.iterdir():
        name = path.name
        if not (name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit()) or path.is_symlink():
            continue
        try:
            size = sum(os.lstat(os.path.join(where, file)).st_size
                       for where, _, files in os.walk(path) for file in files)
            found.append({"name": name, "step": int(name.split("-")[1]), "bytes": size, "written": path.stat().st_mtime})
        except OSError:
            continue
    return sorted(found, key=lambda c: c["step"])


def tail(path: Path, lines: int = 200, max_bytes: int = 256_000) -> str:
    """The last `lines` lines of a text file (read from its end, so a huge log costs little)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.stat(path).st_size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _number(value: object) -> float:
    """A status file's time or interval as a number (0 when it is not one)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _modified(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _as_text(value: object) -> str | None:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return None if value is None else str(value)
