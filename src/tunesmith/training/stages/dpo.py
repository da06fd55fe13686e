"""DPO and its variants: train the policy directly on preference pairs (the book's Algorithm 3.1).

Each step runs chosen and rejected answers through the policy in one concatenated forward pass and
sums the log-probs of their answer tokens (prompt tokens are labelled IGNORE_INDEX). The reference
log-probs of a pair never change, so they are computed once per pair and remembered in its row:
the first epoch pays one reference forward per step, later epochs and evaluations none, and
`precompute_ref_logprobs` pays it all before training starts. They come from
- the policy itself with its LoRA adapter disabled: no second copy of the weights. Any adapters in
  adapter_name_or_path were merged into the base first, so this is the SFT model the run started from;
- a frozen copy of the starting model, for full and freeze fine-tuning.
simpo and orpo need no reference. The losses themselves are pure functions in `algorithms/dpo.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from tqdm.auto import tqdm

from tunesmith.algorithms.dpo import REFERENCE_FREE, PairLogps, preference_loss, preference_metrics
from tunesmith.config import TrainConfig
from tunesmith.data.pairs import REFERENCE_KEYS
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import disable_lora, lora_modules
from tunesmith.training.loop import RunData, Stage, autocast_context, autocast_dtype, eval_mode, to_device
from tunesmith.training.stages.common import sequence_logps
from tunesmith.training.stages.rm import build_pair_data, count_pairs, count_tokens

Reference = Callable[[dict], PairLogps]


def pair_logps(model, batch: dict, chunk_size: int) -> PairLogps:
    """Summed answer log-probs of the chosen (first half) and rejected (second half) rows."""
    sums, lengths = sequence_logps(model, batch, chunk_size)
    chosen, rejected = sums.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    return PairLogps(chosen, rejected, chosen_len, rejected_len)


def reference_logps(batch: dict, policy: PairLogps, reference: Reference) -> PairLogps:
    """The batch's reference log-probs: remembered in its rows, or computed now and remembered there."""
    if all(key in batch for key in REFERENCE_KEYS):
        return PairLogps(batch["ref_chosen_logps"], batch["ref_rejected_logps"], policy.chosen_len, policy.rejected_len)
    ref = reference(batch)
    remember_reference(batch["rows"], ref)
    return ref


def remember_reference(rows: list[dict], ref: PairLogps) -> None:
    for row, chosen, rejected in zip(rows, ref.chosen.tolist(), ref.rejected.tolist()):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = chosen, rejected


def dpo_loss(model, batch: dict, config: TrainConfig, reference: Reference | None) -> tuple[torch.Tensor, dict]:
    """Summed preference loss over the batch's pairs, and TRL-named metrics summed over them."""
    policy = pair_logps(model, batch, config.logprob_chunk_size)
    ref = None
    if config.pref_loss not in REFERENCE_FREE:
        ref = reference_logps(batch, policy, reference)
    output = preference_loss(policy, ref, config.pref_loss, config.pref_beta, config.dpo_label_smoothing,
                             config.simpo_gamma, config.pref_ftx)
    return output.losses.sum(), preference_metrics(output)


def adapter_reference(model, chunk_size: int) -> Reference:
    """The policy with its LoRA adapter switched off: the starting model, at the cost of one forward.

    Run in eval mode, like a separate reference model would be: a remembered value must not be one
    dropout sample of a model with dropout.
    """
    @torch.no_grad()
    def reference(batch: dict) -> PairLogps:
        with eval_mode(model), disable_lora(model):
            return pair_logps(model, batch, chunk_size)
    return reference


def frozen_copy_reference(model, chunk_size: int, dtype: torch.dtype) -> Reference:
    """A frozen copy of the starting model (full/freeze fine-tuning change the weights themselves).

    Only the weights move to the compute dtype: buffers such as RoPE's inverse frequencies stay as
    loaded, since in bf16 they would turn positions into angles visibly wrong over a long sequence.
    """
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for param in frozen.parameters():
        param.data = param.data.to(dtype)
    return torch.no_grad()(partial(pair_logps, frozen, chunk_size=chunk_size))


def _all_remembered(batch: dict) -> PairLogps:
    raise TunesmithError("internal: a pair's reference log-probs were not precomputed; the live model is no "
                         "longer the reference.")


@torch.no_grad()
def precompute_reference_logps(reference: Reference, data: RunData, batch_size: int, device) -> None:
    """Store each row's reference log-probs in the row itself, so training runs no reference forward."""
    for rows in (data.train, data.eval):
        for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
            chunk = rows[start:start + batch_size]
            remember_reference(chunk, reference(to_device(data.collate(chunk), device)))


def build_dpo(config: TrainConfig, tokenizer, device: torch.device):
    """Pair data, and a function that sets up the reference for the loaded model and gives the stage."""
    def make_stage(model, data: RunData) -> Stage:
        reference = None
        if config.pref_loss not in REFERENCE_FREE:
            chunk, has_lora = config.logprob_chunk_size, any(True for _ in lora_modules(model))
            if has_lora:
                reference = adapter_reference(model, chunk)
            elif config.precompute_ref_logprobs:  # the model has not been trained yet: it is the reference
                reference = torch.no_grad()(partial(pair_logps, model, chunk_size=chunk))
            else:
                reference = frozen_copy_reference(model, chunk, autocast_dtype(config) or torch.float32)
            if config.precompute_ref_logprobs:
                with eval_mode(model), autocast_context(device, config):
                    precompute_reference_logps(reference, data, config.per_device_train_batch_size, device)
                if not has_lora:  # the model itself is about to stop being the reference
                    reference = _all_remembered
        loss = partial(dpo_loss, config=config, reference=reference)
        return Stage(loss=loss, count_items=count_pairs, count_tokens=count_tokens)

    return build_pair_data(config, tokenizer, device), make_stage
