"""pairs.jsonl: how the policy moves away from the reference on a few fixed preference rows, token by token.

Before the first step, every log_rollouts_steps steps and at the last (the loop's `Stage.log_samples`),
every rank scores the first LOGGED_PAIRS training rows (the same rows for the whole run) with the
policy, in eval mode and without gradient (under fsdp a forward needs every rank), and rank 0 appends
one line per row. The reference's log-probs of those rows never change, so they are computed once,
when the stage is built: the model is then still the starting one, whichever reference the run has
(also the live model of precompute_ref_logprobs, and on resume before the checkpoint's weights load).

The implicit rewards are the stage's own (`PairScoring.rewards`), as its loss and metrics see them:
dpo's `preference_loss` rewards (beta x summed log-ratio for sigmoid and hinge, beta x length-averaged
log-ratio for ipo; for simpo and orpo, which have no reference, beta x the policy's length-averaged
log-prob, what dpo logs as rewards/chosen), kto's beta x summed log-ratio.

One line per row (README: "What a run writes"): step, pair, prompt, desirable (kto), and per answer side
(chosen; rejected for dpo) <side>_tokens, _token_ids, _logps, _ref_logps, _logratio, _reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import OptimArgs, RunConfig
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pairs import PairBatch
from tunesmith.model.forward import answer_token_logps, summed_by_sequence
from tunesmith.training.distributed import process_info
from tunesmith.training.loop import autocast_context, eval_mode
from tunesmith.training.reference import Reference
from tunesmith.training.sample_logs import PAIRS_FILE, append_lines, token_texts

LOGGED_PAIRS = 4

Rewards = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
"""rewards(policy sums, reference sums or None, answer lengths), each [sequences] -> [sequences] rewards."""


@dataclass(frozen=True)
class PairScoring:
    """How a stage scores its rows: their batch, which sequences of it are answers, and its implicit rewards."""

    collate: Callable[[list[dict]], PairBatch]
    """Rows -> one packed batch whose sequence s * rows + i is row i's answer of side s."""
    sides: tuple[str, ...]
    """The answers' names in the rows, in batch order: ("chosen", "rejected") for dpo, ("chosen",) for kto."""
    rewards: Rewards


class PairLog:
    """The logged rows' batch and their reference log-probs; `write` scores them with the policy."""

    def __init__(self, output_dir: Path, rows: list[dict], scoring: PairScoring, ref_tokens: torch.Tensor | None,
                 tokenizer: object, optim: OptimArgs, device: torch.device) -> None:
        self.path, self.rows, self.scoring, self.ref_tokens = output_dir / PAIRS_FILE, rows, scoring, ref_tokens
        self.tokenizer, self.optim, self.device = tokenizer, optim, device
        self.batch = scoring.collate(rows).to(device)

    def write(self, model: torch.nn.Module, step: int) -> None:
        """Score the rows with `model` (every rank) and append their lines for `step` (rank 0)."""
        with torch.no_grad(), eval_mode(model), autocast_context(self.device, self.optim):
            policy = answer_token_logps(model, self.batch, self.optim.logprob_chunk_size).float()
        if process_info().is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_lines(self.path, pair_lines(self, policy, step))


def pair_log(config: RunConfig, rows: list[dict], scoring: PairScoring, reference: Reference | None,
             tokenizer: object, device: torch.device) -> PairLog | None:
    """The stage's PairLog over the first rows, with the reference's log-probs computed now; None when
    log_rollouts_steps is 0."""
    if not config.output.log_rollouts_steps or not rows:
        return None
    log = PairLog(Path(config.output.output_dir), rows[:LOGGED_PAIRS], scoring, None, tokenizer, config.train, device)
    if reference is not None:
        with reference.use() as ref_model, autocast_context(device, config.train):
            log.ref_tokens = answer_token_logps(ref_model, log.batch, config.train.logprob_chunk_size).float()
    return log


def pair_lines(log: PairLog, policy: torch.Tensor, step: int) -> list[dict]:
    """One pairs.jsonl record per logged row, from the policy's [answer tokens] log-probs."""
    batch, ref = log.batch, log.ref_tokens
    sums, lengths = summed_by_sequence(policy, batch)
    rewards = log.scoring.rewards(sums, None if ref is None else summed_by_sequence(ref, batch)[0], lengths).tolist()
    split = _by_sequence(batch)
    token_lists = {"token_ids": split(batch.predict_targets), "logps": split(policy),
                   "ref_logps": split(ref), "logratio": split(None if ref is None else policy - ref)}
    lines = []
    for i, row in enumerate(log.rows):
        line = {"step": step, "pair": i, "prompt": log.tokenizer.decode(_prompt_ids(row), skip_special_tokens=False)}
        if "kto_desirable" in row:
            line["desirable"] = bool(row["kto_desirable"])
        for s, side in enumerate(log.scoring.sides):
            sequence = s * len(log.rows) + i
            line[f"{side}_tokens"] = token_texts(log.tokenizer, token_lists["token_ids"][sequence])
            line.update({f"{side}_{name}": None if values is None else values[sequence]
                         for name, values in token_lists.items()})
            line[f"{side}_reward"] = rewards[sequence]
        lines.append(line)
    return lines


def _by_sequence(batch: PairBatch) -> Callable[[torch.Tensor | None], list[list] | None]:
    """A function splitting [answer tokens] values into one list per sequence, in token order."""
    owners = batch.predict_owners.tolist()

    def split(values: torch.Tensor | None) -> list[list] | None:
        if values is None:
            return None
        lists = [[] for _ in range(batch.num_sequences)]
        for owner, value in zip(owners, values.tolist()):
            lists[owner].append(value)
        return lists

    return split


def _prompt_ids(row: dict) -> list[int]:
    """The tokens before the row's (chosen) answer: its prompt, as the template rendered it."""
    labels = row["chosen_labels"]
    return row["chosen_input_ids"][:next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))]
