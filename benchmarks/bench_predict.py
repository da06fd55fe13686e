"""do_predict's speed: the decode scheduler (continuous batching) against fixed batches, on one eval set.

    python benchmarks/bench_predict.py                          # 40M Qwen2-shaped model, 200 prompts, greedy
    python benchmarks/bench_predict.py --size small --prompts 200 --batch-size 8

Builds a random-init model (`tunesmith init-model --size`) and a seeded eval set of --prompts chat
prompts (8-200 tokens of the bundled corpus; each asks for an answer of up to 16-128 tokens, drawn per
prompt, as max_new_tokens caps a real model's answers at different lengths), then answers them three ways in
one process and prints one JSON line per way:
- "fixed batches": what do_predict did before the scheduler, batches of --batch-size prompts
  (per_device_eval_batch_size) through `generate`, each batch running until its longest answer ends;
- "scheduler": every prompt submitted to the engine's decode scheduler at once (max_num_seqs rows run
  together; a row that ends makes room for the next prompt at once), as `tunesmith train` with
  do_predict now runs, on the calling thread (`run_here`);
- "scheduler on its own thread": the same through `submit`, the scheduler's own loop thread (do_predict
  before 2026-12-07; on a CPU a second thread's OpenMP pool slows every pass, see `run_here`).
All greedy; every answer must be the same both ways, else the script exits 1. The random model never
says its stop token, so each answer runs to its own max_new_tokens; the lengths differ from prompt to
prompt, which is where fixed batches wait on their longest row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tunesmith.config import SamplingSettings
from tunesmith.data.templates import get_template
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model
from tunesmith.sampling.generate import generate
from tunesmith.sampling.rows import RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler

sys.path.insert(0, str(Path(__file__).parent))
from bench_api_load import make_requests  # noqa: E402 - the same seeded prompts as the api load test


def eval_prompts(tokenizer, count: int, seed: int) -> list[tuple[list[int], int]]:
    """(chatml prompt ids, answer length) per eval row: bench_api_load's request mix."""
    template = get_template("chatml", tokenizer)
    return [(template.encode_prompt(tokenizer, request["messages"], None), request["max_tokens"])
            for request in make_requests(tokenizer, count, seed)]


def fixed_batches(model, rows, batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` prompts through `generate`; a batch decodes until its longest answer ends."""
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        longest = max(length for _, length in batch)
        generation = generate(model, [ids for ids, _ in batch], SamplingSettings(max_new_tokens=longest,
                                                                                 do_sample=False), [], 0)
        answers += [ids[:length] for ids, (_, length) in zip(generation.response_ids, batch)]
    return answers


def scheduled(model, rows, max_rows: int, on_a_thread: bool = False) -> list[list[int]]:
    """Every prompt at once, decoded on this thread as do_predict does (`run_here`), or on the loop's own
    thread (`submit`, as do_predict did before)."""
    scheduler = DecodeScheduler(model, max_rows=max_rows)
    requests = [[RowRequest(ids, SamplingSettings(max_new_tokens=length, do_sample=False), [])] for ids, length in rows]
    if on_a_thread:
        groups = [scheduler.submit(parts) for parts in requests]
    else:
        groups = scheduler.run_here(requests)
    return [group.result().response_ids[0] for group in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="40m", help="init-model size preset (tiny, small, 40m, qwen2-0.5b)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="fixed batches' size (per_device_eval_batch_size)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the scheduler's rows (max_num_seqs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = init_model(Path(tempfile.mkdtemp(prefix="tunesmith_bench_predict_")) / "model", size=args.size,
                        seed=args.seed)
    model = load_model(str(folder), torch.float32, torch.device("cpu")).eval()
    rows = eval_prompts(AutoTokenizer.from_pretrained(folder), args.prompts, args.seed)
    scheduled(model, rows[:2], args.max_num_seqs)  # first-call set-up, not measured
    results = {}
    for name, run in (("fixed batches", lambda: fixed_batches(model, rows, args.batch_size)),
                      ("scheduler", lambda: scheduled(model, rows, args.max_num_seqs)),
                      ("scheduler on its own thread", lambda: scheduled(model, rows, args.max_num_seqs, True))):
        began = time.perf_counter()
        results[name] = run()
        seconds = time.perf_counter() - began
        tokens = sum(map(len, results[name]))
        print(json.dumps({"way": name, "model": args.size, "prompts": len(rows), "seconds": round(seconds, 2),
                          "answer_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
                          "samples_per_second": round(len(rows) / seconds, 2)}), flush=True)
    for name in ("scheduler", "scheduler on its own thread"):
        if results["fixed batches"] != results[name]:
            differ = [i for i, (a, b) in enumerate(zip(results["fixed batches"], results[name])) if a != b]
            sys.exit(f"answers differ between fixed batches and the {name} for prompts {differ[:20]}")


if __name__ == "__main__":
    main()
