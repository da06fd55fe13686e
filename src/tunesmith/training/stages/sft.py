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
from tunesmith.data.dataset import build_sft_examples
from tunesmith.data.packing import collate, pack_examples
from tunesmith.training.loop import RunData, Stage
from tunesmith.training.stages.common import backbone_hidden, device_multiple, train_and_eval_rows


def sft_loss(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the labelled tokens (the loop divides by their count)."""
    nll_sum, _ = chunked_nll(backbone_hidden(model, batch), model.get_output_embeddings(), batch["labels"], chunk_size)
    return nll_sum, {}


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict) -> int:
    return batch["num_tokens"]


def build_sft(config: TrainConfig, tokenizer, device: torch.device):
    """Tokenised train/eval rows, and a function that gives the SFT stage once the model is ready."""
    encode = partial(build_sft_examples, dataset_dir=config.dataset_dir, tokenizer=tokenizer,
                     template=config.template, cutoff_len=config.cutoff_len,
                     train_on_prompt=config.train_on_prompt, mask_history=config.mask_history,
                     max_samples=config.max_samples, packing=False, skip_bad_records=config.skip_bad_records)
    train, evaluation = train_and_eval_rows(encode, config)
    if config.packing:
        train, evaluation = pack_examples(train, config.cutoff_len), pack_examples(evaluation, config.cutoff_len)
    stage = Stage(loss=partial(sft_loss, chunk_size=config.logprob_chunk_size),
                  count_items=count_label_tokens, count_tokens=count_tokens)
    # CPU: samples end to end, no padding; GPU: padded rows (one batched kernel beats many small ones).
    batcher = partial(collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=device_multiple(device),
                      one_row=device.type == "cpu")
    return RunData(train=train, eval=evaluation, collate=batcher), lambda model, data: stage
