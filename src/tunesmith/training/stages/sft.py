"""Supervised fine-tuning: maximise log p(response | prompt) over the labelled tokens.

    L = - sum_t log p(y_t | y_<t)  over response tokens, divided by the number of such tokens

The model's backbone gives hidden states; the lm_head projection and the loss run in chunks
(`chunked_nll`), so the [tokens x vocab] logits never exist at once.
"""

from __future__ import annotations

from functools import partial

import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX, chunked_nll
from tunesmith.config import RunConfig
from tunesmith.data.dataset import build_sft_examples, train_and_eval_rows
from tunesmith.data.packing import TokenBatch, collate, pack_examples
from tunesmith.model.forward import backbone_hidden, device_multiple
from tunesmith.training.loop import RunData, Stage
from tunesmith.training.stages.spec import StageInputs, StageSpec
from tunesmith.training.supervised import Objective, supervised_stage


def sft_loss(model: torch.nn.Module, batch: TokenBatch, chunk_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the labelled tokens (the loop divides by their count)."""
    nll_sum, _ = chunked_nll(backbone_hidden(model, batch), model.get_output_embeddings(), batch.labels, chunk_size)
    return nll_sum, {}


def count_label_tokens(batch: TokenBatch) -> int:
    """Tokens the loss is summed over (labels are shifted: the first position predicts nothing)."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def build_sft_data(config: RunConfig, tokenizer: object, device: torch.device) -> RunData:
    """Tokenised train/eval rows, packed into rows of cutoff_len tokens with `packing`."""
    data = config.data
    encode = partial(build_sft_examples, dataset_dir=data.dataset_dir, tokenizer=tokenizer, template=data.template,
                     cutoff_len=data.cutoff_len, train_on_prompt=data.train_on_prompt, mask_history=data.mask_history,
                     max_samples=data.max_samples, packing=False, skip_bad_records=data.skip_bad_records)
    train, evaluation = train_and_eval_rows(encode, data.dataset, data.eval_dataset, data.val_size, config.train.seed)
    if data.packing:
        train, evaluation = pack_examples(train, data.cutoff_len), pack_examples(evaluation, data.cutoff_len)
    return RunData(train=train, eval=evaluation)


def build_sft(inputs: StageInputs) -> Stage:
    """SFT as a supervised stage. CPU: samples end to end, no padding; GPU: padded rows (one batched
    kernel beats many small ones)."""
    optim, device = inputs.config.train, inputs.device
    batcher = partial(collate, pad_token_id=inputs.tokenizer.pad_token_id, pad_to_multiple_of=device_multiple(device),
                      one_row=device.type == "cpu")
    objective = Objective(partial(sft_loss, chunk_size=optim.logprob_chunk_size), batcher, count_label_tokens, device)
    return supervised_stage(objective, optim.per_device_train_batch_size, optim.gradient_accumulation_steps,
                            optim.per_device_eval_batch_size)


STAGE = StageSpec(name="sft", build_data=build_sft_data, build=build_sft, fresh_adapter=False, packs_samples=True)
