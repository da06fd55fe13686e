"""Write result files atomically, with the modes the user's umask asks for, and clear what a killed write left.

A write goes into a private staging folder beside its target, `.<target>.<pid>-<random>.tunesmith-partial`,
and is renamed over the target when complete, so a reader never sees half a file. Anything else that
writes along the way stays inside that folder too: safetensors' `save_file` (>= 0.6) writes through a
`.tmpXXXXXX` file beside the path it is given, created 0600 (Rust's tempfile crate). A kill -9 therefore
leaves only staging folders, which `remove_interrupted_writes` recognises by name and by the writer's
pid being gone. It also removes the leftovers of older tunesmith versions and of safetensors writes
made straight into the folder (`model.save_pretrained`).

Python's tempfile (0600 files, 0700 folders) and safetensors ignore the umask; every finished file and
folder here is chmod-ed to 0666 / 0777 minus the umask, as `open` and `mkdir` would have created it.

Usage:
    write_atomically(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    removed = remove_interrupted_writes(output_dir)   # at the start of a run
    follow_umask(folder)                               # after a library wrote files with its own modes
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PARTIAL_SUFFIX = ".tunesmith-partial"
_RANDOM = "[a-z0-9_]{8}"  # what tempfile puts in a name
_PARTIAL = re.compile(rf"\.(?P<target>.+)\.(?P<pid>\d+)-{_RANDOM}{re.escape(PARTIAL_SUFFIX)}")
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # Rust tempfile's default name
# tunesmith before staging folders: tempfile.mkstemp beside the adapter files, mkdtemp beside an export
_OLD_ADAPTER_TMP = re.compile(rf"\.(adapter_model\.safetensors|adapter_config\.json)\.{_RANDOM}")
_OLD_EXPORT_TMP = rf"\.(partial|old)-{_RANDOM}"  # after ".<export folder name>"


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """chmod `path` (and, for a folder, everything in it) to 0666 / 0777 minus the umask. Only for what
    tunesmith wrote: a file or a folder of its own, never a folder that may hold the user's files.
    Symbolic links are left alone (chmod would change what they point to)."""
    mask, path = umask(), Path(path)
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    folders = []
    for root, _, files in os.walk(path):
        folders.append(root)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    for folder in reversed(folders):  # innermost first: a folder stays enterable until its contents are done
        os.chmod(folder, 0o777 & ~mask)


def staging_folder(target: Path) -> Path:
    """A new, empty folder beside `target` that `remove_interrupted_writes` clears once this process is gone."""
    target = Path(target)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=PARTIAL_SUFFIX))
    follow_umask(folder)  # it becomes the result when a whole folder is staged (an export)
    return folder


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a file inside a staging folder, give it the umask's mode, then rename it to `path`."""
    path = Path(path)
    staging = staging_folder(path)
    try:
        tmp = staging / path.name
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_interrupted_writes(folder: Path, target: str | None = None) -> list[Path]:
    """Delete what killed atomic writes left in `folder` (not below it), and return what was deleted.

    Removed: staging folders of `write_atomically` / `staging_folder` whose process is gone; safetensors'
    `.tmpXXXXXX` files (empty, or starting with a safetensors header); older tunesmith's
    `.adapter_model.safetensors.XXXXXXXX` and `.adapter_config.json.XXXXXXXX`. With `target`, only the
    leftovers of writes to `folder / target` (its staging folders, and older tunesmith's export staging
    `.<target>.partial-XXXXXXXX` / `.old-XXXXXXXX`): for a folder shared with other programs, such as
    the parent of an export. Live writers' staging folders are kept, so a concurrent run is not disturbed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    old_export = re.compile(rf"\.{re.escape(target)}{_OLD_EXPORT_TMP}") if target else None
    removed = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        partial = _PARTIAL.fullmatch(name)
        if partial:
            stale = not _alive(int(partial["pid"])) and (target is None or partial["target"] == target)
        elif old_export:
            stale = old_export.fullmatch(name) is not None and entry.is_dir()
        else:
            stale = (_OLD_ADAPTER_TMP.fullmatch(name) is not None and entry.is_file()) or (
                _SAFETENSORS_TMP.fullmatch(name) is not None and _partial_safetensors(entry))
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_safetensors(path: Path) -> bool:
    """An empty file, or one that starts as safetensors files do: an 8-byte little-endian header size, then '{'."""
    if not path.is_file() or path.is_symlink():
        return False
    with path.open("rb") as f:
        head = f.read(9)
    return not head or (len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30)
