"""A tiny model folder with a LoRA adapter (random, non-zero), a LoRA reward model on the same base, and
`serve_api`, which starts `tunesmith api`'s app under uvicorn on a free local port."""

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import yaml

from tunesmith.model.adapters import save_adapter
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.model.value_head import ValueHead, save_value_head


def write_random_adapter(base: str, folder, seed: int, reward_head: bool = False) -> str:
    model = load_model(base, torch.float32, torch.device("cpu"))
    inject_lora(model, "all", 4, 8)
    torch.manual_seed(seed)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.2)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_modules(model)})
    save_adapter(model, folder, base, 4, 8, 0.0, names, False)
    load_tokenizer(base).save_pretrained(folder)
    if reward_head:
        torch.manual_seed(seed + 1)
        save_value_head(ValueHead(model.config.hidden_size), folder)
        (folder / "train_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": base, "cutoff_len": 64}))
    return str(folder)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> tuple[str, str]:
    """(base model folder, adapter folder)."""
    root = tmp_path_factory.mktemp("chat")
    base = str(init_model(root / "base", arch="qwen2", size="tiny", seed=0))
    return base, write_random_adapter(base, root / "adapter", seed=1)


@pytest.fixture(scope="session")
def reward_adapter(chat_model, tmp_path_factory) -> str:
    return write_random_adapter(chat_model[0], tmp_path_factory.mktemp("rm") / "rm", seed=4, reward_head=True)


@pytest.fixture(scope="session")
def adapter_writer():
    """write_random_adapter(base, folder, seed) for tests that build their own bases."""
    return write_random_adapter


class ServedUrl(str):
    """A served base URL; `.server` is the uvicorn server behind it, for tests that count its open requests."""

    def __new__(cls, url: str, server) -> "ServedUrl":
        served = super().__new__(cls, url)
        served.server = server
        return served


@contextmanager
def serving(engine, api_key: str | None):
    """The base URL (a ServedUrl) of `create_app(engine, "tiny", api_key)` served by uvicorn on a thread,
    inside the block."""
    import uvicorn

    from tunesmith.inference.server import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", api_key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield ServedUrl(f"http://127.0.0.1:{port}/v1", server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_api():
    """`with serve_api(engine, api_key) as url:` a server for the block."""
    return serving
