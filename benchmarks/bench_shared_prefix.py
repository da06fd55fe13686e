"""Prefix sharing in the decode scheduler: rows that start alike read the shared tokens once.

    python benchmarks/bench_shared_prefix.py                  # 'small' random model, 2 rounds
    python benchmarks/bench_shared_prefix.py --size 40m --rounds 3

Four loads, each run with sharing on and with it off (`shared_prefix.copyable` patched to copy nothing,
which is the scheduler before it), alternating on/off --rounds times in one process, greedy, 32 new
tokens a row:
- "n=8": one request for 8 answers to one 300-token prompt (the API's `n`, a GRPO group);
- "shared system": 16 requests, a 400-token system prompt shared, then 30 tokens of their own;
- "distinct": 16 requests with unrelated 200-token prompts (nothing to share: the cost of looking);
- "chat, 8 turns": one conversation, each turn its whole history (the last prompt and answer) plus a
  new 40-token message, one turn after the other, on a scheduler that keeps finished rows
  (`keep_finished`, as `tunesmith api` and `chat` run it): each turn can start from the last one's cache.
The first three submit every row at once. Per load and setting it prints one JSON line: the best round's
wall time, the median and the last row's time to first token (chat: the last turn's), and the prompt
tokens the passes read. The answers must be the same both ways, else the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import SamplingSettings
from tunesmith.model.init_model import init_model
from tunesmith.sampling import shared_prefix
from tunesmith.sampling.rows import RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import SlotDecoder

SETTINGS = SamplingSettings(max_new_tokens=32, do_sample=False)


def loads(vocab: int, seed: int) -> dict[str, list[list[list[int]]]]:
    """Each load's groups (one per request) of row prompts."""
    rng = random.Random(seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(count)]

    prompt, system = tokens(300), tokens(400)
    return {"n=8": [[prompt] * 8],
            "shared system": [[system + tokens(30)] for _ in range(16)],
            "distinct": [[tokens(200)] for _ in range(16)],
            "chat, 8 turns": [[tokens(40)] for _ in range(8)]}  # each turn's new message


def run_once(scheduler: DecodeScheduler, groups: list[list[list[int]]]) -> dict:
    """One run of `groups`: wall seconds, each row's time to first token, the answers, prompt tokens read."""
    firsts, began = {}, time.perf_counter()

    def first_token(key: tuple[int, int]) -> None:  # returns None: a true value would end the row
        firsts.setdefault(key, time.perf_counter() - began)

    requests = [[RowRequest(prompt, SETTINGS, [], on_token=lambda token, key=(g, r): first_token(key))
                 for r, prompt in enumerate(group)] for g, group in enumerate(groups)]
    done = scheduler.run_here(requests)
    wall = time.perf_counter() - began
    ordered = sorted(firsts.values())
    return {"wall": wall, "ttft_p50": ordered[len(ordered) // 2], "ttft_max": ordered[-1],
            "answers": [group.result().response_ids for group in done]}


def chat(scheduler: DecodeScheduler, messages: list[list[list[int]]]) -> dict:
    """One conversation, a turn per message, each turn's prompt its history: as `run_once`, for the last turn."""
    history, answers = [], []
    for message in messages:
        history = history + message[0]
        result = run_once(scheduler, [[history]])
        history = history + result["answers"][0][0]
        answers.append(result["answers"][0][0])
    return {**result, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = init_model(Path(tempfile.mkdtemp(prefix="tunesmith_bench_prefix_")) / "model", size=args.size, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    read = [0]
    forward, copyable = SlotDecoder.forward, shared_prefix.copyable

    def counted(self, tokens, positions, chunks, adapters):
        read[0] += sum(len(chunk.ids) for chunk in chunks)
        return forward(self, tokens, positions, chunks, adapters)

    SlotDecoder.forward = counted
    failed = False
    for name, groups in loads(model.config.vocab_size, args.seed).items():
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for sharing in ("on", "off"):
                shared_prefix.copyable = copyable if sharing == "on" else (lambda row: 0)
                scheduler = DecodeScheduler(model, max_rows=16, keep_finished=name.startswith("chat"))
                scheduler.run_here([[RowRequest(list(range(5, 20)), SETTINGS, [])]])  # warm-up
                read[0] = 0
                result = (chat if name.startswith("chat") else run_once)(scheduler, groups)
                result["read"] = read[0]
                if sharing not in best or result["wall"] < best[sharing]["wall"]:
                    best[sharing] = result
        shared_prefix.copyable = copyable
        for sharing, result in best.items():
            print(json.dumps({"load": name, "sharing": sharing, "seconds": round(result["wall"], 3),
                              "ttft_p50_ms": round(1e3 * result["ttft_p50"], 1),
                              "ttft_max_ms": round(1e3 * result["ttft_max"], 1), "prompt_tokens_read": result["read"],
                              "threads": torch.get_num_threads()}))
        if best["on"]["answers"] != best["off"]["answers"]:
            print(f"{name}: the answers differ with sharing on and off", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
