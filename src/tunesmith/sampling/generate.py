"""Batched sampling with a KV cache: the rollouts of PPO and GRPO, chat, the API server and do_predict.

Prompts are left-padded so every row's next token sits in the same column; the attention mask hides
the pads and position ids count only real tokens, so a padded prompt generates exactly what it would
alone. The prompt is run once (prefill); each new token then costs one forward of one position per row
against the cache. With `num_samples` G > 1 (GRPO's group) the prefilled cache is repeated G times
rather than prefilling G copies of each prompt. Llama-family models run on `CachedDecoder` (a lean
forward with a preallocated cache); anything else on transformers' own forward and DynamicCache.

With `record=True` the sampler also keeps, for every sampled token, its log-prob and the entropy at
the sampling temperature and the final hidden state that predicted it: PPO's pi_old, entropy and (via
the value head) values, without a second forward over the responses. The `on_logits` and `on_prompt`
observers see the model's own logits of each step and the prefill's hidden states of every prompt
position: the API's log-probs, again without a second forward.

Sampling: the repetition penalty, logits / temperature, then top-k and top-p (nucleus) filtering, then a
draw; temperature 0 (or do_sample false) is greedy. Rows stop at any of `stop_ids` (the stop token is
part of the response), or when the `on_step` callback (streaming, a stop string, a client gone) says so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from tunesmith.config import SamplingSettings
from tunesmith.model.lora import few_row_linear
from tunesmith.sampling import cached_decoder, decode_weights

PACK_FROM_TOKENS = 16
"""Generations of at least this many new tokens decode on packed weights (`CachedDecoder`'s `decode_rows`):
packing costs about two steps' worth of reading and writing the weights once, each step then saves a third
or more."""


@dataclass
class Generation:
    """What `generate` returns; row i of the responses answers prompt i // num_samples."""

    response_ids: list[list[int]]
    """Each row's new tokens, ending with its stop token when it produced one."""
    stopped: list[bool]
    """Whether each row ended with a stop token (False: it hit max_new_tokens)."""
    logps: torch.Tensor | None = None
    """With `record`: [rows, longest response] float32 log-prob of each response token at the sampling
    temperature (of the unfiltered distribution, as a forward pass would give it); 0 past a row's end."""
    entropy: torch.Tensor | None = None
    """With `record`: [rows, longest response] entropy of the distribution each token was drawn from."""
    hidden: torch.Tensor | None = None
    """With `record`: [rows, longest response, hidden] final hidden state that predicted each token."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[rows, vocab] logits with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: the logit of a token
    already in the context ([rows, vocab] `seen`) is divided by `penalty` when positive, multiplied when
    negative, so penalty > 1 always makes a repeat less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the batch, or one per row: a row with its own seeded generator samples the same answer
whatever else is in the batch (RL rollouts split over ranks sample what one process would)."""


def uniforms(rows: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """[rows, 1] uniform numbers in [0, 1), from the batch's generator or each row's own."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)[:, None]
    return torch.rand(rows, 1, generator=generator, device=device)


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: Generators) -> torch.Tensor:
    """[rows] token ids drawn from [rows, vocab] last-position logits."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    # Inverse-CDF sampling: one uniform number per row, where torch.multinomial or an exponential race
    # draws one per vocabulary entry (4 ms a step for 4 rows x 32k on a CPU, a tenth of a decode step).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    uniform = uniforms(cdf.shape[0], generator, cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform).squeeze(1).clamp(max=cdf.shape[1] - 1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [rows, longest prompt], pads on the left."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def generate(model: PreTrainedModel, prompts: list[list[int]], settings: SamplingSettings, stop_ids: list[int],
             pad_id: int, num_samples: int = 1, generator: Generators = None, record: bool = False,
             on_step: Callable[[list[int]], Iterable[int] | None] | None = None,
             on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             on_prompt: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Sample `num_samples` responses per prompt (rows prompt-major: p0s0, p0s1, ..., p1s0, ...).

    `on_step(tokens)` sees each step's token per row (pad_id for finished rows) and may return rows to
    end there; they count as not stopped. `on_logits(logits, tokens)` sees, before it, the step's float32
    [rows, vocab] model logits (before the repetition penalty and temperature) and [rows] tokens;
    `on_prompt(states)` the prefill's [prompts, longest prompt, hidden] final hidden states (left-padded).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    rows = attention_mask.shape[0] * num_samples
    pack = rows if settings.max_new_tokens >= PACK_FROM_TOKENS and decode_weights.packing_fits(model) else None
    decoder = _decoder(model, attention_mask, input_ids.shape[1] + settings.max_new_tokens, pack)
    states = decoder.prefill(input_ids, attention_mask, positions)  # [prompts, longest prompt, hidden]
    if on_prompt is not None:
        on_prompt(states)
    hidden = states[:, -1]  # [prompts, hidden]
    if num_samples > 1:
        decoder.repeat_interleave(num_samples)
        hidden = hidden.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
    head = decode_weights.cast_head(model.get_output_embeddings(), cached_decoder.autocast_matmul_dtype(device), pack)
    seen = None  # [rows, vocab] tokens in each row's context, for the repetition penalty
    if settings.repetition_penalty != 1.0:
        seen = _prompt_tokens(input_ids, attention_mask, num_samples, head.weight.shape[0])
    next_position = positions[:, -1:] + 1
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens each row produced
    columns, records = [], []
    for step in range(settings.max_new_tokens):
        model_logits = logits = last_logits(head, hidden)
        if seen is not None:
            logits = penalize_repetition(logits, seen, settings.repetition_penalty)
        tokens = torch.where(done, pad_id, next_tokens(logits, settings, generator))
        if on_logits is not None:
            on_logits(model_logits, tokens)
        if record:
            records.append((*token_statistics(logits, tokens, settings.temperature), hidden))
        if seen is not None:
            seen[torch.arange(rows, device=device), tokens] = True
        columns.append(tokens)
        lengths += ~done
        stopped |= ~done & torch.isin(tokens, stop)
        done |= stopped
        if on_step is not None:
            for row in on_step(tokens.tolist()) or ():
                done[row] = True
        if step + 1 == settings.max_new_tokens or bool(done.all()):
            break
        hidden = decoder.step(tokens, next_position)
        next_position = next_position + 1
    return _generation(columns, lengths, stopped, records)


def _decoder(model: PreTrainedModel, attention_mask: torch.Tensor, length: int,
             pack: int | None) -> cached_decoder.CachedDecoder | _TransformersDecoder:
    """The lean Llama-family decoder when it can run this model over `length` positions (its weights packed
    for steps of `pack` rows), else transformers'."""
    if cached_decoder.supports(model, length):
        return cached_decoder.CachedDecoder(model, attention_mask.shape[0], length, pack)
    return _TransformersDecoder(model, attention_mask)


def _prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_samples: int,
                   vocab_size: int) -> torch.Tensor:
    """[rows, vocab] bool: which tokens each sample's prompt holds (pads excluded), the penalty's context."""
    real = attention_mask.repeat_interleave(num_samples, dim=0).bool()
    seen = torch.zeros(real.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    row_index = torch.arange(real.shape[0], device=input_ids.device)[:, None].expand_as(real)
    seen[row_index[real], input_ids.repeat_interleave(num_samples, dim=0)[real]] = True
    return seen


def _generation(columns: list[torch.Tensor], lengths: torch.Tensor, stopped: torch.Tensor,
                records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Generation:
    """Trim each row's [steps] tokens to what it produced; with records, stack them and zero past each end."""
    generation = Generation([row[:n] for row, n in zip(torch.stack(columns, dim=1).tolist(), lengths.tolist())],
                            stopped.tolist())
    if records:
        mask = torch.arange(len(columns), device=lengths.device)[None, :] < lengths[:, None]  # [rows, steps]
        logps, entropy, states = (torch.stack(parts, dim=1) for parts in zip(*records))
        generation.logps, generation.entropy = logps * mask, entropy * mask
        generation.hidden = states * mask[..., None]
    return generation


def token_statistics(logits: torch.Tensor, tokens: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of `tokens`, entropy), each [rows], of softmax(logits / temperature) (greedy's 0: 1), what
    RL keeps of each draw: pi_old at the sampling temperature, as TRL computes it."""
    logp = (logits / (temperature if temperature > 0 else 1.0)).log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(1, tokens[:, None]).squeeze(1), entropy


class _TransformersDecoder:
    """`CachedDecoder`'s interface on transformers' own forward and DynamicCache, for other architectures."""

    def __init__(self, model: PreTrainedModel, attention_mask: torch.Tensor) -> None:
        self.decoder = model.get_decoder()
        self.cache = DynamicCache()
        self.cache_kwarg = _cache_keyword(model)
        self.attention_mask = attention_mask

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids, positions)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return self._forward(tokens[:, None], positions)[:, -1]

    def repeat_interleave(self, times: int) -> None:
        self.cache.batch_repeat_interleave(times)
        self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        output = self.decoder(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=positions,
                              use_cache=True, **{self.cache_kwarg: self.cache})
        return output.last_hidden_state  # [rows, length, hidden]


def last_logits(head: torch.nn.Module | decode_weights.Projection, hidden: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] float32 logits of [rows, hidden] last-position states: by the head's packed weight when
    `cast_head` packed it, else `few_row_linear` (not head(hidden): with a handful of rows and a large
    vocabulary the product's orientation matters, by up to 3x)."""
    if isinstance(head, decode_weights.Projection):
        return head(hidden.to(head.weight.dtype)).float()
    return few_row_linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()


def _cache_keyword(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's model takes."""
    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"
