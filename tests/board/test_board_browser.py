"""What a user sees in the board, in a real Chromium: runs, live charts, compare, launch, chat, rollouts
and the standalone report. Screenshots of each page go to test-artifacts/board/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.board.report import write_report

WAIT = 60_000  # ms: a launched run starts a Python process and imports torch


def loss_lines(folder: Path) -> int:
    lines = (folder / "trainer_log.jsonl").read_text().splitlines()
    return sum("loss" in json.loads(line) for line in lines)


def test_runs_list_shows_each_finished_run_with_its_steps(page, serve, runs_root, screenshot):
    server = serve(runs_root)
    page.goto(server.url)
    row = page.locator("tr.run-row[data-run='sft']")
    row.wait_for()
    assert row.locator("td.steps").inner_text() == "8 / 8"
    assert row.locator(".status").inner_text() == "finished"
    page.fill("#run-filter", "grpo")
    assert page.locator("tr.run-row").count() == 1
    screenshot(page, "runs")


def test_a_runs_loss_chart_has_a_point_per_logged_loss(page, serve, runs_root, screenshot):
    server = serve(runs_root)
    page.goto(server.url + "#/run/sft")
    legend = page.locator(".chart-box[data-chart='loss'] .legend-item[data-series='loss']")
    legend.wait_for()
    assert legend.get_attribute("data-count") == str(loss_lines(runs_root / "sft")) == "8"
    assert page.locator(".chart-box[data-chart='loss'] path.line[data-series='loss']").get_attribute("data-count") == "8"
    chart = page.locator(".chart-box[data-chart='loss'] svg.chart")
    box = chart.bounding_box()
    chart.hover(position={"x": box["width"] - 16, "y": box["height"] / 2})  # nearest point: the last step
    tip = page.locator(".chart-box[data-chart='loss'] .chart-tip").inner_text().splitlines()
    last = json.loads((runs_root / "sft" / "trainer_log.jsonl").read_text().splitlines()[-1])
    assert tip[0] == "step 8" and float(tip[1].split(": ")[1]) == last["loss"]  # the logged number, unrounded
    assert "checkpoint-4" in page.locator("#checkpoints").inner_text()
    assert "stage: sft" in page.locator("#config").inner_text()
    assert page.locator("#final-metrics").is_visible()
    page.select_option("#x-axis", "time")
    page.locator("#smoothing").fill("0.6")
    assert page.locator(".chart-box[data-chart='loss'] path.raw").count() == 1  # the raw line stays, faint
    screenshot(page, "run_charts")


def test_compare_overlays_one_metric_across_runs(page, serve, runs_root, screenshot):
    server = serve(runs_root)
    page.goto(server.url)
    page.locator("tr.run-row[data-run='sft'] input.pick").check()
    page.locator("tr.run-row[data-run='grpo'] input.pick").check()
    page.click("#compare-selected")
    chart = page.locator("#compare-chart")
    chart.locator(".legend-item").nth(1).wait_for()
    assert sorted(chart.locator(".legend-item").evaluate_all("items => items.map(i => i.dataset.series)")) == ["grpo", "sft"]
    screenshot(page, "compare")


def launch_from_sft(page, server, max_steps: int, before_start=lambda: None) -> None:
    """Open the form prefilled from the `sft` run, set max_steps, Start, and land on the new run's page."""
    page.goto(server.url + "#/launch?from=sft")
    page.wait_for_function("document.querySelector('#key-output_dir')?.value === 'sft-again'")
    page.fill("#key-max_steps", str(max_steps))
    page.fill("#key-save_steps", "0")
    before_start()
    page.click("#start-run")
    page.wait_for_url("**#/run/sft-again")


