"""The board on a big run: start-up time, and a 100k-line trainer_log.jsonl served and drawn.

    python benchmarks/bench_board.py                 # 100k lines x 12 metrics
    python benchmarks/bench_board.py --lines 300000

Writes a synthetic run (LLaMA-Factory's trainer_log fields plus RL metrics), starts `tunesmith board`
as a user does and times: process start -> first answer; the first /api/metrics (parse + thin) and
its size; an update after 10 more lines (only the new bytes are read); and, when Chromium is
installed, the run page from navigation to every chart drawn, and one redraw (the smoothing slider).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

METRICS = ("loss", "lr", "grad_norm", "tokens_per_second", "reward", "score", "kl", "entropy", "response_length",
           "policy/clipfrac", "score_std", "eval_loss")


def write_run(folder: Path, lines: int, start: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_config.yaml").write_text("stage: grpo\nmodel_name_or_path: bench\ndataset: bench\n")
    rng = random.Random(start)
    with open(folder / "trainer_log.jsonl", "a") as handle:
        for step in range(start, start + lines):
            record = {"current_steps": step, "total_steps": lines, "epoch": step / lines,
                      "elapsed_time": time.strftime("%H:%M:%S", time.gmtime(step * 0.5))}
            record.update({name: math.exp(-step / lines) + rng.gauss(0, 0.05) for name in METRICS
                           if name != "eval_loss" or step % 100 == 0})
            handle.write(json.dumps(record) + "\n")


def get(url: str) -> tuple[float, bytes]:
    began = time.perf_counter()
    with urllib.request.urlopen(url) as response:
        body = response.read()
    return time.perf_counter() - began, body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def browser_times(url: str) -> dict:
    """Navigation -> every chart drawn, and one redraw, in Chromium (skipped when none is installed)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {}
    if executable is None:
        return {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        began = time.perf_counter()
        page.goto(url + "#/run/big")
        page.wait_for_function(f"document.querySelectorAll('.chart-box svg').length >= {len(METRICS) - 1}", timeout=120_000)
        drawn = time.perf_counter() - began
        redraw = page.evaluate("""() => { const s = document.querySelector('#smoothing'); const t = performance.now();
            s.value = '0.9'; s.dispatchEvent(new Event('input')); return performance.now() - t; }""")
        browser.close()
    return {"page_drawn_seconds": round(drawn, 3), "redraw_all_charts_ms": round(redraw, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tunesmith_bench_board_"))
    write_run(root / "big", args.lines)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "tunesmith", "board", "--root", str(root), "--port", str(port)],
                              stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                get(url + "api/runs")
                break
            except OSError:
                time.sleep(0.02)
        started = time.perf_counter() - began
        first, body = get(url + "api/metrics?name=big")
        version = json.loads(body)["version"]
        write_run(root / "big", 10, start=args.lines + 1)
        update, _ = get(url + f"api/metrics?name=big&since={version}")
        result = {"lines": args.lines, "log_mb": round((root / "big" / "trainer_log.jsonl").stat().st_size / 1e6, 1),
                  "startup_seconds": round(started, 3), "first_metrics_seconds": round(first, 3),
                  "metrics_payload_kb": round(len(body) / 1e3, 1), "update_after_10_lines_seconds": round(update, 3),
                  "points_per_series": max(len(s["points"]) for s in json.loads(body)["series"].values())}
        result.update(browser_times(url))
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
