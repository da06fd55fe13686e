"""`tunesmith api` under load: throughput and latency as concurrent streaming clients grow.

    python benchmarks/bench_api_load.py                              # 'small' random model, 1,4,16,64 clients
    python benchmarks/bench_api_load.py --clients 1,4,16 --requests 32
    python benchmarks/bench_api_load.py --model saves/lf_bench_real/model --clients 1,4   # a folder you have
    python benchmarks/bench_api_load.py --peer llamafactory          # the same load on `llamafactory-cli api`
    python benchmarks/bench_api_load.py --peer llamafactory --lf-venv ../lf_venv --clients 1,4 --requests 8
    python benchmarks/bench_api_load.py --clients 16 --requests 96 --system-tokens 400   # one shared system prompt

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

--peer llamafactory also starts LLaMA-Factory's `llamafactory-cli api` from --lf-venv (default ../lf_venv
beside the repository, built by benchmarks/llamafactory/setup.sh) on the same folder, template and dtype
(`infer_backend: huggingface`, API_HOST/API_PORT; API_VERBOSE=0 so it does not log every request). Both
servers stay up; each level runs on tunesmith, then on LLaMA-Factory (close in time, as this machine's
load drifts), and a third line gives tunesmith / LLaMA-Factory for tokens/s and TTFT p99. Its stream
carries no usage (`usage_tokens` 0), so in this mode `generated_tokens` of both servers counts the tokens
of the answer text re-encoded by the model's tokenizer; tunesmith's `usage_tokens` shows how far that is
from the count generated (on the random model, whose text re-encodes poorly, 10-25% more). LLaMA-Factory's
hf engine runs one request at a time (`MAX_CONCURRENT`, default 1) and queues the rest without limit, so it
never answers 429; its streamer sends whole words, so its chunk gaps span several tokens. Each of its
answers must equal its own 1-client reference; how many differ from tunesmith's is reported, not failed
(on a random model near-tied logits flip under different kernels; stop tokens differ too).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import torch
import yaml
from transformers import AutoTokenizer

from tunesmith.inference.engine import inference_dtype
from tunesmith.model.init_model import init_model
from tunesmith.model.tokenizer_build import corpus_texts

MODEL_NAME = "bench"


def make_requests(tokenizer, count: int, seed: int, system_tokens: int = 0) -> list[dict]:
    """`count` chat requests: a prompt of 8-200 tokens cut from the corpus at a random place, max_tokens 16-128;
    with `system_tokens`, after one system message of that many corpus tokens that every request shares."""
    rng = random.Random(seed)
    corpus_ids = tokenizer.encode(" ".join(corpus_texts()), add_special_tokens=False)
    system = [{"role": "system", "content": tokenizer.decode(corpus_ids[:system_tokens]).strip()}] if system_tokens else []
    requests = []
    for _ in range(count):
        length = rng.randint(8, 200)
        start = rng.randrange(len(corpus_ids) - length)
        text = tokenizer.decode(corpus_ids[start:start + length]).strip()
        requests.append({"messages": system + [{"role": "user", "content": text}], "max_tokens": rng.randint(16, 128)})
    return requests


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held open together, so no two are the same)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def start_server(model: str, template: str | None, dtype: str, folder: Path, port: int,
                 overrides: list[str] = ()) -> subprocess.Popen:
    """`tunesmith api` on `model` at 127.0.0.1:`port` with `key=value` overrides; the caller waits for it."""
    config = {"model_name_or_path": model, "cutoff_len": 1024, "max_new_tokens": 128, "infer_dtype": dtype,
              "host": "127.0.0.1", "port": port}
    if template:
        config["template"] = template
    (folder / "api.yaml").write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "api", str(folder / "api.yaml"), *overrides],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "tunesmith.log", "w"))


def start_llamafactory(lf_venv: Path, model: str, template: str | None, dtype: str, folder: Path,
                       port: int) -> subprocess.Popen:
    """`llamafactory-cli api` (huggingface backend) on `model` at 127.0.0.1:`port`, from its own venv."""
    cli = lf_venv / "bin" / "llamafactory-cli"
    if not cli.exists():
        sys.exit(f"{cli} not found: build LLaMA-Factory's venv with benchmarks/llamafactory/setup.sh, or pass --lf-venv")
    config = {"model_name_or_path": model, "infer_backend": "huggingface", "infer_dtype": dtype}
    if template:
        config["template"] = template
    (folder / "lf_api.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": MODEL_NAME,
           "API_VERBOSE": "0"}
    return subprocess.Popen([str(cli), "api", str(folder / "lf_api.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(folder / "llamafactory.log", "w"))


def wait_ready(name: str, url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"{name} api exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/models", timeout=5).read()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{name} api did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(name: str, server: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, as a user would stop it. uvicorn shuts down gracefully, then re-raises the signal: LLaMA-Factory
    dies of it (-15), tunesmith turns it into exit status 143. Anything else is reported."""
    if server.poll() is not None:  # it died earlier, and that was reported then
        return
    server.terminate()
    try:
        code = server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        print(f"{name} api did not stop within {timeout:.0f} s of SIGTERM and was killed", file=sys.stderr)
        return
    if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        print(f"{name} api exited with {code} after SIGTERM", file=sys.stderr)


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
    return {"text": "".join(pieces), "tokens": tokens, "usage_tokens": tokens, "retries": retries,
            "ttft": (stamps[0] - began) if stamps else None,
            "gaps": [later - earlier for earlier, later in zip(stamps, stamps[1:])]}


