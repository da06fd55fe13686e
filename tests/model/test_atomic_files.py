"""atomic_files.py: written files and folders follow the umask (not tempfile's or safetensors' 0600/0700),
and the leftovers of killed writes are removed, and nothing else."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from tunesmith.model.adapters import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from tunesmith.model.atomic_files import (
    PARTIAL_SUFFIX,
    follow_umask,
    remove_interrupted_writes,
    write_atomically,
)
from tunesmith.model.lora import inject_lora


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_adapter_files_follow_the_umask(make_tiny_model, tmp_path, umask):
    model = make_tiny_model()
    inject_lora(model, ["q_proj"], rank=2, alpha=4)
    save_adapter(model, tmp_path / "out", "base", 2, 4, 0.0, ["q_proj"], False)
    assert mode(tmp_path / "out") == 0o777 & ~umask
    assert {name: mode(tmp_path / "out" / name) for name in (WEIGHTS_NAME, CONFIG_NAME)} == {
        WEIGHTS_NAME: 0o666 & ~umask, CONFIG_NAME: 0o666 & ~umask}
    assert sorted(os.listdir(tmp_path / "out")) == sorted([WEIGHTS_NAME, CONFIG_NAME])  # nothing left beside


def test_follow_umask_fixes_what_safetensors_writes_0600(tmp_path, umask):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))
    follow_umask(folder)
    assert (mode(folder), mode(folder / "sub")) == (0o777 & ~umask, 0o777 & ~umask)
    assert mode(folder / "sub" / "model.safetensors") == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["adapter_config.json"]


def test_a_killed_write_is_removed_by_the_next_run(tmp_path):
    """The writer dies in the middle (os._exit: no cleanup, as a kill -9), after safetensors' own temp file."""
    script = textwrap.dedent(f"""
        import os, pathlib
        from tunesmith.model.atomic_files import write_atomically
        def die(tmp):
            (tmp.parent / ".tmpAbC123").write_bytes(b"")
            tmp.write_bytes(b"partial")
            os._exit(9)
        write_atomically(pathlib.Path({str(tmp_path / WEIGHTS_NAME)!r}), die)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith(f".{WEIGHTS_NAME}.") and leftover.endswith(PARTIAL_SUFFIX)
    assert remove_interrupted_writes(tmp_path) == [tmp_path / leftover]
    assert os.listdir(tmp_path) == []


def test_only_leftovers_of_our_own_writes_are_removed(tmp_path):
    header = (2).to_bytes(8, "little") + b"{}"
    ours = {
        f".{WEIGHTS_NAME}.{dead_pid()}-abcd_123{PARTIAL_SUFFIX}": None,  # a folder: staging of a dead writer
        ".tmpAbC123": header + b"\0" * 10,  # safetensors' own temp file, started
        ".tmpXyZ789": b"",  # ... just created
        f".{WEIGHTS_NAME}.k2j4h5g6": b"data",  # older tunesmith's mkstemp
        ".adapter_config.json.a1b2c3d4": b"{",
    }
    kept = {
        f".{WEIGHTS_NAME}.{os.getpid()}-abcd_123{PARTIAL_SUFFIX}": None,  # a live writer's staging
        ".tmpABCDEF": b"a user's notes",  # the name, but not safetensors
        ".tmpTooLong1": b"",
        "notes.txt": b"",
        ".my.json.a1b2c3d4": b"",  # mkstemp-like, but not a file tunesmith writes
        ".merged.partial-abcdefgh": None,  # an export staging: only removed when asked for its target
    }
    for name, data in {**ours, **kept}.items():
        (tmp_path / name).mkdir() if data is None else (tmp_path / name).write_bytes(data)
    assert sorted(p.name for p in remove_interrupted_writes(tmp_path)) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert [p.name for p in remove_interrupted_writes(tmp_path, target="other")] == []
    assert [p.name for p in remove_interrupted_writes(tmp_path, target="merged")] == [".merged.partial-abcdefgh"]
    assert remove_interrupted_writes(tmp_path / "missing") == []
