"""The experiment trackers behind `report_to`: tensorboard, wandb, mlflow, swanlab, trackio.

Each is a small class with start(run), log(metrics, step) and finish(); TRACKERS maps the name users write
to it. `Tracker` (tracking.py) runs them on rank 0 only and hands each the numbers of every trainer_log.jsonl
line under the same names (`loss`, `lr`, `grad_norm`, `rewards/chosen`, `eval_loss`) at x = current_steps.
Only tensorboard renames them, to transformers' `train/loss` and `eval/loss`, so its runs/ folder reads as
Trainer's does. A run's config (its params) is train_config.yaml, which run.py writes before the loop.

Each library reads its own environment variables (WANDB_MODE, WANDB_API_KEY, MLFLOW_TRACKING_URI,
SWANLAB_MODE, TRACKIO_SPACE_ID, ...). The project/experiment and run name are passed explicitly, which
would override those variables, so they are read here and win when set; otherwise the project is
`tunesmith` and the run is named after output_dir's folder. Files go under output_dir (runs/, wandb/,
swanlog/) unless WANDB_DIR / SWANLAB_LOGDIR say otherwise. Two keep their library's own place, because
their viewers read it: mlflow, without MLFLOW_TRACKING_URI, uses mlflow's default store in the working
directory (./mlflow.db in recent mlflow 3 releases, which refuse a plain ./mlruns folder), so `mlflow ui` started
there lists every run; trackio writes to TRACKIO_DIR (default ~/.cache/huggingface/trackio), where
`trackio show` looks. Left out on purpose: model/artifact uploads and resuming a tracker's run after
`resume_from_checkpoint` (the resumed part is a new run that starts at the checkpoint's step).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tunesmith.errors import TunesmithError

PROJECT = "tunesmith"


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is told about the run when it starts."""

    name: str
    output_dir: Path
    config: dict[str, Any]


class ExperimentTracker(Protocol):
    """One tracker: `package` is what must be installed for it (and what pip installs)."""

    package: ClassVar[str]

    def start(self, run: TrackedRun) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


def _env(name: str, default: str) -> str:
    """The library's own variable when the user set it, else tunesmith's default."""
    return os.environ.get(name) or default


class TensorBoard:
    """Scalars in output_dir/runs, where transformers' Trainer writes them, under its names."""

    package: ClassVar[str] = "tensorboard"

    def start(self, run: TrackedRun) -> None:
        """Open the event file; the config goes in as text, as Trainer does with its arguments."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.output_dir / "runs"))
        self.writer.add_text("config", "\n".join(f"    {key}: {value}" for key, value in run.config.items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """`loss` -> `train/loss`, `eval_loss` -> `eval/loss` (transformers' rewrite_logs)."""
        for key, value in metrics.items():
            name = key.replace("_", "/", 1) if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self) -> None:
        """Close the event file."""
        self.writer.close()


class WandB:
    """Weights & Biases; `WANDB_MODE=offline` keeps the run in output_dir/wandb for `wandb sync`."""

    package: ClassVar[str] = "wandb"

    def start(self, run: TrackedRun) -> None:
        """A new wandb run with the config as its config."""
        import wandb

        self.run = wandb.init(project=_env("WANDB_PROJECT", PROJECT), name=_env("WANDB_NAME", run.name),
                              dir=_env("WANDB_DIR", str(run.output_dir)), config=run.config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One history row per step (an eval line at a logged step joins that row)."""
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        """Mark the run finished and flush it."""
        self.run.finish()


class MLflow:
    """MLflow through its client (no global active run); MLFLOW_EXPERIMENT_NAME names the experiment."""

    package: ClassVar[str] = "mlflow"

    def start(self, run: TrackedRun) -> None:
        """A run in the experiment (created if new), the config as its params."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else mlflow's default store
        name = _env("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in run.config.items()]  # mlflow's value limit
        for start in range(0, len(params), 100):  # and at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One batch of metrics at `step`."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(key, value, now_ms, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self) -> None:
        """Mark the run FINISHED."""
        self.client.set_terminated(self.run_id)


class SwanLab:
    """SwanLab; `SWANLAB_MODE=offline` (or local) keeps the run in output_dir/swanlog."""

    package: ClassVar[str] = "swanlab"

    def start(self, run: TrackedRun) -> None:
        """A new experiment; SWANLAB_PROJ_NAME and SWANLAB_EXP_NAME are swanlab's own names for project and run."""
        import swanlab

        swanlab.init(project=_env("SWANLAB_PROJ_NAME", PROJECT), name=_env("SWANLAB_EXP_NAME", run.name),
                     log_dir=_env("SWANLAB_LOGDIR", str(run.output_dir / "swanlog")), config=run.config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at `step` (swanlab groups `rewards/chosen` under `rewards` but keeps the name)."""
        import swanlab

        swanlab.log(metrics, step=step)

    def finish(self) -> None:
        """Close the experiment."""
        import swanlab

        swanlab.finish()


class Trackio:
    """Hugging Face's trackio: a local SQLite store (TRACKIO_DIR), or a Space with TRACKIO_SPACE_ID."""

    package: ClassVar[str] = "trackio"

    def start(self, run: TrackedRun) -> None:
        """A new run in project `tunesmith` (trackio has no variable of its own for the project)."""
        import trackio

        trackio.init(project=PROJECT, name=run.name, config=run.config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at `step`."""
        import trackio

        trackio.log(metrics, step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        import trackio

        trackio.finish()


TRACKERS: dict[str, type[ExperimentTracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "mlflow": MLflow,
    "swanlab": SwanLab,
    "trackio": Trackio,
}


def installed(name: str) -> bool:
    """Whether the tracker's package can be imported (found without importing it)."""
    return importlib.util.find_spec(TRACKERS[name].package) is not None


def chosen_trackers(report_to: list[str]) -> list[str]:
    """The trackers `report_to` names (`none`: no tracker; `all`: every installed one); a named one whose
    package is missing is an error, raised before any work."""
    if "all" in report_to:
        return [name for name in TRACKERS if installed(name)]
    names = [name for name in report_to if name != "none"]
    for name in names:
        if not installed(name):
            package = TRACKERS[name].package
            raise TunesmithError(
                f"`report_to: {name}` needs the {package} package, which is not installed: `pip install {package}` "
                f"(or `pip install 'tunesmith[trackers]'` for every tracker), or remove {name} from report_to.")
    return names


def start_trackers(report_to: list[str], run: TrackedRun) -> list[ExperimentTracker]:
    """Start the chosen trackers (rank 0 only); a tracker that fails to start stops the run, naming it."""
    names = chosen_trackers(report_to)
    if "all" in report_to and not names:
        print(f"[tunesmith] report_to: all, but none of {', '.join(TRACKERS)} is installed; "
              "logging to trainer_log.jsonl only.", file=sys.stderr)
    started = []
    for name in names:
        tracker = TRACKERS[name]()
        try:
            tracker.start(run)
        except Exception as error:  # a library's own error (no login, unreachable server): say which tracker
            for running in started:
                running.finish()
            raise TunesmithError(
                f"report_to: {name} could not start: {type(error).__name__}: {error}. Check its settings "
                f"(for example its offline mode) or remove {name} from report_to.") from error
        started.append(tracker)
    return started
