"""Synthetic preference pairs with a learnable difference, for tests, the benchmark and examples (no download).

Each prompt asks about a thing; the chosen answer describes it with words from a kind vocabulary, the
rejected answer with words from an unkind one, in random order and number. The difference is easy to
learn yet only learnable from the answers' content (prompts and lengths carry no signal), and held-out
pairs are new word combinations, so held-out accuracy measures generalisation, not memory.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

THINGS = ["garden", "river", "city", "book", "song", "morning", "forest", "teacher", "bridge", "market",
          "window", "letter", "island", "kitchen", "village", "mountain", "painting", "station"]
KIND = ["bright", "warm", "gentle", "lovely", "calm", "friendly", "clean", "pleasant", "happy", "kind", "sunny"]
UNKIND = ["dull", "cold", "harsh", "ugly", "noisy", "rude", "dirty", "gloomy", "sad", "cruel", "grey"]


def preference_records(n: int, seed: int = 0, things: list[str] = THINGS, degenerate_share: float = 0.0,
                       varied_share: float = 0.0) -> list[dict]:
    """`n` alpaca ranking records {instruction, input, chosen, rejected} about `things`.

    Two ways to make a reward model that a policy cannot hack as easily (PPO found both in the demo):
    with `degenerate_share`, that share of rejected answers are broken ones ("The river.", "The river
    is ."); with `varied_share`, that share of pairs use 1 to 5 words drawn with replacement ("cold,
    cold"), as a reward model that only saw 2-4 distinct words may score "The river is cold, cold." or
    "The river is ugly." high.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        thing, count = rng.choice(things), rng.randint(2, 4)
        varied = varied_share and rng.random() < varied_share
        if varied:
            count = rng.randint(1, 5)
        draw = (lambda words, k: rng.choices(words, k=k)) if varied else rng.sample
        chosen, rejected = (f"The {thing} is " + ", ".join(draw(words, count)) + "." for words in (KIND, UNKIND))
        if degenerate_share and rng.random() < degenerate_share:
            rejected = rng.choice([f"The {thing}.", f"The {thing} is.", "The.", f"The {thing} is {thing}."])
        records.append({"instruction": f"Describe the {thing}.", "input": "", "chosen": chosen, "rejected": rejected})
    return records


WORDS = ("the quick brown fox jumps over a lazy dog while data models learn tokens by the river in the "
         "city at night").split()
CHINESE = "我们今天学习模型数据训练语言大小山水"
EMOJI = "😀🚀🎉🌍✨"


def messy_text_records(n: int, seed: int = 0, long_share: float = 0.02) -> Iterator[dict]:
    """`n` raw prompt/answer records as found in the wild, for the data toolkit's tests and benchmark.

    Fields id, input_text, target_text, source. Each text field is missing (3%), null (5%) or "" (5%)
    now and then; texts mix English words, Chinese and emoji (non-BMP) characters; `long_share` of them
    run to thousands of characters; about 3% of records repeat an earlier one exactly. Texts are drawn
    from a pool of a few thousand, so a million records take seconds to make.
    """
    rng = random.Random(seed)

    def text(words: int) -> str:
        parts = []
        for _ in range(words):
            r = rng.random()
            parts.append(rng.choice(WORDS) if r < 0.8 else "".join(rng.choices(CHINESE, k=3)) if r < 0.95
                         else rng.choice(EMOJI))
        return " ".join(parts)

    short = [text(rng.randint(5, 120)) for _ in range(min(n, 4000))]
    long = [text(rng.randint(600, 1500)) for _ in range(min(n, 200))]
    earlier = []
    for i in range(n):
        if earlier and rng.random() < 0.03:
            yield dict(rng.choice(earlier))
            continue
        record = {"id": i}
        for key in ("input_text", "target_text"):
            r = rng.random()
            if r >= 0.03:
                record[key] = None if r < 0.08 else "" if r < 0.13 else rng.choice(long if rng.random() < long_share
                                                                                   else short)
        record["source"] = rng.choice(["web", "books", None])
        yield record
        if len(earlier) < 1000:
            earlier.append(record)


def kindness_score(text: str) -> float:
    """(kind words - unkind words) / describing words in `text`, in [-1, 1]; -1 when it has none."""
    words = [word.strip(".,!?").lower() for word in text.split()]
    kind, unkind = sum(word in KIND for word in words), sum(word in UNKIND for word in words)
    return (kind - unkind) / (kind + unkind) if kind + unkind else -1.0


def kindness_reward(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """A rule-based reward (`reward_function: tunesmith.demos.synthetic:kindness_reward`): kindness_score."""
    return [kindness_score(completion) for completion in completions]


def noisy_description_records(things: list[str], n: int, kind_share: float, seed: int = 0) -> list[dict]:
    """SFT records "Describe the X." whose answers are kind only `kind_share` of the time: poor demonstrations
    that teach the format, and mostly the wrong manner, so alignment has something to fix."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        thing, count = rng.choice(things), rng.randint(2, 4)
        words = KIND if rng.random() < kind_share else UNKIND
        records.append({"instruction": f"Describe the {thing}.", "input": "",
                        "output": f"The {thing} is " + ", ".join(rng.sample(words, count)) + "."})
    return records
