"""An interrupted `prepare`: a kill -9 leaves its temporary output for the next run to delete, and no
traceback or orphaned worker; SIGTERM and SIGHUP delete it at once; pool workers start with signals
blocked, so none is lost before they reset the handlers they inherit."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tunesmith.datatools import blocks
from tunesmith.datatools.prepare import PrepareOptions, make_pipeline, prepare
from tunesmith.datatools.writer import AtomicWriter


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """About 16 MB of JSON lines: many blocks for two workers."""
    path = tmp_path_factory.mktemp("big") / "in.jsonl"
    with path.open("w") as f:
        for i in range(60_000):
            f.write(json.dumps({"prompt": f"question {i} " * 20, "response": "answer " * 30}) + "\n")
    return path


def start_prepare(source, output) -> subprocess.Popen:
    """prepare() on two workers in a child process (no CLI: its handlers stay out of the way), with stdio
    pipes that close only when the child and every worker are gone."""
    script = textwrap.dedent(f"""
        import signal
        from tunesmith.datatools import blocks
        from tunesmith.datatools.prepare import PrepareOptions, prepare
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # as in a shell (nohup would leave SIGHUP ignored)
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        blocks.BLOCK_BYTES = 1 << 16
        prepare({str(source)!r}, {str(output)!r}, PrepareOptions(dedup=[], char_count="n"), workers=2)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_for(path, process) -> None:
    while not path.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)


def test_stale_temporary_outputs_of_dead_runs_are_deleted(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "x"}\n')
    stale, live = tmp_path / f".out.jsonl.tmp-{dead_pid()}", tmp_path / f".out.jsonl.tmp-{os.getppid()}"
    others = [tmp_path / f".other.jsonl.tmp-{dead_pid()}", tmp_path / ".out.jsonl.tmp-notapid"]
    for path in [stale, live, *others]:
        path.write_text("partial")
    prepare(source, tmp_path / "out.jsonl", PrepareOptions())
    assert not stale.exists() and live.exists() and all(path.exists() for path in others)


def test_a_kill_9_leaves_no_traceback_nor_orphaned_worker(tmp_path, big_input):
    output = tmp_path / "out.jsonl"
    process = start_prepare(big_input, output)
    temp = tmp_path / f".out.jsonl.tmp-{process.pid}"
    wait_for(temp, process)
    time.sleep(0.05)  # blocks in flight
    process.kill()
    _, stderr = process.communicate(timeout=60)  # returns once the workers, which hold stderr, are gone too
    assert (process.returncode, stderr.decode()) == (-signal.SIGKILL, "")
    assert temp.exists()
    prepare(big_input, output, PrepareOptions(dedup=[], char_count="n"), workers=2)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_delete_the_temporary_output(tmp_path, big_input, signum):
    process = start_prepare(big_input, tmp_path / "out.jsonl")
    wait_for(tmp_path / f".out.jsonl.tmp-{process.pid}", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.decode()) == (-signum, "")
    assert os.listdir(tmp_path) == []


def test_the_writers_signal_handlers_are_put_back(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with AtomicWriter(tmp_path / "out.jsonl") as writer:
        writer.write({"a": 1})
        if all(handler == signal.SIG_DFL for handler in before.values()):
            assert all(signal.getsignal(sig) != signal.SIG_DFL for sig in before)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def record_blocked_signals(*args) -> None:
    """An initializer that writes which signals the new worker has blocked, then starts as usual."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    (args[0].parent / f"mask-{os.getpid()}").write_text(json.dumps(sorted(int(s) for s in blocked)))
    INIT_POOL_WORKER(*args)


INIT_POOL_WORKER = blocks.init_pool_worker


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks on this platform")
def test_workers_start_with_signals_blocked_and_unblock_them(tmp_path, monkeypatch):
    monkeypatch.setattr(blocks, "init_pool_worker", record_blocked_signals)
    recipe = (make_pipeline, PrepareOptions())
    with blocks._pool(2, (tmp_path / "x.jsonl", blocks.Layout("lines", 0), recipe, None, os.getpid())) as pool:
        workers_blocked = pool.apply(signal.pthread_sigmask, (signal.SIG_BLOCK, []))
    masks = [json.loads(path.read_text()) for path in tmp_path.glob("mask-*")]
    assert masks and all({signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= set(mask) for mask in masks)
    assert signal.SIGTERM not in workers_blocked  # unblocked once the handlers are reset
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is back
