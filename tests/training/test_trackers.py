"""report_to: each tracker, in its offline/local mode, gets exactly the numbers of trainer_log.jsonl.

Every library runs with its own offline switch set here (WANDB_MODE=offline, an sqlite mlflow store under
tmp_path, SWANLAB_MODE=offline, TRACKIO_DIR under tmp_path) and telemetry off, so nothing touches the
network; each run is read back with the library's own reader (wandb's transaction log is parsed with its
protobuf records: wandb has no offline reader of its own). A tracker whose package is missing is skipped.
"""

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunesmith.config.run_config import REPORT_TO
from tunesmith.errors import TunesmithError
from tunesmith.training import trackers
from tunesmith.training.configure import build_config
from tunesmith.training.run import run_training
from tunesmith.training.trackers import TRACKERS
from tunesmith.training.tracking import Tracker, read_log

COUNTERS = ("current_steps", "total_steps", "percentage")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every tracker local and quiet; trackio binds TRACKIO_DIR at import, so a loaded trackio is repointed."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB__DISABLE_STATS": "true",
                        "WANDB__DISABLE_META": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "SWANLAB_MODE": "offline",
                        "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "MLFLOW_EXPERIMENT_NAME", "SWANLAB_PROJ_NAME",
                 "SWANLAB_EXP_NAME", "SWANLAB_LOGDIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")


def train(base_settings: dict, report_to) -> Path:
    """Four steps, logged every step, with an eval split evaluated every 2 steps and at the end."""
    settings = {**base_settings, "max_steps": 4, "val_size": 0.25, "eval_strategy": "steps", "eval_steps": 2,
                "report_to": report_to}
    run_training(build_config(settings), say=lambda *_: None)
    return Path(settings["output_dir"])


