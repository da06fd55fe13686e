"""The sample logs a run board reads beside trainer_log.jsonl: rollouts.jsonl (ppo, grpo) and pairs.jsonl (dpo, kto).

Each line is one JSON object for one sample at one optimizer step (`step`, as trainer_log.jsonl's
current_steps); training/rollout_log.py and training/pair_log.py build the lines, this module owns the
files: appending strict JSON (a NaN or infinity is written as null), the token texts a board colours
one by one, and, on resume, dropping the lines a checkpoint does not cover, as `truncate_log` does for
trainer_log.jsonl. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROLLOUTS_FILE = "rollouts.jsonl"
PAIRS_FILE = "pairs.jsonl"
SAMPLE_LOGS = (ROLLOUTS_FILE, PAIRS_FILE)


def append_lines(path: Path, records: list[dict]) -> None:
    """Append one strict-JSON line per record."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps(_finite(record), allow_nan=False) + "\n" for record in records)


def _finite(value: object) -> object:
    """`value` with every non-finite float, at any depth, as None; floats keep 9 significant digits, which
    give back the stage's float32 numbers exactly and write about half the characters of a double."""
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def reset_sample_logs(output_dir: Path, resumed_step: int | None) -> None:
    """A resumed run keeps the lines up to its checkpoint's step (the steps after it are run again); a
    fresh run drops the files, as run.py drops an old trainer_log.jsonl."""
    for name in SAMPLE_LOGS:
        path = output_dir / name
        if not path.exists():
            continue
        if resumed_step is None:
            path.unlink()
            continue
        steps = [(line, _step(line)) for line in path.read_text().splitlines()]
        kept = [line for line, step in steps if step is not None and step <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))


def _step(line: str) -> int | None:
    """A line's step; None for a line a kill cut short (the resumed run writes its step again)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def token_texts(tokenizer: object, ids: list[int]) -> list[str]:
    """The text of each token, so that the texts concatenate to the decoded tokens: token k's text is what
    decoding up to it adds to decoding up to the token before (byte-level tokens alone decode to broken
    characters, and SentencePiece drops a word's leading space at the start of a decode). A token that
    ends inside a multi-byte character gets "" and the token that completes it the whole character.
    Each decode starts at the last token given out, so the work stays linear in the answer's length."""
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False)  # noqa: E731
    texts, start, shown = [], 0, ""
    for end in range(1, len(ids) + 1):
        text = decode(ids[start:end])
        if text.endswith("\ufffd") and end < len(ids):  # an unfinished character: wait for its last byte
            texts.append("")
            continue
        texts.append(text[len(shown):] if text.startswith(shown) else decode(ids[end - 1:end]))
        start, shown = end - 1, decode(ids[end - 1:end])
    return texts
