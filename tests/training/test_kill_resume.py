"""benchmarks/kill_resume.py: a run killed with SIGKILL at a random moment leaves only complete checkpoints,
and resuming it ends with the uninterrupted run's adapter and losses, bit for bit."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_resume.py"


@pytest.fixture(scope="module")
def kill_resume():
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def trial_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("trial ")]


def test_one_process_killed_during_training_resumes_exactly(kill_resume, tmp_path, capsys):
    """One trial on the single-process path, its kill timed within the training phase."""
    status = kill_resume.main(["--trials", "1", "--nproc", "1", "--seed", "3", "--startup-share", "0",
                               "--max-steps", "12", "--workdir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 0, output
    lines = trial_lines(output)
    assert len(lines) == 1 and " | OK" in lines[0] and "FAIL" not in lines[0], output
    assert "summary: 1/1 trials passed" in output


@pytest.mark.slow
def test_two_ranks_killed_whole_or_one_rank_resume_exactly(kill_resume, tmp_path, capsys):
    """Trials on 2 ranks (torchrun, gloo): the whole run or a single rank killed."""
    status = kill_resume.main(["--trials", "2", "--nproc", "2", "--seed", "0", "--workdir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "summary: 2/2 trials passed" in output


def test_checkpoint_check_names_what_is_missing(kill_resume, tmp_path):
    """The completeness check reports a checkpoint folder that lacks files (no training needed)."""
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    reference = kill_resume.Reference(tmp_path / "none", 0.0, 0.0, {}, [])
    problems = kill_resume.check_checkpoint(4, folder, reference, nproc=2)
    assert len(problems) == 1 and "checkpoint-4 incomplete" in problems[0]
    assert "trainable.safetensors" in problems[0] and "rng-rank1.safetensors" in problems[0]


def test_phase_reads_what_a_killed_run_left(kill_resume, tmp_path):
    out = tmp_path / "out"
    assert kill_resume.phase_of(out, total=8) == "startup"
    out.mkdir()
    (out / "train_config.yaml").write_text("{}")
    (out / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.0}\n{"current_steps": 2, "loss": 1.5}\n')
    assert kill_resume.phase_of(out, total=8) == "step 3"
    (out / ".checkpoint-2.tmp").mkdir()
    assert kill_resume.phase_of(out, total=8) == "checkpoint write (.checkpoint-2.tmp)"
