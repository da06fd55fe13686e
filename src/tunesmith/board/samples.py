"""rollouts.jsonl and pairs.jsonl (training/sample_logs.py) for the board's "inside the run" views.

A run logs a few samples every `log_rollouts_steps` steps. The page first asks for the index (which steps
were logged, and each step's prompts, so it can step through the answers to one prompt), then for the
samples of the step it shows; a long run's file is never sent whole.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.board.runs import RunFolders
from tunesmith.training.sample_logs import PAIRS_FILE, ROLLOUTS_FILE

FILES = {"rollouts": ROLLOUTS_FILE, "pairs": PAIRS_FILE}


def sample_payload(folders: RunFolders, folder: Path, kind: str, step: int | None = None,
                   max_steps: int | None = None) -> dict:
    """The index of logged steps (with each step's prompts), or the samples of one `step`."""
    log = folders.records(folder, FILES[kind])
    with log.lock:
        records, version = list(log.records), log.version
    if step is not None:
        return {"step": step, "records": [record for record in records if record.get("step") == step]}
    prompts: dict[int, list[str]] = {}
    for record in records:
        if isinstance(record.get("step"), int):
            shown = prompts.setdefault(record["step"], [])
            if record.get("prompt") not in shown:
                shown.append(record.get("prompt"))
    steps = spread(sorted(prompts), max_steps) if max_steps else sorted(prompts)
    return {"version": version, "steps": steps, "prompts": {str(s): prompts[s] for s in steps},
            "series": reward_series(records)}


def reward_series(records: list[dict]) -> dict[str, list[list]]:
    """Each fixed pair's implicit rewards over steps, as chart points: {"<pair>/<side>": [[step, None, reward]]}."""
    series: dict[str, list[list]] = {}
    for record in records:
        if "pair" not in record:
            continue
        for key, value in record.items():
            if key.endswith("_reward") and isinstance(value, (int, float)):
                side = key[:-len("_reward")]
                series.setdefault(f"{record['pair']}/{side}", []).append([record["step"], None, value])
    return series


def spread(steps: list[int], count: int) -> list[int]:
    """At most `count` of `steps`, evenly spaced, keeping the first and the last."""
    if len(steps) <= count:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)})
