"""A conversation's later turns on the engine that `tunesmith chat` and `api` run: with finished rows kept
(`keep_finished`), each turn starts from the cache of the one before and reads only what is new.

    python benchmarks/bench_chat_turns.py                                     # 'small' random model
    python benchmarks/bench_chat_turns.py --model saves/lf_bench_real/model --template chatml --turns 8
    python benchmarks/bench_chat_turns.py --conversations 4     # four users taking turns, one at a time

Loads the model as `tunesmith chat` does (`Engine.load`; without --model, a random-init `small` folder),
then holds the same conversation twice per round, kept rows on and off, alternating for --rounds: each
turn sends the whole history plus the next of a fixed list of user messages, seeded sampling, at most
--new-tokens tokens an answer. Per turn and setting it prints one JSON line: the prompt's tokens, the
prompt tokens the passes read, and the best round's time to first token. The answers must be the same
both ways, else the script exits 1. A turn reads more than its new message where the template's
rendering of the last answer re-encodes to other tokens than the ones drawn (a random model's text often
does; a trained model's rarely). With --conversations K, K conversations (each opening with its own
number) take turns one request at a time, as several users of one server do; the lines are per turn and
conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tunesmith.config import SamplingSettings
from tunesmith.inference.engine import Engine
from tunesmith.model.init_model import init_model
from tunesmith.sampling.slot_decoder import SlotDecoder
from tunesmith.training.configure import build_config

MESSAGES = ["Tell me a story about a cat and a dog who live in a small house by the sea.",
            "What did they do when the storm came?", "Who helped them fix the roof?",
            "Why was the dog afraid of the lighthouse?", "How did the story end for the cat?",
            "Give the story a title.", "Tell it again in three sentences.", "Which part did you like best?"]


def converse(engine: Engine, turns: int, conversations: int, settings: SamplingSettings,
             read: list[int]) -> list[dict]:
    """`conversations` conversations of `turns` turns, taking turns one request at a time: per turn and
    conversation its prompt's tokens, the tokens read, TTFT, the answer."""
    histories, results = [[] for _ in range(conversations)], []
    for turn in range(turns):
        for index, history in enumerate(histories):
            opening = f"Conversation {index + 1}. " if conversations > 1 and turn == 0 else ""
            history.append({"role": "user", "content": opening + MESSAGES[turn % len(MESSAGES)]})
            read[0], first = 0, []

            def on_token(row: int, token: int, first: list[float] = first) -> None:  # None: the row goes on
                first.append(time.perf_counter())

            began = time.perf_counter()
            answer = engine.generate([history], settings, seed=turn, on_token=on_token).response_ids[0]
            results.append({"turn": turn + 1, "conversation": index + 1, "prompt_tokens": len(engine.prompt_ids(history)),
                            "read": read[0], "ttft": first[0] - began, "answer": answer})
            history.append({"role": "assistant", "content": engine.decode(answer)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: a random-init 'small' one)")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=1, help="conversations taking turns, one request at a time")
    args = parser.parse_args()
    model = args.model or str(init_model(Path(tempfile.mkdtemp(prefix="tunesmith_bench_chat_")) / "model", size="small"))
    engine = Engine.load(build_config({"model_name_or_path": model, "template": args.template}, command="chat"))
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.9)
    read, forward = [0], SlotDecoder.forward

    def counted(self, tokens, positions, chunks, adapters):
        read[0] += sum(len(chunk.ids) for chunk in chunks)
        return forward(self, tokens, positions, chunks, adapters)

    SlotDecoder.forward = counted
    best: dict[bool, list[dict]] = {}
    for _ in range(args.rounds):
        for keep in (True, False):
            engine.scheduler.keep_finished, engine.scheduler.kept = keep, {}
            results = converse(engine, args.turns, args.conversations, settings, read)
            if keep in best:
                results = [min(a, b, key=lambda r: r["ttft"]) for a, b in zip(results, best[keep])]
            best[keep] = results
    for index in range(len(best[True])):
        for keep in (True, False):
            result = best[keep][index]
            conversation = {"conversation": result["conversation"]} if args.conversations > 1 else {}
            print(json.dumps({"turn": result["turn"], **conversation, "keep_finished": keep,
                              "prompt_tokens": result["prompt_tokens"], "prompt_tokens_read": result["read"],
                              "ttft_ms": round(1e3 * result["ttft"], 1)}))
    if [r["answer"] for r in best[True]] != [r["answer"] for r in best[False]]:
        print("the answers differ with kept rows on and off", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
