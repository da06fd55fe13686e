"""Supervised fine-tuning: maximise log p(response | prompt) over the labelled tokens.

    L = - sum_t log p(y_t | y_<t)  over response tokens, divided by the number of such tokens

The model's backbone gives hidden states; the lm_head projection and the loss run in chunks
(`chunked_nll`), so the [tokens x vocab] logits never exist at once.
"""

from __future__ import annotations

from functools import partial

import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX, chunked_nll
from tunesmith.config import TrainConfig
from tunesmith.data.dataset import build_sft_examples, split_train_eval
from tunesmith.data.packing import collate, pack_examples
from tunesmith.training.loop import RunData, Stage


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] of a right-padded or packed batch.

    Packed rows carry position_ids and no attention_mask, which is how transformers recognises them and
    keeps attention inside each sample. Right-padded rows need no mask either: under causal attention a
    real token only sees earlier positions, and every pad comes after the row's real tokens. Leaving the
    mask out lets sdpa take its causal fast path; pad positions' outputs are garbage, but unlabelled.
    """
    output = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
    return output.last_hidden_state


def sft_loss(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the labelled tokens (the loop divides by their count)."""
    nll_sum, _ = chunked_nll(backbone_hidden(model, batch), model.get_output_embeddings(), batch["labels"], chunk_size)
    return nll_sum, {}


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict) -> int:
    return batch["num_tokens"]


def build_sft(config: TrainConfig, tokenizer, device: torch.device) -> tuple[Stage, RunData]:
    """Tokenised train/eval rows and the SFT loss, ready for the loop."""
    encode = partial(build_sft_examples, dataset_dir=config.dataset_dir, tokenizer=tokenizer,
                     template=config.template, cutoff_len=config.cutoff_len,
                     train_on_prompt=config.train_on_prompt, mask_history=config.mask_history,
                     max_samples=config.max_samples, packing=False, skip_bad_records=config.skip_bad_records)
    examples = encode(config.dataset)
    if config.eval_dataset:
        train, evaluation = examples, encode(config.eval_dataset)
    elif config.val_size > 0:
        train, evaluation = split_train_eval(examples, config.val_size, config.seed)
    else:
        train, evaluation = examples, []
    if config.packing:
        train, evaluation = pack_examples(train, config.cutoff_len), pack_examples(evaluation, config.cutoff_len)
    stage = Stage(loss=partial(sft_loss, chunk_size=config.logprob_chunk_size),
                  count_items=count_label_tokens, count_tokens=count_tokens)
    multiple = 64 if device.type == "cuda" else 1  # see collate
    batcher = partial(collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    return stage, RunData(train=train, eval=evaluation, collate=batcher)
