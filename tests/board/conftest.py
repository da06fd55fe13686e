"""The board under test: a server in this process on a free port, finished tiny runs to show, and a real
Chromium driven by Playwright (skipped cleanly where none is installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TUNESMITH_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "board"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """A Chromium to drive: $TUNESMITH_CHROMIUM, else Debian's `chromium` package on PATH."""
    return os.environ.get("TUNESMITH_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set TUNESMITH_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture
def screenshot():
    """screenshot(page, name): save what the page shows as a test artifact (test-artifacts/board/NAME.png)."""
    def save(page, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path
    return save


class BoardServer:
    """uvicorn serving create_app(root) on a thread; `url` while it runs."""

    def __init__(self, root: Path, auth_token: str | None = None) -> None:
        import uvicorn

        from tunesmith.board.app import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(create_app(root, auth_token=auth_token), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BoardServer:
        self.thread.start()
        ready = threading.Event()
        while not self.server.started and self.thread.is_alive():
            ready.wait(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def board_root(tmp_path):
    root = tmp_path / "saves"
    root.mkdir()
    return root


@pytest.fixture
def serve():
    """serve(root) -> a running BoardServer (stopped after the test)."""
    started = []

    def start(root: Path, auth_token: str | None = None) -> BoardServer:
        server = BoardServer(root, auth_token).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


def append_log(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "trainer_log.jsonl", "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


@pytest.fixture
def write_log():
    """write_log(folder, records): append trainer_log.jsonl lines, as a training run does."""
    return append_log


@pytest.fixture(scope="session")
def board_model(tmp_path_factory):
    from tunesmith.model.init_model import init_model

    return str(init_model(tmp_path_factory.mktemp("board_model") / "tiny", arch="qwen2", size="tiny", seed=0))


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory, board_model):
    """A root holding finished tiny runs: `sft` (LoRA SFT), `dpo` (pairs logged every step) and `grpo`
    (rollouts logged every step)."""
    from tunesmith.training.configure import build_config
    from tunesmith.training.run import run_training

    root = tmp_path_factory.mktemp("runs")
    data = root.parent / f"{root.name}_data"
    data.mkdir()
    records = [{"instruction": f"Say word {i}.", "input": "", "output": f"Word {i} is good."} for i in range(8)]
    (data / "tiny.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    base = {"model_name_or_path": board_model, "dataset": "tiny", "dataset_dir": str(data), "cutoff_len": 64,
            "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 0,
            "lora_rank": 4, "lora_target": "all", "max_new_tokens": 12, "seed": 0}
    run_training(build_config({**base, "max_steps": 8, "save_steps": 4, "output_dir": str(root / "sft")}),
                 say=lambda *_: None)
    pairs = [{"instruction": f"Describe thing {i}.", "input": "", "chosen": f"Thing {i} is kind.",
              "rejected": f"Thing {i} is rude."} for i in range(8)]
    (data / "pairs.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"},
                                                        "pairs": {"file_name": "pairs.json", "ranking": True}}))
    run_training(build_config({**base, "stage": "dpo", "dataset": "pairs", "max_steps": 3, "log_rollouts_steps": 1,
                               "output_dir": str(root / "dpo")}), say=lambda *_: None)
    run_training(build_config({**base, "stage": "grpo", "max_steps": 3, "num_generations": 2, "log_rollouts_steps": 1,
                               "reward_function": "tunesmith.demos.synthetic:kindness_reward",
                               "adapter_name_or_path": str(root / "sft"), "output_dir": str(root / "grpo")}),
                 say=lambda *_: None)
    return root