async def run_level(base_url: str, requests: list[dict], clients: int, total: int,
                    ramp: float = 0.0) -> tuple[float, dict, int]:
    """`clients` concurrent clients over requests 0..total-1 (the mix repeated), client i starting
    ramp * i / clients seconds in: (wall seconds, {index: result}, errors)."""
    pending: asyncio.Queue = asyncio.Queue()
    for index in range(total):
        pending.put_nowait(index)
    results, errors = {}, []

    async def client_loop(client: openai.AsyncOpenAI, client_id: int) -> None:
        rng = random.Random(client_id)
        await asyncio.sleep(ramp * client_id / clients)
        async with client:
            while not pending.empty():
                index = pending.get_nowait()
                try:
                    results[index] = await stream_once(client, requests[index % len(requests)], rng)
                except openai.APIError as err:
                    errors.append(f"request {index}: {type(err).__name__}: {err}")

    # clients are built before the clock starts: building one takes the client process tens of ms, which
    # would otherwise delay reading the first answers and count as the server's time to first token
    made = [openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) for _ in range(clients)]
    began = time.perf_counter()
    await asyncio.gather(*(client_loop(client, i) for i, client in enumerate(made)))
    wall = time.perf_counter() - began
    for line in errors[:5]:
        print(line, file=sys.stderr)
    return wall, results, len(errors)


def summarize(server: str, clients: int, total: int, wall: float, results: dict, errors: int, mismatches: int,
              rss_mb: float) -> dict:
    ttfts = [r["ttft"] for r in results.values() if r["ttft"] is not None]
    gaps = [gap for r in results.values() for gap in r["gaps"]]
    tokens = sum(r["tokens"] for r in results.values())
    return {"server": server, "clients": clients, "requests": total, "seconds": round(wall, 2),
            "generated_tokens": tokens, "usage_tokens": sum(r["usage_tokens"] for r in results.values()),
            "tokens_per_second": round(tokens / wall, 1), "requests_per_second": round(len(results) / wall, 3),
            "ttft_p50_ms": round(1e3 * percentile(ttfts, 50), 1), "ttft_p99_ms": round(1e3 * percentile(ttfts, 99), 1),
            "itl_p50_ms": round(1e3 * percentile(gaps, 50), 2), "itl_p99_ms": round(1e3 * percentile(gaps, 99), 2),
            "rate_limited_429": sum(r["retries"] for r in results.values()),
            "requests_retried": sum(1 for r in results.values() if r["retries"]),
            "errors": errors, "mismatches": mismatches, "server_peak_rss_mb": round(rss_mb, 1)}


