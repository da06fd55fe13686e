"""The board's API and the files behind it, without a browser: only folders under the root are read,
status and progress are told truthfully, logs are read incrementally and thinned, launch refuses what
it must."""

from __future__ import annotations

import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from tunesmith.board.app import create_app
from tunesmith.board.commands import board_token
from tunesmith.board.logs import LogFile, chart_groups, chart_series, elapsed_seconds, thin
from tunesmith.board.runs import RunFolders, run_status
from tunesmith.errors import TunesmithError
from tunesmith.training.heartbeat import Heartbeat
from tunesmith.training.heartbeat import run_status as status_block


def log_records(n: int, start: int = 1) -> list[dict]:
    return [{"current_steps": s, "total_steps": 100, "loss": 1.0 / s, "lr": 0.1,
             "elapsed_time": f"0:00:{s:02d}"} for s in range(start, start + n)]


@pytest.fixture
def client(board_root, write_log):
    write_log(board_root / "exp" / "sft", log_records(5))
    (board_root / "exp" / "sft" / "train_config.yaml").write_text("stage: sft\nmodel_name_or_path: m\ndataset: a,b\n")
    return TestClient(create_app(board_root), base_url="http://127.0.0.1")


def test_runs_are_listed_with_their_progress(client):
    runs = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in runs] == ["exp/sft"]
    assert runs[0]["step"] == 5 and runs[0]["total_steps"] == 100 and runs[0]["loss"] == pytest.approx(0.2)
    assert runs[0]["status"] == "unknown" and runs[0]["stage"] == "sft" and runs[0]["dataset"] == "a,b"


@pytest.mark.parametrize("name", ["../outside", "/etc", "exp/../../outside", "exp/sft/../../../outside", "exp\\sft",
                                  "escape", "exp", ""])
def test_names_outside_the_root_or_not_runs_are_404(client, board_root, tmp_path, write_log, name):
    outside = tmp_path / "outside"
    write_log(outside, log_records(2))
    (board_root / "escape").symlink_to(outside)  # a symlink out of the root
    assert client.get("/api/run", params={"name": name}).status_code == 404
    assert client.get("/api/metrics", params={"name": name}).status_code == 404
    assert [run["name"] for run in client.get("/api/runs").json()["runs"]] == ["exp/sft"]


def test_encoded_traversal_in_the_path_is_404(client):
    assert client.get("/static/..%2f..%2fpyproject.toml").status_code == 404
    assert client.get("/api/run?name=%2e%2e%2foutside").status_code == 404


def test_metrics_pair_eval_with_train_and_are_unchanged_until_the_log_grows(client, board_root, write_log):
    write_log(board_root / "exp" / "sft", [{"current_steps": 5, "total_steps": 100, "eval_loss": 0.5}])
    payload = client.get("/api/metrics", params={"name": "exp/sft"}).json()
    assert payload["charts"]["loss"] == ["loss", "eval_loss"]
    assert payload["series"]["loss"]["count"] == 5 and payload["series"]["loss"]["points"][0] == [1, 1.0, 1.0]
    again = client.get("/api/metrics", params={"name": "exp/sft", "since": payload["version"]}).json()
    assert again == {"version": payload["version"], "unchanged": True}
    write_log(board_root / "exp" / "sft", log_records(1, start=6))
    grown = client.get("/api/metrics", params={"name": "exp/sft", "since": payload["version"]}).json()
    assert grown["series"]["loss"]["count"] == 6


def test_a_half_written_line_waits_and_a_truncated_log_is_reread(tmp_path):
    path = tmp_path / "trainer_log.jsonl"
    path.write_text('{"current_steps": 1, "loss": 2.0}\n{"current_steps": 2, "lo')
    log = LogFile(path)
    assert [r["current_steps"] for r in log.refresh()] == [1]
    with open(path, "a") as handle:
        handle.write('ss": 1.0}\nnot json\n')
    assert [r["current_steps"] for r in log.refresh()] == [1, 2]  # the damaged line is skipped, not fatal
    path.write_text('{"current_steps": 1, "loss": 3.0}\n')  # a resumed run rewrote its log shorter
    assert [r["loss"] for r in log.refresh()] == [3.0]


def test_thinning_keeps_every_extreme_and_both_ends():
    points = [[s, None, float((s * 7919) % 101)] for s in range(100_000)]
    points[54_321][2] = 1e6  # a spike
    kept = thin(points, 2000)
    assert len(kept) <= 2000 and kept[0] == points[0] and kept[-1] == points[-1]
    assert [54_321, None, 1e6] in kept
    assert min(p[2] for p in kept) == min(p[2] for p in points)
    assert [p[0] for p in kept] == sorted(p[0] for p in kept)


