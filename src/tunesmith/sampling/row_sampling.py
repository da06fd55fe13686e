"""Sampling where every row has its own settings: the decode scheduler's rows come from different requests.

Each row applies exactly what `generate.next_tokens` would apply to it alone (the repetition penalty,
logits / temperature, top-k, then top-p, then an inverse-CDF draw from the row's own generator; greedy
rows take the argmax), so a row's tokens do not depend on which other rows share its batch. The work is
vectorised over rows: one sort per step for all rows that filter by top-p, not one per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.config import SamplingSettings
from tunesmith.sampling.generate import penalize_repetition, uniforms


@dataclass
class RowSettings:
    """The sampling settings of the rows in one step, as [rows] tensors (built once per batch change)."""

    greedy: torch.Tensor
    """[rows] bool: take the most likely token."""
    temperature: torch.Tensor
    """[rows] float32; 1 for greedy rows (unused there)."""
    top_k: torch.Tensor
    """[rows] long; 0 keeps every token."""
    top_p: torch.Tensor
    """[rows] float32; 1 keeps every token."""
    penalty: torch.Tensor
    """[rows] float32 repetition penalty; 1 is off."""

    @classmethod
    def of(cls, settings: list[SamplingSettings], device: torch.device) -> RowSettings:
        """The tensors for rows sampled with `settings` (one per row)."""
        greedy = [s.greedy for s in settings]
        return cls(torch.tensor(greedy, device=device),
                   torch.tensor([1.0 if g else s.temperature for g, s in zip(greedy, settings)], device=device),
                   torch.tensor([s.top_k for s in settings], device=device),
                   torch.tensor([s.top_p for s in settings], device=device),
                   torch.tensor([s.repetition_penalty for s in settings], device=device))

    @property
    def penalised(self) -> bool:
        """Whether any row uses the repetition penalty (then the caller keeps each row's seen tokens)."""
        return bool((self.penalty != 1.0).any())


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits with everything outside each row's top-k and top-p nucleus set to -inf; a row
    gets what `generate.filter_logits` gives it alone with its own top_k and top_p."""
    vocab = logits.shape[-1]
    has_k = (top_k > 0) & (top_k < vocab)
    if bool(has_k.any()):
        k = torch.where(has_k, top_k, 1)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(has_k[:, None] & (logits < kth), float("-inf"))
    has_p = top_p < 1.0
    if bool(has_p.any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop_sorted = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & has_p[:, None]
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, settings: RowSettings, generators: list[torch.Generator],
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """[rows] tokens drawn from float32 [rows, vocab] `logits`, row i with its settings and `generators[i]`;
    `seen` ([rows, vocab] bool, the tokens in each row's context) is needed when a row sets a penalty."""
    if seen is not None:
        penalised = penalize_repetition(logits, seen, settings.penalty[:, None])
        logits = torch.where((settings.penalty != 1.0)[:, None], penalised, logits)
    tokens = logits.argmax(dim=-1)
    drawn = (~settings.greedy).nonzero().squeeze(1)
    if drawn.numel() == 0:
        return tokens
    scaled = logits[drawn].float() / settings.temperature[drawn, None]
    cdf = filter_rows(scaled, settings.top_k[drawn], settings.top_p[drawn]).softmax(dim=-1).cumsum(dim=-1)
    uniform = uniforms(drawn.numel(), [generators[i] for i in drawn.tolist()], cdf.device) * cdf[:, -1:]
    tokens[drawn] = torch.searchsorted(cdf, uniform).squeeze(1).clamp(max=cdf.shape[1] - 1)
    return tokens
