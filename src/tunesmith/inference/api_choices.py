"""The answers of one API request as they are generated: text cut at stop strings, the tokens' log-probs,
pieces handed out as soon as they are final. Shared by /v1/chat/completions and /v1/completions.

A streamed answer never shows text the final answer does not contain: text that could still be the
start of a stop string is held back. A token's log-prob goes out with the piece that holds its first
character, so the streamed log-probs join to the non-streamed ones: the answer's tokens whose text
starts before its end (a stop token, which has no text, is counted in usage but never listed).
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.inference.api_logprobs import StepLogprobs, TokenLogprob
from tunesmith.inference.engine import Engine, TextStream
from tunesmith.sampling.generate import Generation

Emit = Callable[[int, str, list[tuple[int, TokenLogprob]]], None]
"""emit(choice index, final text, [(text offset, log-prob entry)] of its tokens; empty unless asked for)."""


class Choice:
    """One answer's text as it grows, with the offset and log-prob entry of each token pushed."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.stream, self.stops = TextStream(engine), stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.text, self.released, self.stop_hit, self.done = "", 0, False, False
        self.tokens: list[tuple[int, TokenLogprob | None]] = []  # (offset of its text, entry) per token
        self.listed = 0  # tokens whose entries were handed out

    def push(self, token: int, entry: TokenLogprob | None = None) -> str:
        """Add a token; return the text that is now final (none while it may still begin a stop string)."""
        self.tokens.append((len(self.text), entry))
        self.text += self.stream.push(token)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stop_hit, self.done = self.text[:at], True, True
        end = len(self.text) if self.done else max(self.released, len(self.text) - self.hold)
        return self.release(end)

    def release(self, end: int | None = None) -> str:
        """The text not yet handed out, up to `end` (default: all of it, when the answer has ended)."""
        end = len(self.text) if end is None else end
        piece, self.released = self.text[self.released:end], end
        return piece

    def entries(self) -> list[tuple[int, TokenLogprob]]:
        """(offset, entry) of the tokens not yet handed out whose text starts in the released text."""
        start = self.listed
        while self.listed < len(self.tokens) and self.tokens[self.listed][0] < self.released:
            self.listed += 1
        return [(offset, entry) for offset, entry in self.tokens[start:self.listed] if entry is not None]


def token_callback(choices: list[Choice], stop_ids: list[int], emit: Emit | None,
                   logprobs: StepLogprobs | None) -> Callable[[int, int], bool]:
    """The engine's per-row `on_token(row, token)`: feed the token to its choice, emit final pieces, and
    end the row at a stop string (True). Runs on the decode thread; a cancelled request ends its rows there."""
    stop_ids = set(stop_ids)

    def on_token(index: int, token: int) -> bool:
        choice = choices[index]
        if choice.done:
            return True
        if token in stop_ids:
            choice.done = True
            piece = choice.release()
        else:
            piece = choice.push(token, logprobs.last[index] if logprobs is not None else None)
        if piece and emit is not None:
            emit(index, piece, choice.entries())
        return choice.done

    return on_token


def finish(choices: list[Choice], generation: Generation, emit: Emit | None) -> list[dict]:
    """Each choice's result {text, finish, tokens (stop token included), entries: [(offset, log-prob entry)]},
    emitting any text still held back."""
    results = []
    for index, choice in enumerate(choices):
        rest = choice.release()
        if rest and emit is not None:
            emit(index, rest, choice.entries())
        finish_reason = "stop" if generation.stopped[index] or choice.stop_hit else "length"
        listed = [(offset, entry) for offset, entry in choice.tokens if offset < len(choice.text) and entry]
        results.append({"text": choice.text, "finish": finish_reason, "tokens": len(generation.response_ids[index]),
                        "entries": listed})
    return results