def test_series_and_groups():
    series = chart_series([{"current_steps": 1, "loss": 1.0, "epoch": 0.1, "flag": True, "elapsed_time": "1 day, 1:00:02"}])
    assert series == {"loss": [[1, 90002.0, 1.0]]}
    assert chart_groups(["lr", "eval_accuracy", "loss", "eval_loss"]) == {
        "loss": ["loss", "eval_loss"], "lr": ["lr"], "eval_accuracy": ["eval_accuracy"]}
    assert elapsed_seconds("0:01:05") == 65 and elapsed_seconds(None) is None


def test_heartbeat_states(tmp_path):
    with status_block(tmp_path / "ok", enabled=True):
        assert run_status(tmp_path / "ok")["status"] == "running"
    assert run_status(tmp_path / "ok")["status"] == "finished"
    with pytest.raises(ValueError), status_block(tmp_path / "bad", enabled=True):
        raise ValueError("the data ran out")
    failed = run_status(tmp_path / "bad")
    assert failed["status"] == "failed" and "the data ran out" in failed["error"]
    with pytest.raises(KeyboardInterrupt), status_block(tmp_path / "stop", enabled=True):
        raise KeyboardInterrupt
    assert run_status(tmp_path / "stop")["status"] == "stopped"
    with status_block(tmp_path / "rank1", enabled=False):
        pass
    assert not (tmp_path / "rank1").exists()


def test_a_silent_running_run_reads_as_failed(tmp_path):
    beat = Heartbeat(tmp_path, interval=5.0)
    beat._write()
    assert run_status(tmp_path)["status"] == "running"
    late = run_status(tmp_path, now=time.time() + 60)
    assert late["status"] == "failed" and "stopped reporting" in late["error"]


def test_the_heartbeat_thread_refreshes_the_file(tmp_path):
    beat = Heartbeat(tmp_path, interval=0.01).start()
    first = json.loads((tmp_path / "run_status.json").read_text())["updated"]
    deadline = time.time() + 10
    while json.loads((tmp_path / "run_status.json").read_text())["updated"] == first and time.time() < deadline:
        time.sleep(0.01)
    beat.finish("finished")
    assert json.loads((tmp_path / "run_status.json").read_text())["updated"] > first
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_other_addresses_need_a_token():
    assert board_token("127.0.0.1", None) is None and board_token("localhost", None) is None
    with pytest.raises(TunesmithError, match="--auth-token"):
        board_token("0.0.0.0", None)
    assert board_token("0.0.0.0", "s3cret") == "s3cret" and len(board_token("0.0.0.0", "random")) > 20


def test_the_token_is_required_on_every_request(board_root):
    client = TestClient(create_app(board_root, auth_token="s3cret"), base_url="http://127.0.0.1")
    assert client.get("/api/runs").status_code == 401 and client.get("/").status_code == 401
    assert client.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs", headers={"authorization": "Bearer nope"}).status_code == 401
    opened = client.get("/?token=s3cret", follow_redirects=False)
    assert opened.status_code == 303 and "token" not in opened.headers["location"]
    assert client.get("/api/runs").status_code == 200  # the cookie it set


@pytest.mark.parametrize("output_dir", ["../elsewhere", "/tmp/x", ".board/x", ""])
def test_launch_refuses_output_dirs_outside_the_root(client, output_dir):
    response = client.post("/api/check", json={"config": f"stage: sft\noutput_dir: '{output_dir}'\n"})
    assert response.status_code == 400 and "folder name under the board's root" in response.json()["error"]


def test_launch_checks_with_the_cli_messages(client, board_root):
    response = client.post("/api/check", json={"config": "stage: sft\nlearning_rat: 1.0e-3\noutput_dir: new\n"})
    assert response.status_code == 400 and "learning_rate" in response.json()["error"]
    assert "did you mean" in response.json()["error"].lower()
    assert not list((board_root / ".board" / "launches").glob("*.yaml"))  # a failed check leaves nothing
    assert client.post("/api/check", json={"config": "[1, 2"}).status_code == 400


def test_stop_refuses_runs_this_board_did_not_start(client):
    response = client.post("/api/stop", params={"name": "exp/sft"}, json={})
    assert response.status_code == 400 and "not started by this board" in response.json()["error"]


