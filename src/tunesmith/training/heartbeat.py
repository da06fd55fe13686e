"""run_status.json and running_log.txt: what a watcher (`tunesmith board`) needs to tell a run's state.

trainer_log.jsonl says how far a run got, not whether it is still alive: a killed process leaves the
same last line as a slow step. So rank 0 writes run_status.json with the run's state (running, then
finished, failed with its error, or stopped) and refreshes its `updated` time from a background thread
every HEARTBEAT_SECONDS; a "running" status older than a few beats means the process died without
saying so. The thread only rewrites one small file (atomically): training never waits on it.
running_log.txt keeps the lines the run printed (LLaMA-Factory's file name for the same thing).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TrainingStopped
from tunesmith.training.run_files import CONSOLE_FILE, STATUS_FILE

HEARTBEAT_SECONDS = 5.0


class Heartbeat:
    """The run's status file, refreshed every `interval` seconds until `finish`."""

    def __init__(self, output_dir: Path, interval: float = HEARTBEAT_SECONDS) -> None:
        self.path, self.interval = output_dir / STATUS_FILE, interval
        self.status = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.time(), "updated": time.time(), "heartbeat_seconds": interval}
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._beat, name="tunesmith-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self.thread.start()
        return self

    def finish(self, status: str, error: str | None = None) -> None:
        """Stop beating and record how the run ended."""
        self.done.set()
        self.thread.join()
        self.status.update(status=status, ended=time.time(), **({"error": error} if error else {}))
        self._write()

    def _beat(self) -> None:
        while not self.done.wait(self.interval):
            self._write()

    def _write(self) -> None:
        """Rewrite the file; a failed write (disk full, folder removed) is skipped, never the run's end."""
        with self.lock:
            self.status["updated"] = time.time()
            temporary = self.path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
            try:
                temporary.write_text(json.dumps(self.status))
                os.replace(temporary, self.path)  # a reader never sees half a file
            except OSError:
                temporary.unlink(missing_ok=True)


@contextmanager
def run_status(output_dir: Path, enabled: bool) -> Iterator[None]:
    """Inside the block the run is "running"; it ends "finished", "stopped" (a graceful stop or Ctrl-C) or
    "failed" with the error's one-line message. Does nothing where `enabled` is false (ranks but 0)."""
    if not enabled:
        yield
        return
    heartbeat = Heartbeat(output_dir).start()
    try:
        yield
    except (TrainingStopped, KeyboardInterrupt) as stop:
        heartbeat.finish("stopped", str(stop) or type(stop).__name__)
        raise
    except BaseException as error:
        heartbeat.finish("failed", f"{type(error).__name__}: {error}".strip())
        raise
    heartbeat.finish("finished")


def console_echo(output_dir: Path, say: Callable[[str], object], enabled: bool) -> Callable[[str], None]:
    """`say` that also appends each line, time-stamped, to running_log.txt (rank 0 only) once the run's
    folder exists (echoing never creates it: a run that fails early leaves no folder to refuse next time)."""
    path = output_dir / CONSOLE_FILE

    def echo(line: str) -> None:
        say(line)
        if enabled and output_dir.is_dir():
            with open(path, "a") as handle:
                handle.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
    return echo
