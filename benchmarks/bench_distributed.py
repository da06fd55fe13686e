"""Data-parallel training on this machine's CPU cores: tokens/s scaling from 1 to 2 ranks, and the per-rank
peak memory of full fine-tuning with fsdp, both measured through `tunesmith train` itself.

    .venv/bin/python benchmarks/bench_distributed.py                          # both parts, table + JSON
    .venv/bin/python benchmarks/bench_distributed.py --skip-memory --steps 24 --repeats 2 --out dist.json
    .venv/bin/python benchmarks/bench_distributed.py --skip-memory --finetuning-type full    # full FT, ddp
    .venv/bin/python benchmarks/bench_distributed.py --skip-scaling --memory-size qwen2-0.5b

Scaling: SFT of the --size model (40m: a 41M-parameter Qwen2 shape, LoRA r8 on all linear layers, or
--finetuning-type full with `distributed_strategy: ddp`) on 1 rank x 1 thread (NPROC_PER_NODE unset,
OMP_NUM_THREADS=1, TUNESMITH_THREADS_PER_RANK=1) and on 2 ranks x 1 thread (NPROC_PER_NODE=2,
TUNESMITH_THREADS_PER_RANK=1). Every rank has the same micro-batch, so a 2-rank step trains twice the rows.
By default (--one-rank-rows same) the 1-rank run takes twice the steps and times exactly the rows the
2-rank run times, so the two rates are over the same samples (cost per token depends on row lengths).
The loop logs every step (`logging_steps: 1`); the tokens of each step on each rank are recomputed here
from the same rows in the same order and split (tunesmith's own sft data pipeline, `loop.epoch_order`
and `loop.step_rows` with the loop's balanced shares), so tokens/s over the timed steps is exact: sum(tokens_i) / sum(tokens_i /
tokens_per_second_i). The first --warmup steps (2 x --warmup for 1 rank with `same`) are left out.
Target: 2 ranks >= 1.8x the tokens/s of 1 rank (90% scaling efficiency).
--lengths uniform makes every sample about the same length, so the ranks' work is balanced and what is
left of the gap is the cost of running data-parallel itself; varied (as bench_train.py) has prompts of
10-60 and answers of 20-400 tokens; the loop deals each global step's rows to the ranks by length
(`loop.balanced_share`), and a step still waits for the rank with more tokens: `balance` says how much
that alone costs. A hardware baseline (one vs two single-threaded matmul / copy processes) says
what the machine itself allows. Each step's window is matched to the machine's CPU counters, and steps
in which other processes used more than --clean-cores cores are left out of the `clean` rates.

Memory: full fine-tuning of the --memory-size model (qwen2-0.5b: Qwen2-0.5B's shape, random init, the real
Qwen2 tokenizer from ../shared/assets when present) for --memory-steps steps, batch 1, cutoff_len 128:
one process against 2 ranks with fsdp. Every 0.1 s the benchmark reads VmHWM / VmRSS / RssAnon / RssFile
of every process under the command from /proc, and every Python process also writes its own ru_maxrss at
exit (a sitecustomize on PYTHONPATH), so a peak in the last moments is not missed. The high-water mark is
also read at the end of each phase: setup (until rank 0 prints its "[tunesmith] sft on ..." line: model
loaded, data built, weights sharded), train (until trainer_log.jsonl holds the last step) and save (the
result written, exit); "peak" is the whole run's. Target: per-rank peak <= 0.6x the single process's.
Without --work-dir everything is built in a temporary folder that is removed at the end; with it, the
models (the 0.5B one is 2 GB) and data are kept and reused.

CPU use is sampled as well: each rank's share of a core, and how many cores everything else on the
machine took during the run (a benchmark on a shared machine is only as good as that number is small).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_TOKENIZER = ROOT.parent / "shared/assets/qwen2_tokenizer"
SETUP_DONE = "[tunesmith] sft on"
CONTENDED_CORES = 0.2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SITECUSTOMIZE = '''\
import atexit, json, os, resource

def _write_peak():
    folder = os.environ.get("BENCH_PEAK_DIR")
    if folder:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        record = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "ru_maxrss_kb": peak}
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as out:
            json.dump(record, out)

atexit.register(_write_peak)
'''


# ---------------------------------------------------------------- watching the processes of a command


PHASES = ("setup", "train", "save")
"""setup: until rank 0 prints its "[tunesmith] sft on" line (model loaded, data built, weights sharded);
train: until trainer_log.jsonl holds the last step's record; save: writing the result, then exiting."""


@dataclass
class ProcStats:
    """What the watcher saw of one process (sizes in KiB, CPU in clock ticks)."""

    pid: int
    cmdline: str
    rank: int | None
    hwm_kb: int = 0
    rss_kb: int = 0
    max_anon_kb: int = 0
    max_file_kb: int = 0
    cpu_ticks: int = 0
    hwm_end_kb: dict = field(default_factory=dict)
    """Per phase: the high-water mark when it ended (a rise over the previous phase's happened in it)."""
    max_rss_kb: dict = field(default_factory=dict)
    """Per phase: the largest RSS sampled in it."""
    cpu_marks: dict = field(default_factory=dict)


