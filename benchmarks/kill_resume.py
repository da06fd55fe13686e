"""Kill -9 a training run at a random moment, resume it, and check it ends bit for bit where an uninterrupted run ends.

    python benchmarks/kill_resume.py                         # 20 trials on 2 ranks (torchrun, gloo, 1 thread each)
    python benchmarks/kill_resume.py --trials 5 --seed 3
    python benchmarks/kill_resume.py --nproc 1               # the single-process path
    python benchmarks/kill_resume.py --modes launcher-group  # kill -9 only `tunesmith train`'s process group
    python benchmarks/kill_resume.py --nproc 1 --trials 2 --kill-on tunesmith-partial   # during the final save
    python benchmarks/kill_resume.py --nproc 1 --trials 3 --save-total-limit 2 --kill-on '^checkpoint-6$'
    python benchmarks/kill_resume.py --keep --workdir /tmp/kr   # keep every trial's folder and logs

It builds a tiny random-init Qwen2 model and a small alpaca dataset offline, then runs `tunesmith train`
on a LoRA SFT config (dropout on, so each rank's RNG matters) once without interruption: the reference.
Each trial starts the same run in a fresh output_dir, in its own session, and SIGKILLs it after a random
delay. Most delays are drawn uniformly over the reference's training phase, counted from the moment
the trial's train_config.yaml appears (rank 0 writes it just before the first step): from then to
all_results.json appearing (the run's last file), stretched by `--overshoot`, so kills land during
steps, checkpoint writes, the final save and the shutdown. `--startup-share` of them are drawn over
the whole run from the launch instead, where imports and the model load take most of the time (a
uniform draw over the whole run alone would put nearly every kill there).
`--kill-on REGEX` replaces the delay by an event: the kill follows the creation of a matching name in
output_dir within microseconds (inotify), to hit a write of a millisecond on purpose.

What is killed, chosen at random among `--modes`:
- `all`: every process of the run (the launcher, torchrun and every rank), as a node crash would. The
  processes are found by a marker in their environment, because torchrun starts each rank in a session
  of its own: a kill of the launcher's process group alone does not reach the ranks.
- `rank`: one rank's process (a rank chosen at random; with --nproc 1 the one process); torchrun then
  tears the others down.
- `launcher-group` (not in the default set): `kill -9 -PGID` of the launcher's process group only.
  Ranks that outlive it are reported as orphans (a failure), then killed before the checks.

After the kill, and once no process of the run is left, every `checkpoint-N` folder must be complete
(trainer_state.json, trainable.safetensors, optimizer.safetensors, the adapter files, each rank's RNG
file), readable by tunesmith's own loader, and equal to the reference's checkpoint-N tensor for tensor.
The same command then runs again with `resume_from_checkpoint=true` (or, with no checkpoint yet,
`overwrite_output_dir=true`) to the end. The final adapter must equal the reference's bit for bit
(torch.equal), trainer_log.jsonl must hold the same records (step, loss, grad_norm, lr, epoch) in the same
order, the checkpoints must be the reference's, and no hidden entry (a name starting with '.') may be
left in output_dir.

One line per trial: when the kill landed, what it killed, where the run was, the latest checkpoint
left, and the result; then a summary. The exit status is 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tunesmith.algorithms.linear import GEMM_VARIABLE, gemm_for_children

MARKER = "KILL_RESUME_RUN"
"""Environment variable that tags every process of one run (launcher, torchrun, ranks)."""
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "NNODES", "NODE_RANK", "FORCE_TORCHRUN", "NPROC_PER_NODE")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_FILES = ("trainer_state.json", "trainable.safetensors", "optimizer.safetensors",
                    "adapter_model.safetensors", "adapter_config.json")
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "adapter_model.safetensors")
LOG_KEYS = ("loss", "grad_norm", "lr", "epoch")
MODES = ("all", "rank", "launcher-group")
POLL_S = 0.005


@dataclass
class Reference:
    """The uninterrupted run: its outputs and how long its phases took."""

    out: Path
    total_s: float
    """Launch to exit."""
    train_s: float
    """train_config.yaml appearing (just before the first step) to all_results.json appearing (the last
    file the run writes): the steps, the checkpoint writes and the final save."""
    adapter: dict[str, torch.Tensor]
    log: list[tuple[int, dict]]


@dataclass
class Trial:
    """One kill and resume, and what the checks found."""

    index: int
    mode: str
    delay_s: float
    anchored: bool
    """Whether the delay counts from train_config.yaml appearing (else from the launch)."""
    trigger: str | None = None
    """With --kill-on: the created name the kill answered (instead of a delay)."""
    kill_at_s: float = 0.0
    """Seconds from the launch to the kill."""
    killed: str = ""
    phase: str = ""
    latest: str = "none"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems

    def line(self) -> str:
        """The trial's one-line report."""
        anchor = "after train_config.yaml" if self.anchored else "after launch"
        when = f"on {self.trigger or 'nothing (the run ended first)'}" if self.trigger is not None \
            else f"{self.delay_s:5.2f}s {anchor}"
        result = "OK" if self.ok else "FAIL: " + "; ".join(self.problems)
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return (f"trial {self.index:2d}: kill at {self.kill_at_s:6.2f}s ({when}) | "
                f"killed {self.killed} | during {self.phase} | latest {self.latest} | {result}{notes}")


