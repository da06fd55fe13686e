"""Where `export_model` writes: only into a new, empty or earlier-export folder, replacing only what the
earlier export wrote (its tunesmith_export.json); a killed export's staging folder is cleared; files and
folders follow the umask."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.inference.export import MARKER, export_model
from tunesmith.model.atomic_files import PARTIAL_SUFFIX
from tunesmith.model.init_model import init_model
from tunesmith.training.configure import build_config


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(init_model(tmp_path_factory.mktemp("base") / "tiny", arch="qwen2", size="tiny", seed=0))


def export(tmp_path: Path, base: str, **settings) -> Path:
    raw = {"model_name_or_path": base, "export_dir": str(tmp_path / "merged"), **settings}
    return export_model(build_config(raw, command="export"), say=lambda line: None)


def listed(folder: Path) -> list[str]:
    return json.loads((folder / MARKER).read_text())["files"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_re_export_replaces_only_what_the_last_one_wrote(base, tmp_path):
    folder = export(tmp_path, base, export_size=0.0001)  # many shards
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(listed(folder)) == sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / "NOTES.md").write_text("the user's notes")
    with pytest.raises(TunesmithError, match="overwrite_output_dir"):
        export(tmp_path, base)
    export(tmp_path, base, overwrite_output_dir=True)  # one shard now: the old ones must go, the notes stay
    names = {p.name for p in folder.iterdir()}
    assert not names & set(shards) and {"model.safetensors", "config.json", "NOTES.md", MARKER} <= names
    assert (folder / "NOTES.md").read_text() == "the user's notes"
    assert set(listed(folder)) == names - {"NOTES.md", MARKER}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_an_empty_folder_is_filled_in_place(base, tmp_path):
    (tmp_path / "merged").mkdir()
    inode = os.stat(tmp_path / "merged").st_ino
    folder = export(tmp_path, base)
    assert os.stat(folder).st_ino == inode and "config.json" in listed(folder)


def test_a_file_the_earlier_export_did_not_write_is_never_overwritten(base, tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"files": []}))
    (folder / "config.json").write_text("the user's")
    with pytest.raises(TunesmithError, match="holds config.json, which this export writes but an earlier one did not"):
        export(tmp_path, base, overwrite_output_dir=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", MARKER]
    assert (folder / "config.json").read_text() == "the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize("marker", ['{"files": "config.json"}', '{"files": ["../x"]}', "not json"])
def test_a_marker_tunesmith_did_not_write_is_an_error(base, tmp_path, marker):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / MARKER).write_text(marker)
    with pytest.raises(TunesmithError, match="cannot tell which files"):
        export(tmp_path, base, overwrite_output_dir=True)


def test_a_killed_exports_staging_folder_is_removed_and_nothing_else(base, tmp_path):
    stale = [f".merged.{dead_pid()}-abcd_123{PARTIAL_SUFFIX}", ".merged.partial-k2j4h5g6", ".merged.old-a1b2c3d4"]
    kept = [f".merged.{os.getpid()}-abcd_123{PARTIAL_SUFFIX}", ".other.partial-k2j4h5g6", ".tmpAbC123", "notes"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    export(tmp_path, base)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", *kept])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_export_follows_the_umask(base, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = export(tmp_path, base)
    finally:
        os.umask(old)
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