class Watcher:
    """Polls /proc for every descendant of `root` (memory high-water marks, CPU time) until stopped, and
    follows the run's phases (see PHASES) from rank 0's output and the trainer log."""

    def __init__(self, root: int, log_path: Path, total_steps: int, interval: float = 0.1):
        self.root, self.log_path, self.total_steps, self.interval = root, log_path, total_steps, interval
        self.procs: dict[int, ProcStats] = {}
        self.marks: dict[str, tuple[float, list[int], int]] = {}
        self.phase = "setup"
        self._log_size, self._log_lines = -1, 0
        self.step_times: dict[int, float] = {}
        """When the watcher saw trainer_log.jsonl reach each number of records (within one interval)."""
        self.series: list[tuple[float, list[int], int, int]] = []
        """Samples during training: time, the machine's CPU counters, CPU ticks of the command's processes
        and of this benchmark, for the CPU use of other processes in any window (see `other_cores`)."""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watcher:
        self.mark("start")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._end_phase(None)
            self.mark("end")

    def setup_done(self) -> None:
        """Rank 0 printed its setup line: training starts."""
        with self._lock:
            if self.phase == "setup":
                self._end_phase("train")

    def mark(self, name: str) -> None:
        """Remember the machine's CPU counters and each process's CPU time under `name`."""
        with self._lock:
            self._sample()
            own = os.times()
            self.marks[name] = (time.perf_counter(), _machine_cpu(), round((own.user + own.system) * CLOCK_TICKS))
            for stats in self.procs.values():
                stats.cpu_marks[name] = stats.cpu_ticks

    def workers(self) -> list[ProcStats]:
        """The processes that train: those torchrun started (RANK set), else the command itself."""
        ranked = sorted((s for s in self.procs.values() if s.rank is not None), key=lambda s: s.rank)
        return ranked or [s for s in self.procs.values() if s.pid == self.root]

    def _end_phase(self, following: str | None) -> None:
        self._sample()
        for stats in self.procs.values():
            stats.hwm_end_kb.setdefault(self.phase, stats.hwm_kb)
        self.mark(f"{self.phase}_end")
        if following is not None:
            self.phase = following

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._sample()
                if self.phase != "train":
                    continue
                logged, now = self._steps_logged(), time.perf_counter()
                for step in range(len(self.step_times) + 1, logged + 1):
                    self.step_times[step] = now
                own = os.times()
                ticks = sum(stats.cpu_ticks for stats in self.procs.values())
                self.series.append((now, _machine_cpu(), ticks, round((own.user + own.system) * CLOCK_TICKS)))
                if logged >= self.total_steps:
                    self._end_phase("save")

    def _steps_logged(self) -> int:
        try:
            size = self.log_path.stat().st_size
        except OSError:
            return 0
        if size == self._log_size:
            return self._log_lines
        self._log_size, self._log_lines = size, self.log_path.read_bytes().count(b'"current_steps"')
        return self._log_lines

    def _sample(self) -> None:
        for pid in _descendants(self.root):
            status = _read(f"/proc/{pid}/status")
            stat = _read(f"/proc/{pid}/stat")
            if status is None or stat is None:
                continue
            stats = self.procs.get(pid) or self._new(pid)
            if stats is None:
                continue
            fields = _status_fields(status)
            stats.hwm_kb = max(stats.hwm_kb, fields.get("VmHWM", 0))
            stats.rss_kb = fields.get("VmRSS", 0)
            stats.max_rss_kb[self.phase] = max(stats.max_rss_kb.get(self.phase, 0), stats.rss_kb)
            stats.max_anon_kb = max(stats.max_anon_kb, fields.get("RssAnon", 0))
            stats.max_file_kb = max(stats.max_file_kb, fields.get("RssFile", 0))
            after_name = stat.rsplit(")", 1)[1].split()
            stats.cpu_ticks = int(after_name[11]) + int(after_name[12])  # utime + stime

    def _new(self, pid: int) -> ProcStats | None:
        cmdline = _read(f"/proc/{pid}/cmdline", binary=True)
        environ = _read(f"/proc/{pid}/environ", binary=True)
        if cmdline is None or environ is None:
            return None
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        rank = int(variables[b"RANK"]) if b"LOCAL_RANK" in variables and b"RANK" in variables else None
        stats = ProcStats(pid, cmdline.replace(b"\0", b" ").decode(errors="replace").strip(), rank)
        self.procs[pid] = stats
        return stats


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat is not None:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:  # the process has gone
        return None
    return data if binary else data.decode(errors="replace")


def _status_fields(status: str) -> dict[str, int]:
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0])
    return fields


