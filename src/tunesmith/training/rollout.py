"""Rollouts for PPO and GRPO: sample responses to a batch of prompts, then score them token by token.

A rollout holds, per response token, what the update needs: the log-prob under the policy that sampled
it (pi_old), under the reference (the policy with its LoRA adapter switched off), the critic's value
(PPO), and the sequence's score from the reward source. They come from one packed forward per model
over prompt + response (`response_forward`), run in eval mode: the values a rollout remembers must not
be one dropout sample. In fp32, pi_old and the values come from the sampler itself
(`sampler_statistics_are_exact` in stages/rl.py), which saves the policy's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX, chunked_logprobs_entropy_at, shift_labels
from tunesmith.data.packing import pack_into_row
from tunesmith.training.loop import to_device
from tunesmith.training.stages.common import backbone_hidden, device_multiple


@dataclass
class Rollout:
    """A batch of sampled responses; token tensors are [samples, longest response], right-padded."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    mask: torch.Tensor
    """1.0 on real response tokens."""
    old_logps: torch.Tensor
    advantages: torch.Tensor
    """[samples, T] for PPO; [samples] (one per answer) for GRPO."""
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, indices: list[int]) -> Rollout:
        """The samples at `indices`, token tensors cut to their own longest response."""
        width = max(len(self.response_ids[i]) for i in indices)
        index = torch.tensor(indices, device=self.mask.device)
        picked = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                picked[field.name] = [value[i] for i in indices]
            elif isinstance(value, torch.Tensor):
                value = value[index]
                picked[field.name] = value[:, :width] if value.ndim == 2 else value
        return replace(self, **picked)


def response_mask(response_ids: list[list[int]], device) -> torch.Tensor:
    width = max(len(r) for r in response_ids)
    lengths = torch.tensor([len(r) for r in response_ids], device=device)
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def response_forward(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                     chunk_size: int, temperature: float, with_values: bool, entropy_grad: bool = True):
    """(log-probs, entropies, values or None) of every response token, each [samples, longest response].

    The sequences run as one packed row (attention per sequence, no padding computed); only the
    positions that predict a response token are projected through lm_head and the value head.
    `entropy_grad=False` when the loss has no entropy term: the entropies are then statistics only.
    """
    device = next(model.parameters()).device
    sequences = [(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(prompt_ids, response_ids)]
    batch = to_device(pack_into_row(sequences, pad_id, device_multiple(device)), device)
    targets = shift_labels(batch["labels"])[0]
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = backbone_hidden(model, batch)[0, positions]  # [response tokens, hidden]
    logps, entropy = chunked_logprobs_entropy_at(rows, model.get_output_embeddings(), targets[positions],
                                                 chunk_size, temperature, entropy_grad)
    mask = response_mask(response_ids, device).bool()
    grid = lambda flat: flat.new_zeros(mask.shape).masked_scatter(mask, flat)  # noqa: E731  [samples, T]
    values = grid(model.v_head(rows)) if with_values else None
    return grid(logps), grid(entropy), values


def chunked_response_forward(model, prompt_ids: list[list[int]], response_ids: list[list[int]], samples: int,
                             **kwargs):
    """`response_forward` over `samples` sequences at a time (a rollout can be far larger than a
    micro-batch; on a GPU one packed row's attention mask grows with the square of its length)."""
    parts = [response_forward(model, prompt_ids[i:i + samples], response_ids[i:i + samples], **kwargs)
             for i in range(0, len(response_ids), samples)]
    width = max(len(r) for r in response_ids)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return tuple(None if part[0] is None else torch.cat([pad(p) for p in part]) for part in zip(*parts))