# --- inputs -----------------------------------------------------------------------------------------

def build_inputs(work: Path) -> tuple[Path, Path]:
    """A tiny random-init model folder and a 16-record alpaca dataset (no network)."""
    from tunesmith.model.init_model import init_model

    model = init_model(work / "model", arch="qwen2", size="tiny", seed=0)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": f"Repeat the number {i} in words.", "input": "" if i % 3 else f"n={i}",
                "output": f"The number is {i}, written out as {i} ones."} for i in range(16)]
    (data / "tiny.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return Path(model), data


def settings_for(args: argparse.Namespace, model: Path, data: Path) -> dict:
    """The LoRA SFT run every trial repeats (output_dir is set per run)."""
    settings = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 4, "lora_target": "all", "lora_dropout": args.lora_dropout,
        "dataset": "tiny", "dataset_dir": str(data), "cutoff_len": 64,
        "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_steps": args.max_steps,
        "save_steps": args.save_steps, "logging_steps": 1, "seed": 0, "report_to": "none",
    }
    if args.save_total_limit:
        settings["save_total_limit"] = args.save_total_limit
    return settings


def write_config(folder: Path, settings: dict) -> Path:
    """A fresh folder/train.yaml with output_dir = folder/out (what an earlier use of the folder left is removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({**settings, "output_dir": str(folder / "out")}, sort_keys=False))
    return path


# --- processes --------------------------------------------------------------------------------------

def launch(config: Path, overrides: list[str], nproc: int, log: Path, marker: str) -> subprocess.Popen:
    """`python -m tunesmith train config overrides` in a new session, every rank on one thread."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    env.update({MARKER: marker, "NPROC_PER_NODE": str(nproc), "TUNESMITH_THREADS_PER_RANK": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # the reference and every trial multiply alike: one GEMM, as this process timed it (each run's own
    # timing may choose differently on a machine near the threshold: algorithms/linear.py)
    env[GEMM_VARIABLE] = gemm_for_children()
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(config), *overrides], env=env,
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=config.parent)


@dataclass
class Proc:
    """A live process of a run, as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    rank: int | None
    role: str


def run_processes(marker: str, launcher_pid: int) -> list[Proc]:
    """Every live (non-zombie) process whose environment carries this run's marker."""
    tag = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if tag not in environ or fields[0] == "Z":
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        rank = int(env[b"RANK"]) if b"LOCAL_RANK" in env and b"RANK" in env else None
        pid = int(entry)
        role = (f"rank{rank}" if rank is not None else "torchrun" if b"torch.distributed.run" in cmdline
                else "launcher" if pid == launcher_pid else "other")
        found.append(Proc(pid, int(fields[1]), int(fields[2]), rank, role))
    return found