def test_run_folders_skip_checkpoints_and_hidden_folders(board_root, write_log):
    write_log(board_root / "a" / "checkpoint-5", log_records(1))
    write_log(board_root / ".board" / "x", log_records(1))
    write_log(board_root / "a", log_records(1))
    assert RunFolders(board_root).names() == ["a"]


def test_a_launched_run_that_dies_before_its_folder_shows_why(client, board_root, tmp_path):
    config = f"stage: sft\nmodel_name_or_path: {tmp_path / 'no_such_model'}\ndataset: tiny\noutput_dir: early\n"
    assert client.post("/api/launch", json={"config": config}).json() == {"run": "early"}
    deadline = time.time() + 120
    while (run := client.get("/api/run", params={"name": "early"})).status_code == 404 and time.time() < deadline:
        time.sleep(0.1)
    details = run.json()
    assert details["status"] == "failed" and "no_such_model" in details["error"]
    assert "no_such_model" in details["console"] and "output_dir" in details["config"]
    assert client.get("/api/metrics", params={"name": "early"}).json()["series"] == {}
    assert not (board_root / "early").exists()


def test_examples_beside_the_board_prefill_the_form(board_root, tmp_path, monkeypatch):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "sft_lora.yaml").write_text("stage: sft\nlearning_rate: 1.0e-4\n")
    (tmp_path / "examples" / "broken.yaml").write_text("stage: [\n")
    monkeypatch.chdir(tmp_path)
    examples = TestClient(create_app(board_root), base_url="http://127.0.0.1").get("/api/examples").json()["examples"]
    assert examples == {"sft_lora.yaml": {"stage": "sft", "learning_rate": 1.0e-4}}


def test_requests_another_site_could_forge_are_refused(client):
    assert client.get("/api/runs", headers={"host": "evil.example:7860"}).status_code == 421  # DNS rebinding
    assert client.get("/api/runs", headers={"host": "localhost:7860"}).status_code == 200
    form = client.post("/api/stop", params={"name": "exp/sft"}, content=b"x", headers={"content-type": "text/plain"})
    assert form.status_code == 415  # a cross-site page can send text/plain without asking; JSON it cannot


def test_a_run_whose_files_link_out_of_the_root_is_not_shown(client, board_root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (board_root / "exp" / "sft" / "running_log.txt").symlink_to(secret)
    assert client.get("/api/run", params={"name": "exp/sft"}).status_code == 404
    assert "private key" not in client.get("/api/runs").text


def test_concurrent_reads_of_one_log_count_each_line_once(board_root, write_log):
    from concurrent.futures import ThreadPoolExecutor

    write_log(board_root / "big", log_records(20_000))
    folders = RunFolders(board_root)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: folders.records(folders.resolve("big")), range(8)))
    assert len(folders.records(folders.resolve("big")).series["loss"]) == 20_000


def test_one_damaged_run_does_not_hide_the_others(client, board_root, write_log):
    write_log(board_root / "bad", log_records(2))
    (board_root / "bad" / "train_config.yaml").write_bytes(b"dataset: caf\xe9\n")  # not UTF-8
    (board_root / "bad" / "run_status.json").write_text('{"status": "running", "updated": null}')
    names = [run["name"] for run in client.get("/api/runs").json()["runs"]]
    assert names == ["bad", "exp/sft"]


def test_empty_tokens_and_odd_output_dirs_are_refused(client, board_root, tmp_path):
    with pytest.raises(TunesmithError, match="empty"):
        board_token("0.0.0.0", "  ")
    (board_root / "out").symlink_to(tmp_path)
    for output_dir in (".", "./", "out/run"):
        response = client.post("/api/check", json={"config": f"stage: sft\noutput_dir: '{output_dir}'\n"})
        assert response.status_code == 400, output_dir


def test_the_report_keeps_markup_in_its_data_inert(board_root, write_log):
    from tunesmith.board.report import render_report, report_data

    write_log(board_root / "run(1) 50%", log_records(3))
    data = report_data(board_root / "run(1) 50%")
    assert "/api/metrics?name=run(1)%2050%25" in data["api"]  # as encodeURIComponent writes the name
    data["api"]["x"] = "<!--<script></script>"
    page = render_report(data)
    embedded = page.split("window.TUNESMITH_REPORT = ", 1)[1].split(";</script>", 1)[0]
    assert "<" not in embedded and json.loads(embedded)["api"]["x"] == "<!--<script></script>"
