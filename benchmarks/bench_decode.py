"""Decode speed and agreement of the three decode paths: CUDA graph, eager lean decoder, transformers.

    python benchmarks/bench_decode.py                        # 40M Qwen2, 4 prompts, 64 new tokens, fp32
    python benchmarks/bench_decode.py --dtype bf16 --lora    # on a GPU; --lora: an unmerged LoRA adapter

Each line: seconds per `generate` call (best of --repeats) for each path, and how the graph path's
output compares with the other two (tokens equal, the shortest agreeing prefix of a row, and the
largest log-prob difference on it). Sampled rows can part on float rounding where the distribution is
flat (a random-init model's is), so equal greedy tokens are the real check. Off CUDA the "graph" path
runs the same static-shape step eagerly.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.sampling import cached_decoder
from tunesmith.sampling.generate import SamplingSettings, generate

PATHS = ("graph", "eager", "transformers")


def timed_generate(model, prompts, settings: SamplingSettings, path: str, samples: int):
    supports, can_graph = cached_decoder.supports, cached_decoder._can_graph
    try:
        if path == "transformers":
            cached_decoder.supports = lambda model, length: False
        cached_decoder._can_graph = (lambda rotary, device: True) if path == "graph" else (lambda rotary, device: False)
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        generator = torch.Generator(model.device).manual_seed(0)
        out = generate(model, prompts, settings, [], 0, samples, generator, record=True)
        sync()
        return out, time.perf_counter() - start
    finally:
        cached_decoder.supports, cached_decoder._can_graph = supports, can_graph


def agreement(a, b) -> dict:
    equal = sum(x == y for r, s in zip(a.response_ids, b.response_ids) for x, y in zip(r, s))
    prefix = min(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r))
                 for r, s in zip(a.response_ids, b.response_ids))
    diff = (a.logps[:, :prefix] - b.logps[:, :prefix]).abs().max().item() if prefix else float("nan")
    return {"tokens_equal": f"{equal}/{sum(len(r) for r in b.response_ids)}", "agreeing_prefix": prefix,
            "max_logp_diff": round(diff, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="40m")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--lora", action="store_true", help="an unmerged rank-8 LoRA adapter on every projection")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="tunesmith_bench_decode_") as tmp:
        folder = init_model(Path(tmp) / "model", arch="qwen2", size=args.init, seed=0)
        model = load_model(str(folder), dtype, device).eval()
    if args.lora:
        inject_lora(model, "all", 8, 16)
        torch.manual_seed(1)
        for _, module in lora_modules(model):
            torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 4000) for _ in range(rng.randint(10, 60))] for _ in range(args.prompts)]
    for mode, settings, samples in (("greedy", SamplingSettings(args.new_tokens, do_sample=False), 1),
                                    ("sampled x4", SamplingSettings(args.new_tokens, temperature=1.0), 4)):
        outputs = {path: timed_generate(model, prompts, settings, path, samples)[0] for path in PATHS}  # warm-up
        seconds = {path: round(min(timed_generate(model, prompts, settings, path, samples)[1]
                                   for _ in range(args.repeats)), 3) for path in PATHS}
        print(json.dumps({"device": device.type, "dtype": args.dtype, "lora": args.lora, "mode": mode,
                          "new_tokens": args.new_tokens, "seconds": seconds,
                          "graph_vs_eager": agreement(outputs["graph"], outputs["eager"]),
                          "graph_vs_transformers": agreement(outputs["graph"], outputs["transformers"])}))


if __name__ == "__main__":
    main()