def expected_metrics(output_dir: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value for every number of trainer_log.jsonl except the step counters."""
    return {(line["current_steps"], key): value for line in read_log(output_dir) for key, value in line.items()
            if key not in COUNTERS and isinstance(value, (int, float))}


def tensorboard_run(output_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "runs")).Reload()
    names = {tag: tag.replace("eval/", "eval_", 1) if tag.startswith("eval/") else tag.removeprefix("train/")
             for tag in events.Tags()["scalars"]}
    assert "config/text_summary" in events.Tags()["tensors"]
    return {(event.step, names[tag]): event.value for tag in names for event in events.Scalars(tag)}, {}


def wandb_run(output_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    """History and config from the offline run's transaction log. wandb's own service process writes it, and
    under load the last records can land after `finish()` returns: read it again until the run's exit
    record is in (flaked once in CI with an empty history)."""
    path = next(output_dir.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:
        metrics, config, ended = _wandb_records(path.read_bytes())
        if ended or time.monotonic() > deadline:
            return metrics, config
        time.sleep(0.1)


def _wandb_records(data: bytes) -> tuple[dict, dict, bool]:
    """(history, config, whether the exit record is there) of a transaction log (LevelDB log blocks of
    protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    position, pending, metrics, config, ended = 7, b"", {}, {}, False  # 7: the ":W&B" file header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE chunk: the record goes on
            continue
        record, pending = wandb_internal_pb2.Record.FromString(pending), b""
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            metrics.update({(record.history.step.num, key): json.loads(value) for key, value in items.items()
                            if not key.startswith("_")})  # _step, _runtime, _timestamp: wandb's own
        if record.HasField("run"):
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        ended = ended or record.HasField("exit")
    return metrics, config, ended


def mlflow_run(output_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("tunesmith")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{output_dir.name}'")
    assert run.info.status == "FINISHED"
    metrics = {(point.step, key): point.value for key in run.data.metrics
               for point in client.get_metric_history(run.info.run_id, key)}
    return metrics, run.data.params


def swanlab_run(output_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader = DataStoreReader()
    reader.open(next(output_dir.glob("swanlog/run-*/run-*.swanlab")))
    metrics = {}
    while (data := reader.scan()) is not None:
        record = Record.FromString(data)
        if record.HasField("scalar"):
            metrics[(record.scalar.step, record.scalar.key)] = record.scalar.value.number
    config = yaml.safe_load(next(output_dir.glob("swanlog/run-*/files/config.yaml")).read_text())
    return metrics, {key: entry["value"] for key, entry in config.items()}


def trackio_run(output_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    from trackio.sqlite_storage import SQLiteStorage

    assert output_dir.name in SQLiteStorage.get_runs("tunesmith")
    rows = SQLiteStorage.get_logs("tunesmith", output_dir.name)
    metrics = {(row["step"], key): value for row in rows for key, value in row.items()
               if key not in ("step", "timestamp")}
    return metrics, SQLiteStorage.get_run_config("tunesmith", output_dir.name)


READERS = {"tensorboard": tensorboard_run, "wandb": wandb_run, "mlflow": mlflow_run, "swanlab": swanlab_run,
           "trackio": trackio_run}


def check_tracker(name: str, output_dir: Path, tmp_path: Path) -> None:
    """The tracker holds trainer_log.jsonl's numbers, under the same names, and the run's config."""
    metrics, config = READERS[name](output_dir, tmp_path)
    expected = expected_metrics(output_dir)
    assert {key for _, key in expected} >= {"loss", "lr", "grad_norm", "epoch", "eval_loss"}
    assert metrics == pytest.approx(expected, rel=1e-6)  # tensorboard stores float32
    if name != "tensorboard":
        assert str(config["learning_rate"]) == "0.01" and "report_to" in config


@pytest.mark.parametrize("name", list(READERS))
def test_tracker_logs_what_trainer_log_has(name, base_settings, tmp_path):
    pytest.importorskip(TRACKERS[name].package)
    check_tracker(name, train(base_settings, name), tmp_path)


def test_comma_list_and_all_report_to_each_tracker(base_settings, tmp_path):
    available = [name for name in TRACKERS if trackers.installed(name)]
    if len(available) < 2:
        pytest.skip("needs two tracker packages")
    assert build_config({**base_settings, "report_to": ", ".join(available[:2])}).output.report_to == available[:2]
    output_dir = train(base_settings, available[:2])  # a YAML list
    for name in available[:2]:
        check_tracker(name, output_dir, tmp_path)
    output_dir = train({**base_settings, "output_dir": str(tmp_path / "all")}, "all")
    for name in available:
        assert READERS[name](output_dir, tmp_path)[0] == pytest.approx(expected_metrics(output_dir), rel=1e-6)


class Recorder:
    """A stand-in tracker that keeps what it is given."""

    package = "json"
    started: list = []

    def start(self, run):
        self.run, self.logged, self.finished = run, [], False
        Recorder.started.append(self)

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


def test_tracker_fans_out_on_rank_zero_only(monkeypatch, tmp_path):
    monkeypatch.setitem(TRACKERS, "wandb", Recorder)
    monkeypatch.setattr(Recorder, "started", [])
    line = {"current_steps": 3, "total_steps": 4, "loss": 1.5, "rewards/chosen": 0.25, "bad_steps": 1,
            "epoch": 0.75, "percentage": 75.0, "elapsed_time": "0:00:01", "grad_norm": None}
    other_rank = Tracker(tmp_path, ["wandb"], is_main=False)
    other_rank.log(line)
    other_rank.close()
    assert Recorder.started == [] and not (tmp_path / "trainer_log.jsonl").exists()
    (tmp_path / "train_config.yaml").write_text("learning_rate: 0.01\n")
    main = Tracker(tmp_path, ["wandb"], is_main=True)
    main.log(line)
    main.close()
    (recorder,) = Recorder.started
    assert recorder.run.config == {"learning_rate": 0.01} and recorder.run.name == tmp_path.name
    assert recorder.logged == [(3, {"loss": 1.5, "rewards/chosen": 0.25, "bad_steps": 1, "epoch": 0.75})]
    assert recorder.finished and read_log(tmp_path) == [line]


def test_run_name_names_the_tracker_run(monkeypatch, tmp_path):
    monkeypatch.setitem(TRACKERS, "wandb", Recorder)
    monkeypatch.setattr(Recorder, "started", [])
    (tmp_path / "train_config.yaml").write_text("run_name: llama3-lora-sft\n")  # LLaMA-Factory's key
    Tracker(tmp_path, ["wandb"], is_main=True).close()
    assert Recorder.started[0].run.name == "llama3-lora-sft"


def test_all_with_no_tracker_installed_keeps_the_json_log(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    tracker = Tracker(tmp_path, ["all"], is_main=True)
    tracker.log({"current_steps": 1, "total_steps": 1, "loss": 2.0})
    tracker.close()
    assert tracker.trackers == [] and read_log(tmp_path) == [{"current_steps": 1, "total_steps": 1, "loss": 2.0}]
    notice = capsys.readouterr().err.strip()
    assert "report_to: all" in notice and "trainer_log.jsonl only" in notice and "\n" not in notice


@pytest.mark.parametrize("value,pattern", [
    ("wandbb", r"`report_to: wandbb` is not supported.*Did you mean `wandb`"),
    ("tensorboard,mlfow", r"`report_to: mlfow` is not supported.*Did you mean `mlflow`"),
    (["none", "wandb"], "none and all stand alone"),
])
def test_unknown_or_mixed_names_are_config_errors(value, pattern):
    with pytest.raises(TunesmithError, match=pattern):
        build_config({"model_name_or_path": "m", "dataset": "d", "report_to": value})


def test_report_to_choices_are_the_registry():
    assert set(REPORT_TO) == {"none", "all", *TRACKERS}


@pytest.mark.parametrize("name", list(TRACKERS))
def test_missing_package_fails_before_training(name, base_settings, monkeypatch):
    monkeypatch.setitem(sys.modules, TRACKERS[name].package, None)  # what an uninstalled package looks like
    with pytest.raises(TunesmithError, match=rf"`report_to: {name}` needs the {name} package.*`pip install {name}`"
                                             r".*tunesmith\[trackers\]"):
        train(base_settings, name)
    assert not Path(base_settings["output_dir"]).exists()


def test_a_tracker_that_cannot_start_names_itself(monkeypatch, tmp_path):
    class Broken(Recorder):
        def start(self, run):
            raise RuntimeError("no TTY is available for interactive login")

    monkeypatch.setitem(TRACKERS, "swanlab", Broken)
    with pytest.raises(TunesmithError, match="report_to: swanlab could not start: RuntimeError: no TTY"):
        Tracker(tmp_path, ["swanlab"], is_main=True)
