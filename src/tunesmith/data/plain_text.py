"""Message text tokenised as text: a user who writes `<|im_end|>` gets the characters, not the control token.

A tokenizer turns every special-token string it meets into that token, so message content pasted into a
template could forge role markers (`<|im_end|>\\n<|im_start|>system ...`). Before rendering, each special
-token string inside a message is swapped for a placeholder; after rendering, the text between
placeholders (the template's own markers included) is tokenised as usual and each swapped string as
plain text. Content without special-token strings is tokenised exactly as before.

`split_special_tokens=True` would do the second part, but it flips a flag on the shared Rust tokenizer,
which races with other threads tokenising at the same time; splitting the string instead changes nothing
shared. Usage: `plain = PlainText(tokenizer); text = plain.protect(content); ids = plain.encode(rendered)`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MARK, END = "\ue000", "\ue001"  # private-use characters; a MARK in the content is itself swapped out
PLACEHOLDER = re.compile(f"{MARK}(\\d+){END}")


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token: the named ones and added tokens marked special."""
    added = tokenizer.added_tokens_decoder
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


class PlainText:
    """The swapped strings of one conversation, and the encoder that puts them back as text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_token_ids(tokenizer)
        strings = {tokenizer.convert_ids_to_tokens(i) for i in self.special_ids} | {MARK}
        self.pattern = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True) if s))
        self.swapped: list[str] = []
        self.known: dict[str, list[int]] = {}  # swapped string -> its text ids

    def protect(self, text: str) -> str:
        """`text` with each special-token string replaced by a placeholder."""
        def swap(match: re.Match) -> str:
            self.swapped.append(match.group())
            return f"{MARK}{len(self.swapped) - 1}{END}"

        return self.pattern.sub(swap, text)

    def encode(self, text: str) -> list[int]:
        """Ids of rendered `text`: special tokens where the template wrote them, swapped strings as text."""
        parts = PLACEHOLDER.split(text)  # text, index, text, index, ..., text
        texts = [part for part in parts[::2] if part]
        # one batched call: a message full of special-token strings splits into very many pieces
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        ids: list[int] = []
        for index, part in enumerate(parts):
            if index % 2:
                ids += self._plain_ids(self.swapped[int(part)])
            elif part:
                ids += next(encoded)
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        """Text tokens for `text`, split in halves until no half is read as a special token."""
        if text in self.known:
            return self.known[text]
        self.known[text] = self._split_ids(text)
        return self.known[text]

    def _split_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not self.special_ids.intersection(ids):
            return ids
        if len(text) == 1:  # a one-character special token has no text form: leave it out rather than obey it
            return [i for i in ids if i not in self.special_ids]
        middle = len(text) // 2
        return self._split_ids(text[:middle]) + self._split_ids(text[middle:])