def _machine_cpu() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal (clock ticks)."""
    with open("/proc/stat") as handle:
        return [int(x) for x in handle.readline().split()[1:9]]


def cpu_report(watcher: Watcher, since: str, until: str) -> dict:
    """Cores each worker used, cores everything else used, and steal, between two of the watcher's marks."""
    t0, m0, self0 = watcher.marks[since]
    t1, m1, self1 = watcher.marks[until]
    seconds = max(t1 - t0, 1e-9)
    delta = [b - a for a, b in zip(m0, m1)]
    busy = sum(delta) - delta[3] - delta[4]  # minus idle and iowait
    ours = sum(s.cpu_marks.get(until, s.cpu_ticks) - s.cpu_marks.get(since, 0) for s in watcher.procs.values())
    workers = {str(s.rank if s.rank is not None else 0):
               round((s.cpu_marks.get(until, s.cpu_ticks) - s.cpu_marks.get(since, 0)) / CLOCK_TICKS / seconds, 3)
               for s in watcher.workers()}
    return {"seconds": round(seconds, 2), "worker_cores": workers,
            "command_tree_cores": round(ours / CLOCK_TICKS / seconds, 3),
            "benchmark_itself_cores": round((self1 - self0) / CLOCK_TICKS / seconds, 3),
            "other_processes_cores": round(max(busy - delta[7] - ours - (self1 - self0), 0) / CLOCK_TICKS / seconds, 3),
            "steal_cores": round(delta[7] / CLOCK_TICKS / seconds, 3)}


def other_cores(watcher: Watcher, start: float, end: float) -> float | None:
    """Cores that processes other than the command and this benchmark used between two times in training
    (from the samples nearest inside the window), or None when the window holds fewer than two samples."""
    inside = [sample for sample in watcher.series if start <= sample[0] <= end]
    if len(inside) < 2:
        return None
    (t0, m0, ours0, self0), (t1, m1, ours1, self1) = inside[0], inside[-1]
    delta = [b - a for a, b in zip(m0, m1)]
    busy = sum(delta) - delta[3] - delta[4] - delta[7]
    return max(busy - (ours1 - ours0) - (self1 - self0), 0) / CLOCK_TICKS / max(t1 - t0, 1e-9)


def wait_for_quiet(timeout_s: float, max_cores: float = 0.25, quiet_s: int = 5) -> dict:
    """Wait (up to `timeout_s`) until the machine's other processes use under `max_cores` cores for
    `quiet_s` seconds in a row, so a run does not share the cores it measures; returns what was seen."""
    start, quiet, last = time.perf_counter(), 0, _machine_cpu()
    while time.perf_counter() - start < timeout_s and quiet < quiet_s:
        time.sleep(1.0)
        now = _machine_cpu()
        delta = [b - a for a, b in zip(last, now)]
        elapsed = max(sum(delta) / (os.cpu_count() or 1), 1e-9)  # ticks of one core
        busy = (sum(delta) - delta[3] - delta[4] - delta[7]) / elapsed  # cores busy, steal left out
        quiet, last = (quiet + 1 if busy < max_cores else 0), now
    waited = round(time.perf_counter() - start, 1)
    return {"waited_s": waited, "quiet": quiet >= quiet_s or timeout_s <= 0}


# ---------------------------------------------------------------- running `tunesmith train`


@dataclass
class RunResult:
    records: list[dict]
    watcher: Watcher
    wall_s: float
    exit_peaks_kb: dict[int, int]
    stdout: str
    quiet: dict