def compare(clients: int, summaries: dict, texts: dict) -> dict:
    """tunesmith / LLaMA-Factory at one level, and how many of their answers differ (reported, not failed)."""
    ours, peer = summaries["tunesmith"], summaries["llamafactory"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    return {"ratio": "tunesmith/llamafactory", "clients": clients,
            "tokens_per_second": ratio(ours["tokens_per_second"], peer["tokens_per_second"]),
            "ttft_p99": ratio(ours["ttft_p99_ms"], peer["ttft_p99_ms"]),
            "answers_differing_from_tunesmith": sum(text != texts["tunesmith"].get(index)
                                                    for index, text in texts["llamafactory"].items())}


def run_levels(servers: dict, requests: list[dict], levels: list[int], min_total: int, tokenizer,
               ramp: float = 0.0) -> int:
    """Every level on each server in turn, one JSON line each (and a ratio line with a peer). With
    `tokenizer`, tokens are counted from the answer text. 1 when a request failed or an answer differs
    from the same server's answer to the same request sent alone."""
    references, failed = {}, 0
    for clients in levels:
        total, summaries, texts = max(min_total, clients), {}, {}
        for name, (server, base_url) in servers.items():
            wall, results, errors = asyncio.run(run_level(base_url, requests, clients, total, ramp))
            if tokenizer is not None:  # after the clock stopped: the client's CPU is the servers' too
                for result in results.values():
                    result["tokens"] = len(tokenizer.encode(result["text"], add_special_tokens=False))
            texts[name] = {index: r["text"] for index, r in results.items()}
            if clients == 1:
                references[name] = texts[name]
            mismatches = sorted(index for index, text in texts[name].items()
                                if text != references[name].get(index % len(requests)))
            summaries[name] = summarize(name, clients, total, wall, results, errors, len(mismatches),
                                        peak_rss_mb(server.pid))
            print(json.dumps(summaries[name]), flush=True)
            if mismatches or errors:
                print(f"FAIL: {name} at {clients} clients: {errors} errors; answers that differ from the same "
                      f"request sent alone: {mismatches[:20]} (in fp32 there must be none; in bf16 or fp16 a batch's "
                      "matmuls round differently from one row's, and a greedy near-tie can flip)", file=sys.stderr)
                failed = 1
        if len(servers) > 1:
            print(json.dumps(compare(clients, summaries, texts)), flush=True)
    return failed


def launch_servers(servers: dict, args: argparse.Namespace, model: str, template: str | None, folder: Path,
                   requests: list[dict]) -> None:
    """Start `tunesmith api` (and the peer's) into `servers` as {name: (process, base url)}, in the
    dtype tunesmith picks; wait for each to answer, then warm each up with one unmeasured request."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(inference_dtype("auto", device)).removeprefix("torch.")
    ports = free_ports(2)
    servers["tunesmith"] = (start_server(model, template, dtype, folder, ports[0], args.set),
                            f"http://127.0.0.1:{ports[0]}/v1")
    if args.peer == "llamafactory":
        process = start_llamafactory(Path(args.lf_venv), model, template, dtype, folder, ports[1])
        servers["llamafactory"] = (process, f"http://127.0.0.1:{ports[1]}/v1")
    for name, (server, base_url) in servers.items():
        wait_ready(name, base_url, server, folder / f"{name}.log")
        asyncio.run(run_level(base_url, requests[:1], 1, 1))  # first-call set-up costs, not measured


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder to serve (default: a random-init 'small' model)")
    parser.add_argument("--template", help="chat template (default: chatml for the built model, else the tokenizer's own)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma list of concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="distinct requests in the mix, and per level "
                        "at least this many (a level sends max(requests, clients))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-tokens", type=int, default=0,
                        help="a system prompt of this many tokens that every request shares (prefix sharing)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for tunesmith api (repeatable), e.g. --set max_num_batched_tokens=2048")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which a level's clients start, evenly "
                        "(default 0: all at once, a burst whose prompts all wait to be read)")
    parser.add_argument("--peer", choices=["llamafactory"], help="also serve the model with this server and compare")
    parser.add_argument("--lf-venv", default=str(Path(__file__).resolve().parents[2] / "lf_venv"),
                        help="LLaMA-Factory's venv (default: ../lf_venv beside the repository)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    levels = sorted({1, *(int(c) for c in args.clients.split(","))})
    folder = Path(tempfile.mkdtemp(prefix="tunesmith_bench_api_"))
    servers = {}
    try:
        model, template = args.model, args.template
        if model is None:
            model, template = str(init_model(folder / "model", size="small", seed=args.seed)), template or "chatml"
        tokenizer = AutoTokenizer.from_pretrained(model)
        requests = make_requests(tokenizer, args.requests, args.seed, args.system_tokens)
        launch_servers(servers, args, model, template, folder, requests)
        gc.collect()  # this process imported torch and transformers: a collection walking their million
        gc.freeze()  # objects stalls the client for 100-300 ms, which would read as the server's latency
        sys.exit(run_levels(servers, requests, levels, args.requests, tokenizer if args.peer else None,
                            args.ramp))
    finally:
        for name, (server, _) in servers.items():
            stop_server(name, server)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
