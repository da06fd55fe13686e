"""What happens to long runs: a pre-emption signal, a learning rate that blows up, a full disk, a crashing rank."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.training import checkpoint, loop
from tunesmith.training.configure import build_config
from tunesmith.training.interrupt import STOPPED_EXIT_CODE
from tunesmith.training.run import run_training


def train(settings: dict) -> dict:
    return run_training(build_config(settings), say=lambda *_: None)


def log_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "trainer_log.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_after_the_step_and_resume_is_exact(base_settings, tmp_path, monkeypatch):
    """A pre-emption signal during step 3 lets the step finish, writes checkpoint-3, exits 75; resuming
    ends bit-identical to the run that was never interrupted."""
    settings = {**base_settings, "max_steps": 6, "save_steps": 0, "lora_dropout": 0.1}
    train({**settings, "output_dir": str(tmp_path / "whole")})
    real_step = loop.Stage.__init__  # wrap the stage's step so the signal arrives in the middle of step 3

    def with_signal(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        inner, calls = self.step, []

        def step(model, rows, updates):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(model, rows, updates)

        self.step = step

    monkeypatch.setattr(loop.Stage, "__init__", with_signal)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "stopped")}))
    assert main(["train", str(config)]) == STOPPED_EXIT_CODE
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "stopped")] == ["checkpoint-3"]
    monkeypatch.undo()
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    whole, resumed = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("whole", "stopped"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert [r["loss"] for r in log_lines(tmp_path / "whole")] == [r["loss"] for r in log_lines(tmp_path / "stopped")]


def test_non_finite_steps_are_skipped_then_stop_the_run(base_settings, tmp_path):
    """learning_rate 1e30: no update with a NaN/inf loss or gradient is applied, the run stops after
    max_bad_steps of them naming the step and the samples, the log stays strict JSON, no NaN is saved."""
    settings = {**base_settings, "learning_rate": 1e30, "max_steps": 30, "save_steps": 1, "max_bad_steps": 3,
                "max_grad_norm": 0}
    with pytest.raises(TunesmithError, match=r"not finite .* 3 steps in a row .* samples \["):
        train(settings)
    out = Path(settings["output_dir"])
    lines = log_lines(out)  # json.loads rejects nothing here, and the file has no bare NaN
    assert "NaN" not in (out / "trainer_log.jsonl").read_text() and lines
    for folder in checkpoint.list_checkpoints(out):
        weights = load_file(str(folder / "trainable.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), folder.name


def test_a_failed_checkpoint_write_keeps_the_previous_one(base_settings, monkeypatch):
    """A full disk while writing checkpoint-4: a clear error, checkpoint-2 intact, no half-written folder."""
    settings = {**base_settings, "max_steps": 6, "save_steps": 2}
    real_write = checkpoint.write_training_state

    def full_disk_at_step_4(folder, trainable, optimizer_state, state):
        if state["global_step"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "optimizer.safetensors"))
        real_write(folder, trainable, optimizer_state, state)

    monkeypatch.setattr(checkpoint, "write_training_state", full_disk_at_step_4)
    with pytest.raises(TunesmithError, match="Could not write checkpoint-4 .* No space left on device"):
        train(settings)
    out = Path(settings["output_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))
    checkpoint.read_training_state(out / "checkpoint-2", set(load_file(str(out / "checkpoint-2" / "trainable.safetensors"))))


def test_a_crashing_rank_brings_every_rank_down_with_its_error(base_settings, tmp_path):
    """A reward function that raises on rank 1 only: both ranks exit within seconds, and the message names rank 1."""
    (tmp_path / "reward.py").write_text(
        "import os\n"
        "def reward(prompts, completions, references):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('this reward cannot score rank one')\n"
        "    return [1.0 for _ in completions]\n")
    settings = {**base_settings, "stage": "grpo", "reward_function": f"{tmp_path / 'reward.py'}:reward",
                "num_generations": 2, "max_new_tokens": 4, "max_steps": 3, "per_device_train_batch_size": 1}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "NPROC_PER_NODE": "2", "TUNESMITH_THREADS_PER_RANK": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(config)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode != 0
    assert "rank 1" in done.stderr and "this reward cannot score rank one" in done.stderr
    assert time.monotonic() - start < 120


def test_output_dir_problems_are_reported_before_loading(base_settings, tmp_path):
    """A file as output_dir, and a non-empty folder without checkpoints: the advice is what works."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TunesmithError, match="is a file, not a folder"):
        train({**base_settings, "output_dir": str(tmp_path / "afile")})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(TunesmithError, match="not empty") as raised:
        train({**base_settings, "output_dir": str(tmp_path / "busy")})
    assert "resume_from_checkpoint" not in str(raised.value)


FULL_DISK_ON_RANK_1 = """
import errno, os, sys
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from tunesmith.cli import main

real_write = HuggingFaceStorageWriter.write_data

def write_data(self, plan, planner):  # rank 1's disk fills up while it writes its shards of checkpoint-4
    if os.environ["RANK"] == "1" and "checkpoint-4" in str(self.path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(self, plan, planner)

HuggingFaceStorageWriter.write_data = write_data
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_on_one_rank_of_a_sharded_checkpoint(base_settings, tmp_path):
    """fsdp: every rank writes its shards; rank 1's failed write stops both ranks with its reason, and
    checkpoint-2 stays complete and resumable."""
    settings = {**base_settings, "finetuning_type": "full", "distributed_strategy": "fsdp", "learning_rate": 1e-4,
                "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 1,
                "output_dir": str(tmp_path / "out")}
    config, script = tmp_path / "cfg.yaml", tmp_path / "full_disk.py"
    config.write_text(yaml.safe_dump(settings))
    script.write_text(FULL_DISK_ON_RANK_1)
    env = {**os.environ, "TUNESMITH_THREADS_PER_RANK": "1"}
    done = subprocess.run([sys.executable, "-m", "tunesmith.training.launch", "--nproc-per-node", "2",
                           str(script), "train", str(config)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "Could not write checkpoint-4" in done.stderr and "rank 1: No space left on device" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    out = Path(settings["output_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))
    train({**settings, "per_device_train_batch_size": 2, "resume_from_checkpoint": "true"})
    assert [line["current_steps"] for line in log_lines(out) if "loss" in line] == [1, 2, 3, 4, 5, 6]