def run_train(config: dict, folder: Path, nproc: int, threads: int, timeout_s: float,
              quiet_wait_s: float = 0) -> RunResult:
    """`python -m tunesmith train cfg.yaml` with `nproc` ranks of `threads` threads, watched from outside
    (after waiting up to `quiet_wait_s` for the machine's other processes to go quiet)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    peaks = folder / "peaks"
    peaks.mkdir(exist_ok=True)
    for old in peaks.glob("*.json"):
        old.unlink()
    hook = folder / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "FORCE_TORCHRUN", "LOCAL_RANK", "RANK",
                        "WORLD_SIZE", "MASTER_PORT")}
    env.update(TUNESMITH_THREADS_PER_RANK=str(threads), OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               BENCH_PEAK_DIR=str(peaks), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])))
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    command = [sys.executable, "-m", "tunesmith", "train", str(config_path)]
    quiet = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else {"waited_s": 0, "quiet": None}
    start = time.perf_counter()
    with open(folder / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        watcher = Watcher(child.pid, Path(config["output_dir"]) / "trainer_log.jsonl", config["max_steps"]).start()
        lines = []
        timer = threading.Timer(timeout_s, child.kill)
        timer.start()
        try:
            for line in child.stdout:
                lines.append(line)
                if line.startswith(SETUP_DONE):
                    watcher.setup_done()
            child.wait()
        finally:
            if child.poll() is None:  # interrupted: stop the run (torchrun passes SIGTERM to its ranks)
                child.terminate()
                child.wait()
            timer.cancel()
            watcher.stop()
    wall = time.perf_counter() - start
    stdout = "".join(lines)
    (folder / "stdout.txt").write_text(stdout)
    if child.returncode != 0:
        tail = (folder / "stderr.txt").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} ({nproc} ranks) exited with {child.returncode}:\n{stdout}\n{tail}")
    log = Path(config["output_dir"]) / "trainer_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    exit_peaks = {int(r["pid"]): int(r["ru_maxrss_kb"])
                  for r in (json.loads(p.read_text()) for p in peaks.glob("*.json"))}
    return RunResult([r for r in records if "loss" in r], watcher, wall, exit_peaks, stdout, quiet)


# ---------------------------------------------------------------- models and data


def make_model(work: Path, size: str, tokenizer: str | None) -> Path:
    """A random-init model folder of preset `size` (kept in --work-dir between runs)."""
    folder = work / f"model-{size}"
    if (folder / "model.safetensors").exists():
        return folder
    command = [sys.executable, "-m", "tunesmith", "init-model", str(folder), "--size", size]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    print(f"[bench] building the {size} model: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return folder


def make_dataset(folder: Path, model: Path, n_records: int, lengths: str, seed: int = 0) -> Path:
    """Alpaca records from the bundled corpus: varied (prompts 10-60, answers 20-400 tokens) or uniform
    (every prompt 35 and every answer 210 tokens: the same means, so both do about the same work)."""
    from tunesmith.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    rng = random.Random(seed)
    corpus = (ROOT / "src/tunesmith/resources/corpus.txt").read_text().split()

    def text_of(n_tokens: int) -> str:
        start = rng.randrange(0, len(corpus) - 2 * n_tokens)
        ids = tokenizer(" ".join(corpus[start:start + 2 * n_tokens]), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:n_tokens])

    def sizes() -> tuple[int, int]:
        return (rng.randint(10, 60), rng.randint(20, 400)) if lengths == "varied" else (35, 210)

    records = [{"instruction": text_of(p), "input": "", "output": text_of(a)} for p, a in
               (sizes() for _ in range(n_records))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    return folder


def step_tokens(config: dict, world_size: int, steps: int) -> list[list[int]]:
    """Non-pad tokens of each step on each rank ([rank][step]), from tunesmith's own data pipeline and
    row order."""
    import torch

    from tunesmith.model.loading import load_tokenizer
    from tunesmith.training.configure import build_config
    from tunesmith.training.distributed import ProcessInfo
    from tunesmith.training.loop import epoch_order, row_tokens, step_rows, steps_per_epoch
    from tunesmith.training.stages import STAGES

    run_config = build_config(dict(config))
    tokenizer = load_tokenizer(config["model_name_or_path"])
    rows = STAGES["sft"].build_data(run_config, tokenizer, torch.device("cpu")).train
    per_row = [len(row["input_ids"]) for row in rows]
    lengths = [row_tokens(row) for row in rows] if world_size > 1 else None  # how the loop balances ranks
    rows_per_step = config["per_device_train_batch_size"] * config.get("gradient_accumulation_steps", 1)
    totals = [[0] * steps for _ in range(world_size)]
    for rank in range(world_size):
        proc = ProcessInfo(rank, world_size, rank, world_size)
        per_epoch = steps_per_epoch(len(rows), rows_per_step, proc)
        orders: dict[int, list[int]] = {}
        for step in range(steps):
            epoch, index = divmod(step, per_epoch)
            order = orders.setdefault(epoch, epoch_order(len(rows), config.get("seed", 42), epoch))
            totals[rank][step] = sum(per_row[i] for i in step_rows(order, index, rows_per_step, proc, lengths))
    return totals


# ---------------------------------------------------------------- part 1: scaling

PROBE = """
import sys, time, torch
torch.set_num_threads(1)
kind, start_at, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if kind == "matmul":  # a 40m-sized projection: 512 tokens x 512 -> 1536
    a, b = torch.randn(512, 512), torch.randn(512, 1536)
    work, unit = (lambda: a @ b), 2 * 512 * 512 * 1536
else:  # memory-bound: copy 64 MB
    x, y = torch.randn(16 << 20), torch.empty(16 << 20)
    work, unit = (lambda: y.copy_(x)), 2 * 4 * (16 << 20)
for _ in range(20):
    work()
while time.time() < start_at:
    time.sleep(0.001)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    work()
    n += 1
