"""Tiny random-init causal LMs (2 layers, hidden 32) built in-process: no hub, no files, seconds to run;
and a writer for small dataset files."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunesmith.algorithms.linear import GEMM_VARIABLE, gemm_for_children

TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


@pytest.fixture(scope="session", autouse=True)
def one_gemm_for_every_process():
    """The processes tests start (torchrun's ranks, a killed run, its resume and the uninterrupted run it must
    equal bit for bit) multiply with the float32 GEMM this process timed, not each its own timing: on a
    machine near the threshold those differ from one process to the next (algorithms/linear.py). The
    variable fixes the library decoding packs float32 weights for too."""
    previous = os.environ.get(GEMM_VARIABLE)
    os.environ[GEMM_VARIABLE] = gemm_for_children()
    yield
    if previous is None:
        os.environ.pop(GEMM_VARIABLE, None)
    else:
        os.environ[GEMM_VARIABLE] = previous


@pytest.fixture
def make_tiny_model():
    """Factory: make_tiny_model("qwen2" | "llama", seed) -> the same eval-mode fp32 model for the same seed."""

    def make(arch: str = "qwen2", seed: int = 0):
        config_cls, model_cls = ARCHITECTURES[arch]
        torch.manual_seed(seed)
        return model_cls(config_cls(**TINY_SIZES)).eval()

    return make


def _write_dataset(folder: Path, name: str, records: list, entry: dict | None = None) -> Path:
    """Write records to <folder>/<name>.json and, with `entry`, register it in dataset_info.json."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records))
    if entry is not None:
        info_path = folder / "dataset_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info[name] = {"file_name": path.name, **entry}
        info_path.write_text(json.dumps(info))
    return path


@pytest.fixture
def write_dataset():
    return _write_dataset


@pytest.fixture(params=["torch", "onednn"])
def gemm(request, monkeypatch):
    """Run a test twice: on torch's own float32 matmuls, and with algorithms/linear.py sending every float32
    product to oneDNN (a test model's products are far below MIN_WORK, and CI machines may prefer MKL)."""
    from tunesmith.algorithms import linear

    if request.param == "onednn" and not linear._available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: request.param == "onednn")
    monkeypatch.setattr(linear, "MIN_WORK", 1)
    return request.param
