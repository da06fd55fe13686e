"""The reference model a policy is held to, and a cache of results computed with it.

DPO, PPO and GRPO (and any later stage with a KL or log-ratio term) compare the policy with the model
the run started from. That model is
- the policy itself with its LoRA adapter switched off: no second copy of the weights. Any adapters in
  adapter_name_or_path were merged into the base first, so this is exactly the SFT model;
- a frozen copy of the starting model, for full and freeze fine-tuning (they change the weights);
- the live model, before it has trained a step, when every reference result is computed up front
  (`precompute_ref_logprobs`) and the copy is not worth its memory.
Reference passes run in eval mode without gradients: a remembered value must not be one dropout sample.

A reference result depends only on a row's tokens, so `RowCache` remembers it keyed by a digest of
them: the first epoch pays one reference forward per step, later epochs and evaluations none. The
rows themselves are never written to.
"""

from __future__ import annotations

import copy
import hashlib
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from tunesmith.errors import TunesmithError
from tunesmith.model.lora import disable_lora, lora_modules
from tunesmith.training import distributed
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.loop import eval_mode


class Reference:
    """The starting model, reached from the policy: adapter off, a frozen copy, or the untrained model itself."""

    def __init__(self, policy: torch.nn.Module, frozen: torch.nn.Module | None, adapter_off: bool):
        self.policy, self.frozen, self.adapter_off = policy, frozen, adapter_off

    @classmethod
    def of(cls, policy: torch.nn.Module, dtype: torch.dtype, keep_copy: bool = True) -> Reference:
        """The reference for `policy` before it trains: adapter off for LoRA, else a frozen copy in `dtype`
        (or, with keep_copy=False, the live model: valid only until its first update)."""
        if any(True for _ in lora_modules(policy)):
            return cls(policy, None, adapter_off=True)
        if not keep_copy:
            return cls(policy, None, adapter_off=False)
        return cls(policy, frozen_copy(policy, dtype), adapter_off=False)

    @contextmanager
    def use(self) -> Iterator[torch.nn.Module]:
        """The reference model to run forwards on inside the block (eval mode, no gradients)."""
        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
                return
            with eval_mode(self.policy), disable_lora(self.policy) if self.adapter_off else nullcontext():
                yield self.policy


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of `model` with its weights in `dtype`.

    Only the weights move to the compute dtype: buffers such as RoPE's inverse frequencies stay as
    loaded, since in bf16 they would turn positions into angles visibly wrong over a long sequence.
    """
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for param in frozen.parameters():
        param.data = param.data.to(dtype)
    return frozen


def row_key(row: dict) -> bytes:
    """A digest of a row's token lists: equal tokens, equal reference results."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(row):
        value = row[name]
        digest.update(name.encode())
        digest.update(array("q", value).tobytes() if isinstance(value, list) else repr(value).encode())
    return digest.digest()


class RowCache:
    """Per-row reference results [k] (e.g. chosen and rejected log-probs), keyed by the row's tokens.

    `sealed` after a full precompute: a miss then means the live model would be asked, which is no
    longer the reference, so it is an error rather than a silent wrong value.
    """

    def __init__(self) -> None:
        self.values: dict[bytes, torch.Tensor] = {}
        self.sealed = False

    def lookup(self, rows: list[dict]) -> torch.Tensor | None:
        """[rows, k] float32 results when every row is cached, else None."""
        found = [self.values.get(row_key(row)) for row in rows]
        if any(value is None for value in found):
            if self.sealed:
                raise TunesmithError("internal: a row's reference results were not precomputed; the live model is "
                                     "no longer the reference.")
            return None
        return torch.stack(found)

    def store(self, rows: list[dict], values: torch.Tensor) -> None:
        """Remember [rows, k] results (kept on the CPU in float32)."""
        for row, value in zip(rows, values.detach().float().cpu()):
            self.values[row_key(row)] = value

    def precompute(self, row_sets: list[list[dict]], compute: Callable[[list[dict]], torch.Tensor],
                   batch_size: int, proc: ProcessInfo | None = None) -> None:
        """Fill the cache for every row (`compute(rows) -> [rows, k]`), then seal it. Under several ranks
        each computes every world_size-th row and all ranks then hold every row's results."""
        proc = proc or ProcessInfo()
        for rows in row_sets:
            mine = rows[proc.rank::proc.world_size]
            parts = [compute(mine[start:start + batch_size]).detach().float()
                     for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", leave=False,
                                       disable=not proc.is_main)]
            if rows:
                width = parts[0].shape[1:] if parts else (2,)
                local = torch.cat(parts) if parts else torch.zeros((0, *width))
                self.store(rows, distributed.gather_strided(local, len(rows)))
        self.sealed = True