print(n * unit / (time.perf_counter() - t0))
"""


def hardware_baseline(seconds: float = 6.0) -> dict:
    """What the machine itself allows: single-threaded matmul FLOP/s and copy bandwidth of one process alone,
    and of two processes at once (their sum). Two cores that are in fact hyperthreads of one, or share a
    memory bus that one process already fills, cap the speedup of any 2-rank run below 2."""
    result = {}
    for kind in ("matmul", "copy"):
        rates = {}
        for procs in (1, 2):
            start_at = time.time() + 3.0  # both start together, after importing torch
            children = [subprocess.Popen([sys.executable, "-c", PROBE, kind, str(start_at), str(seconds)],
                                         stdout=subprocess.PIPE, text=True) for _ in range(procs)]
            rates[procs] = [float(child.communicate()[0]) for child in children]
        one, two = rates[1][0], sum(rates[2])
        unit = 1e9
        result[kind] = {"1proc": round(one / unit, 2), "2proc_each": [round(r / unit, 2) for r in rates[2]],
                        "2proc_sum": round(two / unit, 2), "ratio": round(two / one, 3),
                        "unit": "GFLOP/s" if kind == "matmul" else "GB/s"}
    return result


def gb(kb: int | None) -> float | None:
    """KiB (as /proc and ru_maxrss report them) in GB."""
    return None if kb is None else round(kb * 1024 / 1e9, 3)


def scaling(args: argparse.Namespace, work: Path) -> dict:
    model = make_model(work, args.size, None)
    total_steps = args.warmup + args.steps
    n_records = 2 * args.batch_size * total_steps + 8
    results = {"size": args.size, "finetuning_type": args.finetuning_type, "batch_size_per_rank": args.batch_size,
               "cutoff_len": args.cutoff_len, "warmup_steps": args.warmup, "timed_steps": args.steps, "runs": {},
               "best": {}, "contended_runs": 0, "clean_cores": args.clean_cores,
               "one_rank_rows": args.one_rank_rows}
    if args.baseline:
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else {}
        print("[bench] hardware baseline: 1 and 2 single-threaded processes (matmul, copy)", flush=True)
        results["hardware_baseline"] = {**hardware_baseline(), "quiet_before": quiet}
    for lengths in args.lengths:
        data = make_dataset(work / f"data-{lengths}", model, n_records, lengths)
        results["runs"][lengths] = []
        for repeat in range(args.repeats):
            pair = {}
            for nproc in (1, 2) if repeat % 2 == 0 else (2, 1):  # alternate the order: a drift cancels
                # Same rows: 1-rank step k takes rows [4k, 4k + 4) of the epoch's order and 2-rank step j rows
                # [8j, 8j + 8), so 1 rank running twice the steps times exactly the rows the 2 ranks time.
                factor = 2 if nproc == 1 and args.one_rank_rows == "same" else 1
                folder = work / f"scaling-{lengths}-{nproc}rank-{repeat}"
                config = scaling_config(args, model, data, folder / "out", factor * total_steps, nproc)
                print(f"[bench] scaling ({lengths} lengths): {nproc} rank(s) x 1 thread, {factor * total_steps} "
                      "steps", flush=True)
                run = run_train(config, folder, nproc, threads=1, timeout_s=args.timeout,
                                quiet_wait_s=args.wait_quiet)
                pair[f"{nproc}rank"] = scaling_run_summary(run, config, nproc, factor * args.warmup,
                                                           args.clean_cores)
            pair["speedup"] = round(pair["2rank"]["tokens_per_second"] / pair["1rank"]["tokens_per_second"], 3)
            pair["efficiency"] = round(pair["speedup"] / 2, 3)
            pair["speedup_over_load_balance"] = round(pair["speedup"] / pair["2rank"]["load_balance"], 3)
            clean = [pair[key]["clean_tokens_per_second"] for key in ("1rank", "2rank")]
            pair["clean_speedup"] = round(clean[1] / clean[0], 3) if all(clean) else None
            results["runs"][lengths].append(pair)
            results["contended_runs"] += sum(pair[k]["cpu_training"]["other_processes_cores"] > CONTENDED_CORES
                                             for k in ("1rank", "2rank"))
            print(f"[bench]   1 rank {pair['1rank']['tokens_per_second']:.1f} tok/s, 2 ranks "
                  f"{pair['2rank']['tokens_per_second']:.1f} tok/s: {pair['speedup']:.3f}x; steps with other "
                  f"processes under {args.clean_cores} cores: {pair['1rank']['clean_steps']} and "
                  f"{pair['2rank']['clean_steps']}, {pair['clean_speedup']}x", flush=True)
        results["best"][lengths] = best_of(results["runs"][lengths])
    return results


def best_of(pairs: list[dict]) -> dict:
    """The best 1-rank and 2-rank tokens/s over repeats (contention only ever lowers them), and the rate
    over the clean steps of every repeat pooled (sum of their tokens / sum of their seconds)."""
    best = {key: max(p[key]["tokens_per_second"] for p in pairs) for key in ("1rank", "2rank")}
    best["speedup"] = round(best["2rank"] / best["1rank"], 3)
    for key in ("1rank", "2rank"):
        runs = [p[key] for p in pairs]
        tokens = sum(r["step_tokens"][i] for r in runs for i in r["clean_step_indices"])
        seconds = sum(r["step_seconds"][i] for r in runs for i in r["clean_step_indices"])
        best[f"clean_{key}"] = round(tokens / seconds, 2) if seconds else None
        best[f"clean_{key}_steps"] = sum(len(r["clean_step_indices"]) for r in runs)
    clean = best["clean_1rank"], best["clean_2rank"]
    best["clean_speedup"] = round(clean[1] / clean[0], 3) if all(clean) else None
    # Pairs whose timed steps were all clean; their median speedup shrugs off one pair's drift.
    quiet = [p["speedup"] for p in pairs if all(p[k]["clean_steps"] == len(p[k]["step_seconds"]) - p[k]["warmup_steps"]
                                                for k in ("1rank", "2rank"))]
    best["clean_pairs"] = len(quiet)
    best["median_clean_pair_speedup"] = round(statistics.median(quiet), 3) if quiet else None
    best["median_pair_speedup"] = round(statistics.median(p["speedup"] for p in pairs), 3)
    return best


def scaling_config(args: argparse.Namespace, model: Path, data: Path, out: Path, steps: int, nproc: int) -> dict:
    config = {
        "model_name_or_path": str(model), "stage": "sft", "finetuning_type": args.finetuning_type,
        "dataset": "bench", "dataset_dir": str(data), "template": "qwen", "cutoff_len": args.cutoff_len,
        "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 1, "save_steps": 0,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "max_steps": steps, "seed": 42, "distributed_strategy": "ddp",
    }
    if args.finetuning_type == "lora":
        config.update(lora_rank=8, lora_target="all")
    return config


def scaling_run_summary(run: RunResult, config: dict, nproc: int, warmup: int, clean_cores: float) -> dict:
    records = sorted(run.records, key=lambda r: r["current_steps"])
    steps = len(records)
    per_rank = step_tokens(config, nproc, steps)
    tokens = [sum(rank[i] for rank in per_rank) for i in range(steps)]
    # A step waits for its slowest rank: with time ~ tokens, the speedup N ranks can reach is N x balance.
    balance = sum(tokens[i] for i in range(warmup, steps)) / (
        nproc * sum(max(rank[i] for rank in per_rank) for i in range(warmup, steps)))
    seconds = [tokens[r["current_steps"] - 1] / r["tokens_per_second"] for r in records]
    timed = range(warmup, steps)
    rate = sum(tokens[i] for i in timed) / sum(seconds[i] for i in timed)
    step_s = [seconds[i] for i in timed]
    times = run.watcher.step_times  # step i (0-based) ran between records i and i + 1
    others = [other_cores(run.watcher, times[i], times[i + 1]) if i in times and i + 1 in times else None
              for i in range(steps)]
    clean = [i for i in timed if others[i] is not None and others[i] < clean_cores]
    clean_rate = sum(tokens[i] for i in clean) / sum(seconds[i] for i in clean) if clean else None
    workers = run.watcher.workers()
    cpu = cpu_report(run.watcher, "setup_end", "train_end" if "train_end" in run.watcher.marks else "end")
    worker_cpu_s = sum(cpu["worker_cores"].values()) * cpu["seconds"]
    return {
        "ranks": nproc, "warmup_steps": warmup, "tokens_per_second": round(rate, 2),
        "clean_steps": len(clean), "clean_step_indices": clean, "clean_tokens_per_second": round(clean_rate, 2) if clean_rate else None,
        "load_balance": round(balance, 4), "step_tokens": tokens, "step_tokens_per_rank": per_rank, "step_seconds": [round(x, 3) for x in seconds],
        "step_other_cores": [None if x is None else round(x, 3) for x in others],
        "tokens_per_step": round(statistics.mean(tokens[i] for i in timed), 1),
        "step_seconds_mean": round(statistics.mean(step_s), 3), "step_seconds_min": round(min(step_s), 3),
        "step_seconds_max": round(max(step_s), 3),
        "window_tokens_per_second": [r["tokens_per_second"] for r in records],
        "final_loss": records[-1]["loss"], "wall_s": round(run.wall_s, 1),
        "peak_rss_gb_per_rank": [gb(w.hwm_kb) for w in workers],
        "tokens_per_worker_cpu_second": round(sum(tokens) / max(worker_cpu_s, 1e-9), 2),
        "cpu_training": cpu,
        "quiet_before": run.quiet,
    }


# ---------------------------------------------------------------- part 2: memory


def memory(args: argparse.Namespace, work: Path) -> dict:
    tokenizer = args.tokenizer if args.tokenizer and Path(args.tokenizer).exists() else None
    model = make_model(work, args.memory_size, tokenizer)
    n_records = 2 * args.memory_steps + 8
    data = make_dataset(work / "data-memory", model, n_records, "varied")
    results = {"size": args.memory_size, "tokenizer": tokenizer, "finetuning_type": "full",
               "cutoff_len": args.memory_cutoff_len, "batch_size_per_rank": 1, "steps": args.memory_steps,
               "gradient_checkpointing": args.gradient_checkpointing, "runs": {}}
    for label, nproc, strategy in (("1proc", 1, "ddp"), ("fsdp2rank", 2, "fsdp")):
        folder = work / f"memory-{label}"
        config = {
            "model_name_or_path": str(model), "stage": "sft", "finetuning_type": "full", "dataset": "bench",
            "dataset_dir": str(data), "template": "qwen", "cutoff_len": args.memory_cutoff_len,
            "output_dir": str(folder / "out"), "overwrite_output_dir": True, "logging_steps": 1, "save_steps": 0,
            "per_device_train_batch_size": 1, "learning_rate": 1e-5, "max_steps": args.memory_steps,
            "gradient_checkpointing": args.gradient_checkpointing, "distributed_strategy": strategy,
        }
        print(f"[bench] memory: full fine-tuning of {args.memory_size} on {nproc} process(es) ({strategy})",
              flush=True)
        run = run_train(config, folder, nproc, threads=args.memory_threads, timeout_s=args.timeout,
                        quiet_wait_s=min(args.wait_quiet, 60))
        results["runs"][label] = memory_run_summary(run, nproc, strategy)
    one = results["runs"]["1proc"]["per_rank"][0]["peak_gb"]
    two = max(r["peak_gb"] for r in results["runs"]["fsdp2rank"]["per_rank"])
    results["ratio_max_rank_over_1proc"] = round(two / one, 3)
    for phase in PHASES:
        one = results["runs"]["1proc"]["per_rank"][0]["vmhwm_at_end_of_gb"][phase]
        two = max(r["vmhwm_at_end_of_gb"][phase] or 0 for r in results["runs"]["fsdp2rank"]["per_rank"])
        results[f"ratio_vmhwm_at_end_of_{phase}"] = round(two / one, 3) if one else None
    return results


def memory_run_summary(run: RunResult, nproc: int, strategy: str) -> dict:
    per_rank = []
    for worker in run.watcher.workers():
        exit_peak = run.exit_peaks_kb.get(worker.pid)
        per_rank.append({
            "rank": worker.rank or 0, "pid": worker.pid,
            "peak_gb": gb(max(worker.hwm_kb, exit_peak or 0)), "polled_vmhwm_gb": gb(worker.hwm_kb),
            "exit_ru_maxrss_gb": gb(exit_peak),
            "vmhwm_at_end_of_gb": {phase: gb(worker.hwm_end_kb.get(phase)) for phase in PHASES},
            "max_sampled_rss_gb": {phase: gb(worker.max_rss_kb.get(phase)) for phase in PHASES},
            "max_rss_anon_gb": gb(worker.max_anon_kb), "max_rss_file_gb": gb(worker.max_file_kb),
        })
    others = [{"cmd": s.cmdline[:80], "peak_gb": gb(max(s.hwm_kb, run.exit_peaks_kb.get(s.pid, 0)))}
              for s in run.watcher.procs.values() if s not in run.watcher.workers()]
    records = sorted(run.records, key=lambda r: r["current_steps"])
    return {"ranks": nproc, "strategy": strategy, "per_rank": per_rank, "launcher_processes": others,
            "sum_of_ranks_peak_gb": round(sum(r["peak_gb"] for r in per_rank), 3),
            "final_loss": records[-1]["loss"] if records else None, "wall_s": round(run.wall_s, 1),
            "step_tokens_per_second": [r["tokens_per_second"] for r in records],
            "cpu": cpu_report(run.watcher, "start", "end")}


# ---------------------------------------------------------------- report


def print_report(results: dict) -> None:
    if "scaling" in results:
        s = results["scaling"]
        print(f"\nScaling: {s['size']} {s['finetuning_type']} SFT, batch {s['batch_size_per_rank']} per rank, "
              f"cutoff_len {s['cutoff_len']}, {s['timed_steps']} timed steps after {s['warmup_steps']} warm-up")
        print(f"{'lengths':8} {'ranks':>5} {'tok/s':>9} {'tok/step':>9} {'s/step':>7} {'tok/cpu-s':>9} {'cores/rank':>11} "
              f"{'other cores':>11} {'speedup':>8} {'eff.':>6} {'balance':>8} {'/balance':>8}")
        for lengths, pairs in s["runs"].items():
            for pair in pairs:
                for key in ("1rank", "2rank"):
                    r = pair[key]
                    cores = ",".join(f"{v:.2f}" for v in r["cpu_training"]["worker_cores"].values())
                    extra = (f"{pair['speedup']:>8.3f} {pair['efficiency']:>6.1%} {r['load_balance']:>8.3f} "
                             f"{pair['speedup_over_load_balance']:>8.3f}") if key == "2rank" else ""
                    print(f"{lengths:8} {r['ranks']:>5} {r['tokens_per_second']:>9.1f} {r['tokens_per_step']:>9.0f} "
                          f"{r['step_seconds_mean']:>7.2f} {r['tokens_per_worker_cpu_second']:>9.1f} {cores:>11} "
                          f"{r['cpu_training']['other_processes_cores']:>11.2f} "
                          f"{extra}")
        for lengths, best in s["best"].items():
            print(f"{lengths}: best of {len(s['runs'][lengths])}: 1 rank {best['1rank']:.1f}, 2 ranks {best['2rank']:.1f} "
                  f"tok/s = {best['speedup']:.3f}x; clean steps only ({best['clean_1rank_steps']} and "
                  f"{best['clean_2rank_steps']} steps with other processes under {s['clean_cores']} cores): "
                  f"{best['clean_1rank']} and {best['clean_2rank']} tok/s = {best['clean_speedup']}x; median speedup "
                  f"of all pairs {best['median_pair_speedup']}x, of the {best['clean_pairs']} wholly clean pairs "
                  f"{best['median_clean_pair_speedup']}x")
        base = s.get("hardware_baseline")
        if base:
            print(f"machine: 2 processes vs 1 (single-threaded): matmul {base['matmul']['ratio']:.3f}x "
                  f"({base['matmul']['1proc']} -> {base['matmul']['2proc_sum']} GFLOP/s), copy "
                  f"{base['copy']['ratio']:.3f}x ({base['copy']['1proc']} -> {base['copy']['2proc_sum']} GB/s)")
        print("balance: sum of the ranks' tokens / (2 x the larger rank's), over the timed steps: a step waits for "
              "its slower rank, so with time ~ tokens 2 ranks reach at most 2 x balance; /balance: the speedup "
              "with that taken out (what data-parallel itself costs).")
        print("target: speedup >= 1.8 (90% efficiency). cores/rank and other cores: during the training steps; "
              f"other cores above {CONTENDED_CORES} mean the run shared the machine and its numbers are low")
    if "memory" in results:
        m = results["memory"]
        print(f"\nMemory: full fine-tuning of {m['size']}, batch 1, cutoff_len {m['cutoff_len']}, {m['steps']} steps, "
              f"gradient_checkpointing {m['gradient_checkpointing']}. VmHWM (GB) at the end of each phase:")
        print(f"{'run':10} {'rank':>4} {'setup':>7} {'train':>7} {'peak':>7}   {'max anon':>8} {'max file':>8}")
        for label, run in m["runs"].items():
            for r in run["per_rank"]:
                at = r["vmhwm_at_end_of_gb"]
                print(f"{label:10} {r['rank']:>4} {at['setup'] or 0:>7.3f} {at['train'] or 0:>7.3f} {r['peak_gb']:>7.3f}   "
                      f"{r['max_rss_anon_gb']:>8.3f} {r['max_rss_file_gb']:>8.3f}")
        print(f"largest rank / 1 process: {m['ratio_max_rank_over_1proc']:.3f} (target <= 0.6); at the end of "
              f"setup {m['ratio_vmhwm_at_end_of_setup']}, of training {m['ratio_vmhwm_at_end_of_train']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40m", help="scaling: model size preset (init_model SIZE_PRESETS)")
    parser.add_argument("--finetuning-type", default="lora", choices=["lora", "full"], help="scaling (ddp)")
    parser.add_argument("--steps", type=int, default=16, help="scaling: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="scaling: leading steps left out")
    parser.add_argument("--batch-size", type=int, default=4, help="scaling: rows per rank per step")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--lengths", nargs="+", default=["varied", "uniform"], choices=["varied", "uniform"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="scaling: 1-rank/2-rank pairs per length mode, in alternating order")
    parser.add_argument("--one-rank-rows", default="same", choices=["same", "own"],
                        help="scaling: same: the 1-rank run takes twice the steps and times exactly the rows the "
                             "2-rank run times (row lengths then cannot favour either); own: the same step count")
    parser.add_argument("--clean-cores", type=float, default=0.15,
                        help="scaling: a step is clean when other processes used fewer cores than this during it")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="scaling: skip the 1-vs-2-process matmul/copy baseline of the machine itself")
    parser.add_argument("--memory-size", default="qwen2-0.5b")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="memory model's tokenizer folder")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-cutoff-len", type=int, default=128)
    parser.add_argument("--memory-threads", type=int, default=1, help="threads per process in the memory runs")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="memory runs")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--work-dir", help="keep models, data and run folders here (default: a temp folder)")
    parser.add_argument("--wait-quiet", type=float, default=120,
                        help="before each run, wait up to this many seconds for other processes to use < 0.25 "
                             "cores for 5 s (0: do not wait); the cores they took during a run are reported")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tunesmith_bench_dist_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                           "python": sys.version.split()[0]}, "work_dir": str(work) if args.work_dir else None}
    try:
        if not args.skip_scaling:
            results["scaling"] = scaling(args, work)
        if not args.skip_memory:
            results["memory"] = memory(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {args.out}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
