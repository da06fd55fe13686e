"""Synthetic preference pairs with a learnable difference, for tests, the benchmark and examples (no download).

Each prompt asks about a thing; the chosen answer describes it with words from a kind vocabulary, the
rejected answer with words from an unkind one, in random order and number. The difference is easy to
learn yet only learnable from the answers' content (prompts and lengths carry no signal), and held-out
pairs are new word combinations, so held-out accuracy measures generalisation, not memory.
"""

from __future__ import annotations

import random

THINGS = ["garden", "river", "city", "book", "song", "morning", "forest", "teacher", "bridge", "market",
          "window", "letter", "island", "kitchen", "village", "mountain", "painting", "station"]
KIND = ["bright", "warm", "gentle", "lovely", "calm", "friendly", "clean", "pleasant", "happy", "kind", "sunny"]
UNKIND = ["dull", "cold", "harsh", "ugly", "noisy", "rude", "dirty", "gloomy", "sad", "cruel", "grey"]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """`n` alpaca ranking records {instruction, input, chosen, rejected}."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        thing, count = rng.choice(THINGS), rng.randint(2, 4)
        chosen, rejected = (f"The {thing} is " + ", ".join(rng.sample(words, count)) + "." for words in (KIND, UNKIND))
        records.append({"instruction": f"Describe the {thing}.", "input": "", "chosen": chosen, "rejected": rejected})
    return records