def kill_all(marker: str, launcher_pid: int, known: list[Proc] | None = None, rounds: int = 200) -> list[str]:
    """SIGKILL every process of the run until none is left: `known` ones at once (a scan of /proc takes
    milliseconds), then whatever a scan finds (torchrun before the ranks, so it starts no more)."""
    killed: list[str] = []
    procs = sorted(known or [], key=lambda p: p.rank is not None)
    for _ in range(rounds):
        for proc in procs:
            if not _kill_if_ours(proc.pid, marker):
                continue
            if proc.role not in killed:
                killed.append(proc.role)
        procs = sorted(run_processes(marker, launcher_pid), key=lambda p: p.rank is not None)
        if not procs:
            break
        time.sleep(0.01)
    return killed


def _kill_if_ours(pid: int, marker: str) -> bool:
    """SIGKILL `pid` if it still carries the run's marker (a pid seen earlier may have been reused since)."""
    try:
        if f"{MARKER}={marker}".encode() not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return False
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        return False
    return True


def _signal(pid: int, signum: int) -> None:
    """Signal our own child (or, with a negative pid, its process group): it cannot have been reused, as
    the child is not reaped yet."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_gone(popen: subprocess.Popen, marker: str, timeout_s: float) -> bool:
    """Reap the launcher and wait until no process of the run is alive; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        popen.poll()
        if popen.returncode is not None and not run_processes(marker, popen.pid):
            return True
        time.sleep(0.05)
    return False


def kill(trial: Trial, popen: subprocess.Popen, marker: str, nproc: int, rng: random.Random,
         known: list[Proc]) -> None:
    """Deliver the trial's kill (to `known`, the run's processes seen lately, first); record what it killed
    and any process that outlived it."""
    if popen.poll() is not None:
        trial.killed = f"nothing (the run had exited, status {popen.returncode})"
        return
    if trial.mode == "all":
        trial.killed = "all (" + ", ".join(kill_all(marker, popen.pid, known)) + ")"
    elif trial.mode == "rank":
        _kill_one_rank(trial, popen, marker, nproc, rng, known)
    else:
        groups = {p.pgid for p in run_processes(marker, popen.pid)}
        _signal(-popen.pid, signal.SIGKILL)  # os.kill with a negative pid: the whole process group
        trial.killed = f"launcher's process group {popen.pid}"
        time.sleep(0.1)  # SIGKILL is delivered at once: whatever still runs now survived it
        orphans = [p for p in run_processes(marker, popen.pid) if p.pgid != popen.pid]
        if orphans:
            trial.problems.append(
                f"orphans: {', '.join(p.role for p in orphans)} (own process groups {sorted(groups - {popen.pid})}) "
                "kept running after kill -9 of the launcher's process group")
            kill_all(marker, popen.pid)
    if not wait_gone(popen, marker, timeout_s=120):
        left = run_processes(marker, popen.pid)
        trial.problems.append(f"hang: {', '.join(p.role for p in left)} still alive 120 s after the kill")
        kill_all(marker, popen.pid)
        wait_gone(popen, marker, timeout_s=30)


