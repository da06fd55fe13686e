"""rollouts.jsonl: a few of a step's real rollouts, token by token, for a board to colour and step through.

Every log_rollouts_steps steps (the loop's `Stage.log_samples`), rank 0 appends the first prompt's group
of answers (grpo, ppo with num_generations > 1), or the first 2 answers (ppo with one per prompt), with
the numbers the stage computed for them, not recomputed: what the policy gave each token when it was
sampled, the reference, the KL estimate the stage uses, the critic's values, the advantages the update
uses and the score. Keeping them costs nothing between log steps but a reference to that step's few
rows of the rollout; the copy to the CPU happens only when a line is written.

One line per answer (README: "What a run writes"):
    step, sample, group, prompt, tokens, token_ids, logprobs, ref_logprobs, kl, values, advantages,
    sampler_logprobs, is_weights, reward, score, rewards (several reward functions only), truncated, trained
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import OutputArgs
from tunesmith.training.distributed import process_info
from tunesmith.training.rollout import Rollout
from tunesmith.training.sample_logs import ROLLOUTS_FILE, append_lines, token_texts

TOKEN_FIELDS = {"logprobs": "old_logps", "ref_logprobs": "ref_logps", "kl": "kl", "values": "old_values",
                "advantages": "advantages", "sampler_logprobs": "sampler_logps", "is_weights": "is_weights"}
"""Per-token lists of a line, and the Rollout tensor each comes from (None where the stage has none)."""


class RolloutLog:
    """The latest step's logged answers, written to rollouts.jsonl when the loop says a step is due."""

    def __init__(self, output_dir: Path, tokenizer: object) -> None:
        self.path, self.tokenizer = output_dir / ROLLOUTS_FILE, tokenizer
        self.kept: Rollout | None = None
        self.reward_parts: dict[str, list[float]] = {}
        self.group = 1

    def keep(self, rollout: Rollout, group: int) -> None:
        """Remember this step's logged answers: the first prompt's `group`, or the first 2 of single answers."""
        count = min(len(rollout), group if group > 1 else 2)
        self.kept, self.group = rollout.select(list(range(count))), group
        self.reward_parts = {name: list(values[:count]) for name, values in rollout.reward_parts.items()}

    def write(self, model: torch.nn.Module, step: int) -> None:
        """Append the kept answers as the lines of `step` (nothing before the first rollout)."""
        if self.kept is None:
            return
        output_dir = self.path.parent
        output_dir.mkdir(parents=True, exist_ok=True)
        append_lines(self.path, rollout_lines(self.kept, step, self.group, self.tokenizer, self.reward_parts))
        self.kept = None


def rollout_log(output: OutputArgs, tokenizer: object) -> RolloutLog | None:
    """Rank 0's RolloutLog when log_rollouts_steps is on; None elsewhere (nothing is kept or written)."""
    if not output.log_rollouts_steps or not process_info().is_main:
        return None
    return RolloutLog(Path(output.output_dir), tokenizer)


def rollout_lines(rollout: Rollout, step: int, group: int, tokenizer: object,
                  reward_parts: dict[str, list[float]]) -> list[dict]:
    """One rollouts.jsonl record per answer of `rollout` (its first answers, prompt-major)."""
    per_token = {name: _rows(getattr(rollout, attr), rollout) for name, attr in TOKEN_FIELDS.items()}
    reward, score = rollout.scores.tolist(), rollout.raw_scores.tolist()
    stopped, trained = rollout.stopped.tolist(), rollout.mask.any(dim=1).tolist()
    lines = []
    for i, answer in enumerate(rollout.response_ids):
        line = {"step": step, "sample": i, "group": i // group,
                "prompt": tokenizer.decode(rollout.prompt_ids[i], skip_special_tokens=False),
                "tokens": token_texts(tokenizer, answer), "token_ids": list(answer)}
        line.update({name: None if rows is None else rows[i][:len(answer)] for name, rows in per_token.items()})
        line.update(reward=reward[i], score=score[i])
        if reward_parts:
            line["rewards"] = {name: values[i] for name, values in reward_parts.items()}
        line.update(truncated=not stopped[i], trained=trained[i])
        lines.append(line)
    return lines


def _rows(values: torch.Tensor | None, rollout: Rollout) -> list[list[float]] | None:
    """[answers, T] values as lists (GRPO's one advantage per answer repeated over its tokens)."""
    if values is None:
        return None
    if values.ndim == 1:
        values = values[:, None].expand(-1, rollout.mask.shape[1])
    return values.detach().float().cpu().tolist()
