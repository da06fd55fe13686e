"""Launching and stopping runs from the board: the form's schema, validation, `tunesmith train` as a child.

The form is generated from the config sections (each key's type, default and docstring, as `tunesmith
train --help` prints them). What the page sends is a YAML text; it is written under the root
(.board/launches/) and validated by the CLI's own `load_config`, so messages are the CLI's, "did you
mean" included. `output_dir` must be a folder under the root (the board shows only what is there); the
run is `python -m tunesmith train FILE` and nothing else can be started. Stop sends the child SIGTERM,
the graceful stop of training/interrupt.py: it checkpoints and ends "stopped". Only runs this board
started can be stopped from it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import yaml

from tunesmith.board.runs import NotARun, RunFolders, tail
from tunesmith.errors import TunesmithError

LAUNCH_FOLDER = ".board/launches"


def form_schema() -> dict:
    """The sections of the config, each key with its type in words, default and docstring."""
    from tunesmith.config import schema
    from tunesmith.training.configure import help_groups

    sections = []
    for cls, note in help_groups():
        docs, hints = schema.key_docs(cls), schema.key_types(cls)
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        keys = [{"key": key, "type": schema.describe(hints[key]), "default": _plain(defaults[key]),
                 "doc": docs.get(key, "")} for key in schema.own_keys(cls)]
        sections.append({"name": schema.section_name(cls), "note": note, "doc": (cls.__doc__ or "").strip(),
                         "keys": keys})
    return {"sections": sections}


def _plain(value: object) -> object:
    """A default as JSON can carry it (a dataclass MISSING or a factory shows as unset)."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else None


class Launcher:
    """The runs this board started: validate a YAML text, start it, stop it."""

    def __init__(self, folders: RunFolders, workdir: Path | None = None) -> None:
        self.folders, self.workdir = folders, workdir or Path.cwd()
        self.children: dict[str, subprocess.Popen] = {}

    def check(self, text: str, keep: bool = False) -> tuple[dict, Path]:
        """The settings of a YAML text once the CLI accepts them, and the file they were written to (kept
        only when `keep`: a launch); a TunesmithError carries the CLI's message otherwise."""
        from tunesmith.training.checkpoint import resolve_resume
        from tunesmith.training.configure import load_config
        from tunesmith.training.run import check_output_dir

        raw = _mapping(text)
        raw["output_dir"] = str(self._output_dir(raw.get("output_dir")))
        path = self._write(raw)
        try:
            config = load_config(path)
            output_dir = Path(config.output.output_dir)
            check_output_dir(output_dir, config, resolve_resume(config.output.resume_from_checkpoint, output_dir))
        except TunesmithError:
            path.unlink(missing_ok=True)
            raise
        if not keep:
            path.unlink()
        return raw, path

    def start(self, text: str) -> str:
        """Validate and start `tunesmith train`; the run's name under the root."""
        raw, path = self.check(text, keep=True)
        name = Path(raw["output_dir"]).relative_to(self.folders.root).as_posix()
        if name in self.children and self.children[name].poll() is None:
            raise TunesmithError(f"run {name} is already running from this board; stop it or choose another output_dir.")
        with open(path.with_suffix(".log"), "w") as log:  # everything the child prints, tracebacks included
            self.children[name] = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(path)],
                                                   cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
        return name

    def running(self, name: str) -> bool:
        """Whether this board started `name` and it has not exited."""
        child = self.children.get(name)
        return child is not None and child.poll() is None

    def examples(self) -> dict[str, dict]:
        """The example configs beside the board (`examples/*.yaml` of its working folder, as in this
        repository) by file name, to prefill the form; a file that does not parse is left out."""
        found = {}
        for path in sorted((self.workdir / "examples").glob("*.yaml")):
            try:
                values = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(values, dict):
                found[path.name] = values
        return found

    def early_failure(self, name: str) -> dict | None:
        """For a run this board started that exited before writing its folder (its config's model or data
        failed to load): the run page's facts, with the child's output as the error and console."""
        child = self.children.get(name)
        if child is None or child.poll() in (None, 0) or self._has_folder(name):
            return None
        config_file = Path(child.args[-1])
        output = tail(config_file.with_suffix(".log"), lines=60)
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        return {"name": name, "stage": None, "model": None, "dataset": None, "status": "failed",
                "error": f"exited with code {child.returncode} before training started: {last}", "step": None,
                "total_steps": None, "started": None, "config": config_file.read_text(), "config_values": {},
                "checkpoints": [], "results": None, "console": output}

    def _has_folder(self, name: str) -> bool:
        try:
            self.folders.resolve(name)
        except NotARun:
            return False
        return True

    def stop(self, name: str) -> None:
        """Ask a run this board started to stop gracefully (SIGTERM: checkpoint, then exit "stopped")."""
        if not self.running(name):
            raise TunesmithError(f"run {name} was not started by this board or has ended; stop a run started elsewhere "
                                 "where it runs (Ctrl-C, or kill -TERM its pid).")
        os.kill(self.children[name].pid, signal.SIGTERM)

    def _output_dir(self, value: object) -> Path:
        """output_dir as a folder under the root; anything else is refused."""
        name = str(value or "").strip()
        parts = PurePosixPath(name).parts
        inside = bool(parts) and (self.folders.root / name).resolve().is_relative_to(self.folders.root)  # no symlink out
        if not inside or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or parts[0].startswith("."):
            raise TunesmithError(f"output_dir: {name or '(empty)'} — from the board, output_dir is a folder name under "
                                 f"the board's root {self.folders.root} (for example saves_name/sft_lora), without "
                                 "`..`, a leading dot or an absolute path.")
        return self.folders.root / name

    def _write(self, raw: dict) -> Path:
        folder = self.folders.root / LAUNCH_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        stem = time.strftime("%Y%m%d-%H%M%S") + "-" + Path(raw["output_dir"]).name
        path = folder / f"{stem}.yaml"
        counter = 1
        while path.exists():
            path, counter = folder / f"{stem}-{counter}.yaml", counter + 1
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path


def _mapping(text: str) -> dict:
    """The YAML text of the form as a mapping of keys, or a message naming the line that is wrong."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise TunesmithError(f"the config is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise TunesmithError("the config must be a mapping of `key: value` lines.")
    return raw
