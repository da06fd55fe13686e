"""Token log-probs for `tunesmith api`, in OpenAI's two shapes: chat's `logprobs.content` and the legacy
completions object {tokens, token_logprobs, top_logprobs, text_offset}.

The rule, as OpenAI and vLLM report them: log-probs of the model's own distribution, log_softmax of its
raw logits, before the repetition penalty, temperature, top-k and top-p. So they do not change with the
sampling settings and equal a plain forward over prompt + answer. They come out of generation itself
(the engine's `on_logits` per step, `on_prompt` for echo's prompt tokens as the prompt is read), not from a
second forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tunesmith.sampling.generate import last_logits

PROMPT_CHUNK = 256  # prompt positions projected to the vocabulary at once (echo)


@dataclass
class TokenLogprob:
    """One token with its log-prob (None: the prompt's first token, which nothing predicts) and the most
    likely tokens at its position, most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def ranked(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's `tokens` [rows] log-prob under float32 [rows, vocab] `logits`, and its `top` alternatives."""
    logps = logits.float().log_softmax(dim=-1)
    chosen = logps.gather(1, tokens[:, None]).squeeze(1).tolist()
    values, ids = logps.topk(min(top, logps.shape[-1]), dim=-1)
    alternatives = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(token, logp, alts) for token, logp, alts in zip(tokens.tolist(), chosen, alternatives)]


class StepLogprobs:
    """The engine's per-row `on_logits` observer: `last[row]` holds the row's entry for the token just drawn."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.last: dict[int, TokenLogprob] = {}

    def __call__(self, row: int, logits: torch.Tensor, token: int) -> None:
        self.last[row] = ranked(logits[None], torch.tensor([token], device=logits.device), self.top)[0]


class PromptLogprobs:
    """The engine's per-row `on_prompt` observer for echo: each prompt token's entry, from the states the
    prompt's reading computes (chunk by chunk); the first of each prompt's `samples` rows records them."""

    def __init__(self, head: torch.nn.Module, prompts: list[list[int]], top: int, samples: int) -> None:
        self.head, self.prompts, self.top, self.samples = head, prompts, top, samples
        self.entries: list[list[TokenLogprob]] = [[TokenLogprob(prompt[0], None, [])] for prompt in prompts]

    def __call__(self, row: int, states: torch.Tensor, start: int) -> None:
        if row % self.samples:
            return
        prompt = self.prompts[row // self.samples]
        targets = torch.tensor(prompt, device=states.device)
        end = min(start + states.shape[0], len(prompt) - 1)  # position p predicts token p + 1
        for at in range(start, end, PROMPT_CHUNK):
            stop = min(at + PROMPT_CHUNK, end)
            logits = last_logits(self.head, states[at - start:stop - start])
            self.entries[row // self.samples] += ranked(logits, targets[at + 1:stop + 1], self.top)


class TokenNames:
    """Each token's text and exact bytes. A byte-level BPE token may hold part of a character: its text
    then shows U+FFFD, and `bytes` (OpenAI's field for this) the real bytes."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)
        self.bytes = lru_cache(maxsize=None)(self._bytes)

    def text(self, token: int) -> str:
        """The token's text (U+FFFD for a partial character)."""
        return self.bytes(token).decode("utf-8", errors="replace")

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        table = _byte_level_table()
        if piece is not None and all(ch in table for ch in piece) and token not in self.special_ids:
            return bytes(table[ch] for ch in piece)
        return self.tokenizer.decode([token]).encode("utf-8")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in a token string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(extra)}}


def chat_logprobs(entries: list[tuple[int, TokenLogprob]], names: TokenNames | None) -> dict | None:
    """OpenAI's chat `logprobs` object {"content": [{token, logprob, bytes, top_logprobs}, ...]} for
    (offset, entry) pairs; None (JSON null) when the request asked for none (`names` is None)."""
    if names is None:
        return None

    def named(token: int, logprob: float) -> dict:
        return {"token": names.text(token), "logprob": logprob, "bytes": list(names.bytes(token))}

    return {"content": [{**named(e.token, e.logprob), "top_logprobs": [named(t, lp) for t, lp in e.top]}
                        for _, e in entries]}


def legacy_logprobs(entries: list[TokenLogprob], offsets: list[int], names: TokenNames) -> dict:
    """OpenAI's completions `logprobs` object. Each `top_logprobs` dict holds the top tokens plus the chosen
    one (up to logprobs + 1 entries, as OpenAI documents); a prompt's first token has null for both."""
    tops = [None if e.logprob is None else {**{names.text(t): lp for t, lp in e.top}, names.text(e.token): e.logprob}
            for e in entries]
    return {"tokens": [names.text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}