@pytest.fixture
def root_with_sft(runs_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(runs_root / "sft", root / "sft")
    return root


def test_a_run_launched_from_the_form_finishes_and_is_listed(page, serve, root_with_sft, screenshot):
    server = serve(root_with_sft)
    launch_from_sft(page, server, 30, before_start=lambda: screenshot(page, "launch"))
    page.wait_for_function("document.querySelector('.run-header .status')?.textContent === 'finished'", timeout=WAIT)
    # status and log lines come in on their own polls: the last points may arrive a poll after "finished"
    page.wait_for_function("document.querySelector(\".legend-item[data-series='loss']\")?.dataset.count === '30'",
                           timeout=WAIT)
    page.goto(server.url)
    row = page.locator("tr.run-row[data-run='sft-again']")
    row.wait_for()
    assert row.locator(".status").inner_text() == "finished" and row.locator("td.steps").inner_text() == "30 / 30"


def test_a_training_runs_chart_grows_and_stop_ends_it_gracefully(page, serve, root_with_sft):
    root = root_with_sft
    launch_from_sft(page, serve(root), 1_000_000)
    legend = page.locator(".chart-box[data-chart='loss'] .legend-item[data-series='loss']")
    legend.wait_for(timeout=WAIT)
    seen = {int(legend.get_attribute("data-count"))}
    for _ in range(3):  # the page polls once a second: each new poll draws the lines logged since
        page.wait_for_function(f"+document.querySelector(\".legend-item[data-series='loss']\").dataset.count > {max(seen)}",
                               timeout=WAIT)
        seen.add(int(legend.get_attribute("data-count")))
    assert page.locator(".run-header .status").inner_text() == "running"
    page.click("#stop-run")
    page.wait_for_function("document.querySelector('.run-header .status').textContent === 'stopped'", timeout=WAIT)
    assert json.loads((root / "sft-again" / "run_status.json").read_text())["status"] == "stopped"
    assert "checkpoint-" in page.locator("#checkpoints").inner_text()  # the graceful stop's checkpoint


def test_a_typo_in_the_form_gets_the_clis_did_you_mean(page, serve, runs_root):
    server = serve(runs_root)
    page.goto(server.url + "#/launch")
    page.locator("#extra-keys").wait_for()
    page.fill("#key-output_dir", "typo")
    page.fill("#extra-keys", "learning_rat: 1.0e-3")
    page.click("#check-config")
    message = page.locator("#launch-message.bad")
    message.wait_for()
    assert "learning_rat" in message.inner_text() and "Did you mean `learning_rate`" in message.inner_text()


def test_a_chat_answer_streams_in(page, serve, runs_root, screenshot):
    server = serve(runs_root)
    page.goto(server.url + "#/chat?run=sft")
    page.locator("#chat-input").fill("Say word 3.")
    page.click("#chat-send")
    answer = page.locator(".bubble.assistant[data-done='true']")
    answer.wait_for(timeout=WAIT)
    assert int(answer.get_attribute("data-chunks")) >= 1  # read from the stream as it arrived
    assert answer.inner_text().strip()
    screenshot(page, "chat")


def test_the_chat_endpoint_sends_the_answer_piece_by_piece(serve, runs_root):
    from fastapi.testclient import TestClient

    from tunesmith.board.app import create_app

    client = TestClient(create_app(runs_root), base_url="http://127.0.0.1")
    request = {"name": "sft", "messages": [{"role": "user", "content": "Say word 3."}]}
    with client.stream("POST", "/api/chat", json=request) as response:
        pieces = list(response.iter_text())
    assert response.status_code == 200 and len(pieces) >= 2 and "".join(pieces).strip()
    assert client.post("/api/chat", json={**request, "name": "grpo/../sft"}).status_code == 404
    bad = client.post("/api/chat", json={"name": "sft", "messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and "role" in bad.json()["error"]


def test_rollout_tokens_are_coloured_and_hover_shows_the_logged_numbers(page, serve, runs_root, screenshot):
    logged = [json.loads(line) for line in (runs_root / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    last = max(record["step"] for record in logged)
    first = next(record for record in logged if record["step"] == last and record["sample"] == 0)
    server = serve(runs_root)
    page.goto(server.url + "#/run/grpo")
    tokens = page.locator(".rollout[data-sample='0'] .token")
    tokens.first.wait_for()
    assert tokens.count() == len(first["tokens"])
    page.select_option("#colour-by", "kl")
    token = page.locator(".rollout[data-sample='0'] .token").nth(1)
    token.hover()
    tip = page.locator("#token-tip").inner_text()
    shown = dict(line.split(": ", 1) for line in tip.splitlines()[1:])
    for field in ("kl", "advantages", "logprobs", "ref_logprobs"):
        assert float(shown[field]) == first[field][1], field
    background = token.evaluate("t => getComputedStyle(t).backgroundColor")
    assert background != "rgba(0, 0, 0, 0)" or first["kl"][1] == 0
    screenshot(page, "rollouts")
    page.click("#step-back")
    page.wait_for_function(f"document.querySelector('#sample-step').value !== '{last}'")


def test_the_report_opens_from_disk_with_the_same_chart(page, runs_root, screenshot):
    report = write_report(runs_root / "grpo")
    page.goto(report.as_uri())
    legend = page.locator(".chart-box[data-chart='loss'] .legend-item[data-series='loss']")
    legend.wait_for()
    assert legend.get_attribute("data-count") == str(loss_lines(runs_root / "grpo"))
    page.locator(".rollout .token").first.wait_for()
    screenshot(page, "report")


def test_a_dpo_runs_fixed_pairs_show_rewards_over_steps_and_log_ratios(page, serve, runs_root, screenshot):
    logged = [json.loads(line) for line in (runs_root / "dpo" / "pairs.jsonl").read_text().splitlines()]
    steps = sorted({record["step"] for record in logged})
    server = serve(runs_root)
    page.goto(server.url + "#/run/dpo")
    chosen = page.locator("#pair-rewards .legend-item[data-series='chosen reward']")
    chosen.wait_for()
    assert chosen.get_attribute("data-count") == str(len(steps))
    last = next(r for r in logged if r["step"] == steps[-1] and r["pair"] == 0)
    tokens = page.locator("[data-side='rejected'] .token")
    assert tokens.count() == len(last["rejected_tokens"])
    tokens.nth(1).hover()
    shown = dict(line.split(": ", 1) for line in page.locator("#token-tip").inner_text().splitlines()[1:])
    assert float(shown["logratio"]) == last["rejected_logratio"][1]
    assert float(shown["logps"]) == last["rejected_logps"][1]
    screenshot(page, "pairs")
