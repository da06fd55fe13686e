"""`tunesmith train` on several processes: relaunch under torchrun, as LLaMA-Factory's CLI does.

LLaMA-Factory's variables decide it: NPROC_PER_NODE (processes on this node), NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT, and FORCE_TORCHRUN=1 (torchrun even for one process); `--nproc N` is the
flag form of NPROC_PER_NODE. Each node runs the same command; node 0 hosts the rendezvous. Under
torchrun already (LOCAL_RANK is set) nothing is relaunched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.training.interrupt import STOPPED_EXIT_CODE


def torchrun_command(args: list[str], nproc: int | None = None, env: dict[str, str] | None = None) -> list[str] | None:
    """The torchrun command line that runs `tunesmith <args>` on every rank, or None to run in this process."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env:  # already a rank
        return None
    per_node = nproc or _positive(env, "NPROC_PER_NODE", 1)
    nodes = _positive(env, "NNODES", 1)
    forced = env.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "yes")
    if per_node == 1 and nodes == 1 and not forced:
        return None
    node_rank = int(env.get("NODE_RANK", "0") or 0)
    if not 0 <= node_rank < nodes:
        raise TunesmithError(f"NODE_RANK={node_rank} must be between 0 and NNODES-1 ({nodes - 1}).")
    address = env.get("MASTER_ADDR", "127.0.0.1")
    if nodes > 1 and "MASTER_PORT" not in env:
        raise TunesmithError("NNODES > 1 needs MASTER_ADDR and MASTER_PORT (node 0's address and a free port), "
                             "the same on every node.")
    port = env.get("MASTER_PORT") or str(_free_port())
    return [sys.executable, "-m", "tunesmith.training.launch", "--nproc-per-node", str(per_node), "--nnodes", str(nodes),
            "--node-rank", str(node_rank), "--master-addr", address, "--master-port", port,
            "-m", "tunesmith", *args]


def relaunch(command: list[str], output_dir: Path | None = None) -> int:
    """Run torchrun, passing on SIGTERM/SIGUSR1 (a scheduler's pre-emption notice) to it; its exit status,
    or STOPPED_EXIT_CODE (75) when a stop was asked for. torchrun gives its ranks 30 s to stop."""
    print(f"[tunesmith] launching: {' '.join(command[1:])}", file=sys.stderr)
    started = time.time()
    child = subprocess.Popen(command)
    stopping = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        child.send_signal(signum)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            try:
                status = child.wait()
                # torchrun reports ranks that stopped on request as failed: the run stopped as asked when
                # the stop's checkpoint was written after the launch
                return STOPPED_EXIT_CODE if stopping and status != 0 and _checkpoint_since(output_dir, started) else status
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): wait for its stop
                stopping.append(signal.SIGINT)
                continue
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _checkpoint_since(output_dir: Path | None, since: float) -> bool:
    """Whether a checkpoint-N was published in output_dir after `since` (a stop's checkpoint)."""
    if output_dir is None or not output_dir.is_dir():
        return False
    return any(path.name.startswith("checkpoint-") and path.stat().st_mtime >= since for path in output_dir.iterdir())


def torchrun_main(argv: list[str]) -> int:
    """torchrun itself, but a failed rank ends it with one line and that rank's exit status (75 for a
    stop) instead of torchrun's traceback and table; the rank's own error is already above."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner (ranks set their own)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:  # the first rank that failed by itself (not one torchrun then stopped)
        own = {r: f for r, f in err.failures.items() if f.exitcode > 0} or err.failures
        rank, failure = min(own.items(), key=lambda item: (item[1].timestamp, item[0]))
        if failure.exitcode != STOPPED_EXIT_CODE:
            print(f"[tunesmith] rank {rank} exited with status {failure.exitcode} (the error is above).",
                  file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _positive(env: dict[str, str] | os._Environ, name: str, default: int) -> int:
    """A positive integer environment variable, or a clear error."""
    text = env.get(name, "") or str(default)
    if not text.isdigit() or int(text) < 1:
        raise TunesmithError(f"{name}={text!r} must be a positive whole number.")
    return int(text)


def _free_port() -> int:
    """A TCP port nobody listens on now, for a one-node rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":  # what torchrun_command runs
    sys.exit(torchrun_main(sys.argv[1:]))