def _kill_one_rank(trial: Trial, popen: subprocess.Popen, marker: str, nproc: int, rng: random.Random,
                   known: list[Proc]) -> None:
    """SIGKILL one rank (waiting for torchrun to start the ranks if it has not yet)."""
    if nproc == 1:
        _signal(popen.pid, signal.SIGKILL)
        trial.killed = "rank0 (the only process)"
        return
    rank = rng.randrange(nproc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and popen.poll() is None:
        ranks = {p.rank: p for p in known or run_processes(marker, popen.pid) if p.rank is not None}
        known = []
        if rank in ranks and _kill_if_ours(ranks[rank].pid, marker):
            trial.killed = f"rank{rank} only"
            return
        time.sleep(POLL_S)
    trial.killed = f"nothing (rank{rank} never appeared; status {popen.returncode})"


class CreationWatch:
    """Names created in (or renamed into) one folder, as inotify reports them (Linux): a kill can follow a
    file's creation within microseconds, where polling the folder would miss a write of a millisecond."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {folder}")

    def names(self) -> list[str]:
        """Names created since the last call (none: an empty list, without waiting)."""
        try:
            buffer = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        names, offset = [], 0
        while offset < len(buffer):
            length = int.from_bytes(buffer[offset + 12:offset + 16], sys.byteorder)
            names.append(buffer[offset + 16:offset + 16 + length].rstrip(b"\0").decode(errors="replace"))
            offset += 16 + length
        return names

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)


# --- runs -------------------------------------------------------------------------------------------

def run_to_end(config: Path, overrides: list[str], nproc: int, log: Path, timeout_s: float) -> int:
    """Run the command to completion; its exit status (after killing it, 124 on timeout)."""
    marker = uuid.uuid4().hex
    popen = launch(config, overrides, nproc, log, marker)
    try:
        return popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_all(marker, popen.pid)
        popen.wait()
        return 124
    finally:
        kill_all(marker, popen.pid)  # a rank torchrun left behind must not touch the next run's files


def reference_run(work: Path, settings: dict, nproc: int, timeout_s: float) -> Reference:
    """The uninterrupted run, timed: launch -> train_config.yaml -> all_results.json -> exit."""
    folder = work / "reference"
    config = write_config(folder, settings)
    out = folder / "out"
    marker = uuid.uuid4().hex
    start = time.monotonic()
    popen = launch(config, [], nproc, folder / "run.log", marker)
    train_start = results = None
    while popen.poll() is None:
        if train_start is None and (out / "train_config.yaml").exists():
            train_start = time.monotonic()
        if results is None and (out / "all_results.json").exists():
            results = time.monotonic()
        if time.monotonic() - start > timeout_s:
            kill_all(marker, popen.pid)
        time.sleep(POLL_S)
    end = time.monotonic()
    kill_all(marker, popen.pid)
    if popen.returncode != 0 or train_start is None or results is None:
        raise SystemExit(f"the reference run failed (status {popen.returncode}); see {folder / 'run.log'}:\n"
                         + tail(folder / "run.log"))
    return Reference(out, end - start, results - train_start, load_file(str(out / "adapter_model.safetensors")),
                     read_log(out))


def tail(path: Path, chars: int = 2000) -> str:
    """The end of a log file."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def read_log(out: Path) -> list[tuple[int, dict]]:
    """trainer_log.jsonl's training records in file order, as (step, the LOG_KEYS fields); a torn line raises."""
    path = out / "trainer_log.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["current_steps"], {k: r.get(k) for k in LOG_KEYS}) for r in records if "loss" in r]


# --- checks -----------------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders in out, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def check_checkpoint(step: int, folder: Path, reference: Reference, nproc: int) -> list[str]:
    """Complete, loadable by tunesmith, and equal to the reference's checkpoint of the same step."""
    from tunesmith.training.checkpoint import read_training_state

    wanted = [*CHECKPOINT_FILES, *(f"rng-rank{r}.safetensors" for r in range(1, nproc))]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        return [f"{folder.name} incomplete (missing {', '.join(missing)}; has {sorted(os.listdir(folder))})"]
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        names = set(load_file(str(folder / "trainable.safetensors")))
        read_training_state(folder, names, rank=nproc - 1)
        json.loads((folder / "adapter_config.json").read_text())
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the finding
        return [f"{folder.name} unreadable: {type(err).__name__}: {err}"]
    problems = [] if state.get("global_step") == step else [f"{folder.name} says global_step {state.get('global_step')}"]
    expected = reference.out / folder.name
    if expected.is_dir():
        for name in [*TENSOR_FILES, *(f"rng-rank{r}.safetensors" for r in range(1, nproc))]:
            differ = tensor_differences(load_file(str(expected / name)), load_file(str(folder / name)))
            if differ:
                problems.append(f"{folder.name}/{name} differs from the reference ({differ})")
    return problems


def tensor_differences(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """'' when both hold the same names with bit-identical tensors, else what differs."""
    if expected.keys() != got.keys():
        return f"names differ: {sorted(expected.keys() ^ got.keys())[:3]}"
    bad = [name for name in expected if not torch.equal(expected[name], got[name])]
    if not bad:
        return ""
    worst = max(float((expected[n].double() - got[n].double()).abs().max()) for n in bad)
    return f"{len(bad)} tensors, e.g. {bad[0]}, max abs diff {worst:.3g}"


def hidden_entries(out: Path) -> list[str]:
    """Names in output_dir that start with '.' (temporary folders and files of interrupted writes)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []


def phase_of(out: Path, total: int) -> str:
    """Where the killed run was, judged from what it left in output_dir."""
    if not (out / "train_config.yaml").exists():
        return "startup"
    hidden = hidden_entries(out)
    tmp = [name for name in hidden if name.startswith(".checkpoint-")]
    if tmp:
        return f"checkpoint write ({', '.join(tmp)})"
    try:
        logged = max((step for step, _ in read_log(out)), default=0)
    except (ValueError, KeyError) as err:
        return f"a log write (unreadable log: {err})"
    if (out / "all_results.json").exists():
        return "shutdown (results written)"
    if logged >= total:
        return "final save" + (f" ({', '.join(hidden)})" if hidden else "")
    return f"step {logged + 1}" if logged else "setup or step 1"


def check_resumed(trial: Trial, out: Path, reference: Reference, nproc: int) -> None:
    """The finished run equals the reference: adapter, log, checkpoints; no hidden leftovers."""
    final = out / "adapter_model.safetensors"
    if not final.is_file():
        trial.problems.append("no final adapter_model.safetensors")
    else:
        differ = tensor_differences(reference.adapter, load_file(str(final)))
        if differ:
            trial.problems.append(f"final adapter differs from the reference ({differ})")
    try:
        log = read_log(out)
    except (ValueError, KeyError) as err:
        trial.problems.append(f"trainer_log.jsonl unreadable after resume: {err}")
        log = reference.log
    if log != reference.log:
        steps, expected = [step for step, _ in log], [step for step, _ in reference.log]
        if steps != expected:
            trial.problems.append(f"log steps {steps} != reference {expected}")
        else:
            step, got, want = next((s, g, w) for (s, g), (_, w) in zip(log, reference.log) if g != w)
            trial.problems.append(f"log differs from step {step} on: {got} vs reference {want}")
    found = checkpoints(out)
    expected = [folder.name for _, folder in checkpoints(reference.out)]
    if [folder.name for _, folder in found] != expected:
        trial.problems.append(f"checkpoints after resume {[f.name for _, f in found]} != reference {expected}")
    for step, folder in found:
        trial.problems.extend(f"after resume: {p}" for p in check_checkpoint(step, folder, reference, nproc))
    leftovers = hidden_entries(out)
    if leftovers:
        trial.problems.append(f"hidden leftovers in output_dir after resume: {leftovers}")


# --- a trial ----------------------------------------------------------------------------------------

def wait_for_kill_moment(trial: Trial, popen: subprocess.Popen, marker: str, nproc: int, out: Path,
                         kill_on: str | None, watch: CreationWatch | None) -> list[Proc]:
    """Return when the trial's kill is due (or the run ended), with the run's processes as last seen.
    /proc is scanned only until every process has started (the launcher, torchrun, each rank), so that no
    scan of some milliseconds delays the kill."""
    complete = nproc + 2 if nproc > 1 else 1
    known: list[Proc] = []
    base = time.monotonic()
    while popen.poll() is None:
        if len(known) < complete:
            known = run_processes(marker, popen.pid)
        if watch is not None:
            select.select([watch.fd], [], [], 0.05 if len(known) >= complete else 0)
            hits = [name for name in watch.names() if re.search(kill_on, name)]
            if hits:
                trial.trigger = f"creation of {hits[0]}"
                return known
            continue
        if trial.anchored and not (out / "train_config.yaml").exists():
            base = time.monotonic()
        elif time.monotonic() >= base + trial.delay_s:
            return known
        time.sleep(POLL_S)
    return known


def run_trial(index: int, rng: random.Random, reference: Reference, args: argparse.Namespace, work: Path,
              settings: dict) -> Trial:
    """Start, kill, inspect, resume, compare."""
    anchored = rng.random() >= args.startup_share
    delay = rng.uniform(0, reference.train_s * args.overshoot if anchored else reference.total_s)
    trial = Trial(index, rng.choice(args.modes), delay, anchored)
    folder = work / f"trial-{index:02d}"
    config, out = write_config(folder, settings), folder / "out"
    watch = None
    if args.kill_on:  # the watch must exist before the run creates anything (an empty output_dir is allowed)
        out.mkdir(parents=True, exist_ok=True)
        watch, trial.trigger = CreationWatch(out), ""
    marker = uuid.uuid4().hex
    start = time.monotonic()
    popen = launch(config, [], args.nproc, folder / "killed.log", marker)
    known = wait_for_kill_moment(trial, popen, marker, args.nproc, out, args.kill_on, watch)
    trial.kill_at_s = time.monotonic() - start
    kill(trial, popen, marker, args.nproc, rng, known)
    if watch is not None:
        watch.close()
    trial.phase = phase_of(out, args.max_steps)
    found = checkpoints(out)
    trial.latest = found[-1][1].name if found else "none"
    for step, ckpt in found:
        trial.problems.extend(check_checkpoint(step, ckpt, reference, args.nproc))
    left = hidden_entries(out)
    if left:
        trial.notes.append(f"left by the kill: {', '.join(left)}")
    resume = ["resume_from_checkpoint=true"] if found else ["overwrite_output_dir=true"]
    status = run_to_end(config, resume, args.nproc, folder / "resume.log", args.timeout)
    if status != 0:
        trial.problems.append(f"{resume[0]} run exited {status}: {tail(folder / 'resume.log', 600)!r}")
    else:
        check_resumed(trial, out, reference, args.nproc)
    if trial.ok and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return trial


def summary(trials: list[Trial], reference: Reference, args: argparse.Namespace, work: Path) -> str:
    """Counts by mode and phase, then every failure."""
    failed = [t for t in trials if not t.ok]
    by_mode = {m: sum(t.mode == m for t in trials) for m in args.modes}
    phases: dict[str, int] = {}
    for t in trials:
        key = re.sub(r" \(.*", "", re.sub(r"^step \d+", "a step", t.phase))
        phases[key] = phases.get(key, 0) + 1
    lines = [
        f"summary: {len(trials) - len(failed)}/{len(trials)} trials passed "
        f"(nproc {args.nproc}, seed {args.seed}, {args.max_steps} steps, save_steps {args.save_steps}, "
        f"lora_dropout {args.lora_dropout}, save_total_limit {args.save_total_limit}; "
        f"reference {reference.total_s:.1f}s, training phase {reference.train_s:.2f}s)",
        f"  kills: {', '.join(f'{m} {n}' for m, n in by_mode.items())}; "
        f"landed during: {', '.join(f'{k} {n}' for k, n in sorted(phases.items()))}",
    ]
    lines += [f"  FAILED {t.line()}" for t in failed]
    if failed or args.keep:
        lines.append(f"  files kept in {work}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the reference and the trials, print the report; 1 if any trial failed."""
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = build_inputs(work)
    settings = settings_for(args, model, data)
    reference = reference_run(work, settings, args.nproc, args.timeout)
    print(f"reference: {args.nproc} process(es), {args.max_steps} steps in {reference.total_s:.1f}s "
          f"(training phase {reference.train_s:.2f}s), final loss {reference.log[-1][1]['loss']}",
          flush=True)
    rng = random.Random(args.seed)
    trials = []
    for index in range(1, args.trials + 1):
        trials.append(run_trial(index, rng, reference, args, work, settings))
        print(trials[-1].line(), flush=True)
    print(summary(trials, reference, args, work), flush=True)
    if all(t.ok for t in trials) and not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(t.ok for t in trials) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and choices")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (2: torchrun and gloo; 1: none)")
    parser.add_argument("--modes", default="all,rank",
                        help=f"comma-separated kinds of kill to choose from: {', '.join(MODES)}")
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--save-total-limit", type=int, default=None)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--startup-share", type=float, default=0.15,
                        help="share of kills timed from the launch over the whole run (the rest: training phase)")
    parser.add_argument("--overshoot", type=float, default=1.2,
                        help="the training-phase window stretched by this factor, so some kills hit the shutdown")
    parser.add_argument("--kill-on", default=None, metavar="REGEX",
                        help="instead of a random delay, kill the moment a name matching REGEX is created in "
                             "output_dir (inotify), e.g. 'tunesmith-partial' (the final save) or 'checkpoint-8$'")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folders of passing trials too")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
