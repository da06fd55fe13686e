"""`tunesmith api` under load: throughput and latency as concurrent streaming clients grow.

    python benchmarks/bench_api_load.py                              # 'small' random model, 1,4,16,64 clients
    python benchmarks/bench_api_load.py --clients 1,4,16 --requests 32
    python benchmarks/bench_api_load.py --model saves/lf_bench_real/model --clients 1,4   # a folder you have

It writes a model folder (`tunesmith init-model --size small` into a temp dir) unless --model names one,
starts `tunesmith api` on it as a user does (a small YAML in a temp dir, a free port on 127.0.0.1) and
waits for /v1/models, then sends one unmeasured warm-up request. The load is a fixed, seeded mix of --requests chat requests: prompts of 8-200
tokens of the bundled corpus's text, max_tokens 16-128, temperature 0. Each level of --clients runs that
many closed-loop clients (`openai.AsyncOpenAI`, streaming, usage included) over max(--requests, clients)
requests, the mix repeated. The server queues 32 requests beyond the one it runs and answers 429 past
that: a 429 is counted and retried after a jittered, growing backoff, so every request completes.

Per level it prints one JSON object: generated tokens/s and requests/s over the level's wall time, time
to first token (from the first attempt, so queueing and 429 backoff count) and inter-token latency (the
gaps between content chunks) at p50/p99, 429s and retries, errors, and the server's peak RSS so far
(VmHWM). Correctness: the 1-client level runs first (added if --clients lacks it) and its answers are
the reference; every answer at every level must equal its request's reference, else the script lists
the mismatches and exits 1. The client runs on the same machine and takes some of its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import yaml
from transformers import AutoTokenizer

from tunesmith.model.init_model import init_model
from tunesmith.model.tokenizer_build import corpus_texts

MODEL_NAME = "bench"


def make_requests(tokenizer, count: int, seed: int) -> list[dict]:
    """`count` chat requests: a prompt of 8-200 tokens cut from the corpus at a random place, max_tokens 16-128."""
    rng = random.Random(seed)
    corpus_ids = tokenizer.encode(" ".join(corpus_texts()), add_special_tokens=False)
    requests = []
    for _ in range(count):
        length = rng.randint(8, 200)
        start = rng.randrange(len(corpus_ids) - length)
        text = tokenizer.decode(corpus_ids[start:start + length]).strip()
        requests.append({"messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(16, 128)})
    return requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, template: str | None, folder: Path, port: int) -> subprocess.Popen:
    """`tunesmith api` on `model` at 127.0.0.1:`port`; the caller waits for it to answer."""
    config = {"model_name_or_path": model, "cutoff_len": 1024, "max_new_tokens": 128,
              "host": "127.0.0.1", "port": port}
    if template:
        config["template"] = template
    (folder / "api.yaml").write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "api", str(folder / "api.yaml")],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tunesmith api exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/models", timeout=5).read()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"tunesmith api did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def stream_once(client: openai.AsyncOpenAI, request: dict, rng: random.Random) -> dict:
    """One request to completion: its text, generated tokens, TTFT, chunk gaps and 429 retries."""
    began, retries = time.perf_counter(), 0
    while True:
        try:
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=request["messages"], max_tokens=request["max_tokens"], temperature=0,
                stream=True, stream_options={"include_usage": True})
            break
        except openai.RateLimitError:
            retries += 1  # backoff grows to ~2 s; jitter keeps the waiting clients from returning in step
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(retries, 6)) * (0.5 + rng.random()))
    pieces, stamps, tokens = [], [], 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                stamps.append(time.perf_counter())
    return {"text": "".join(pieces), "tokens": tokens, "retries": retries,
            "ttft": (stamps[0] - began) if stamps else None,
            "gaps": [later - earlier for earlier, later in zip(stamps, stamps[1:])]}


async def run_level(base_url: str, requests: list[dict], clients: int, total: int) -> tuple[float, dict, int]:
    """`clients` concurrent clients over requests 0..total-1 (the mix repeated): (wall seconds,
    {index: result}, errors)."""
    pending: asyncio.Queue = asyncio.Queue()
    for index in range(total):
        pending.put_nowait(index)
    results, errors = {}, []

    async def client_loop(client_id: int) -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
        rng = random.Random(client_id)
        async with client:
            while not pending.empty():
                index = pending.get_nowait()
                try:
                    results[index] = await stream_once(client, requests[index % len(requests)], rng)
                except openai.APIError as err:
                    errors.append(f"request {index}: {type(err).__name__}: {err}")

    began = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - began
    for line in errors[:5]:
        print(line, file=sys.stderr)
    return wall, results, len(errors)


def summarize(clients: int, total: int, wall: float, results: dict, errors: int, mismatches: int,
              rss_mb: float) -> dict:
    ttfts = [r["ttft"] for r in results.values() if r["ttft"] is not None]
    gaps = [gap for r in results.values() for gap in r["gaps"]]
    tokens = sum(r["tokens"] for r in results.values())
    return {"clients": clients, "requests": total, "seconds": round(wall, 2), "generated_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 1), "requests_per_second": round(len(results) / wall, 3),
            "ttft_p50_ms": round(1e3 * percentile(ttfts, 50), 1), "ttft_p99_ms": round(1e3 * percentile(ttfts, 99), 1),
            "itl_p50_ms": round(1e3 * percentile(gaps, 50), 2), "itl_p99_ms": round(1e3 * percentile(gaps, 99), 2),
            "rate_limited_429": sum(r["retries"] for r in results.values()),
            "requests_retried": sum(1 for r in results.values() if r["retries"]),
            "errors": errors, "mismatches": mismatches, "server_peak_rss_mb": round(rss_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder to serve (default: a random-init 'small' model)")
    parser.add_argument("--template", help="chat template (default: chatml for the built model, else the tokenizer's own)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma list of concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="distinct requests in the mix, and per level "
                        "at least this many (a level sends max(requests, clients))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    levels = sorted({1, *(int(c) for c in args.clients.split(","))})
    folder = Path(tempfile.mkdtemp(prefix="tunesmith_bench_api_"))
    server = None
    try:
        model, template = args.model, args.template
        if model is None:
            model, template = str(init_model(folder / "model", size="small", seed=args.seed)), template or "chatml"
        requests = make_requests(AutoTokenizer.from_pretrained(model), args.requests, args.seed)
        port = free_port()
        server = start_server(model, template, folder, port)
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_ready(base_url, server, folder / "server.log")
        asyncio.run(run_level(base_url, requests[:1], 1, 1))  # warm-up, not measured: first-call set-up costs
        reference, failed = {}, 0
        for clients in levels:
            total = max(args.requests, clients)
            wall, results, errors = asyncio.run(run_level(base_url, requests, clients, total))
            if clients == 1:
                reference = {index: r["text"] for index, r in results.items()}
            mismatches = sorted(index for index, r in results.items()
                                if r["text"] != reference.get(index % len(requests)))
            print(json.dumps(summarize(clients, total, wall, results, errors, len(mismatches),
                                       peak_rss_mb(server.pid))), flush=True)
            if mismatches or errors:
                print(f"FAIL at {clients} clients: {errors} errors; answers that differ from the same request "
                      f"sent alone: {mismatches[:20]}", file=sys.stderr)
                failed = 1
        sys.exit(failed)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
