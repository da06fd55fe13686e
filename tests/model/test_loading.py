"""loading.py: device/dtype choice, safetensors-only loading, user errors, pad tokens, real assets."""

import json
from pathlib import Path

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.model import loading
from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer, resolve_device_and_dtype
from tunesmith.model.tokenizer_build import corpus_texts, train_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "assets"


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_dir():
        pytest.skip(f"shared asset {name} is absent")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("tiny"), arch="qwen2", size="tiny", seed=0)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_dtypes(no_cuda, monkeypatch):
    assert resolve_device_and_dtype(bf16=False, fp16=False) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert resolve_device_and_dtype(bf16=True, fp16=False) == (torch.device("cpu"), torch.bfloat16)


def test_bf16_on_a_cpu_without_bf16_units_falls_back_to_fp32_with_a_warning(no_cuda, monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16 matrix instructions"):
        assert resolve_device_and_dtype(bf16=True, fp16=False) == (torch.device("cpu"), torch.float32)


def test_fp16_on_cpu_is_a_user_error(no_cuda):
    with pytest.raises(TunesmithError, match="fp16.*GPU.*bf16"):
        resolve_device_and_dtype(bf16=False, fp16=True)


def test_bf16_and_fp16_together_is_a_user_error():
    with pytest.raises(TunesmithError, match="Both bf16 and fp16"):
        resolve_device_and_dtype(bf16=True, fp16=True)


def test_load_model_in_dtype_with_finite_logits(tiny_dir):
    model = load_model(str(tiny_dir), torch.bfloat16, torch.device("cpu"))
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == VARLEN_SDPA  # sdpa, plus per-sample attention for packed rows
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits.float()).all()


def test_pickle_only_folder_is_refused(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(TunesmithError, match="pytorch_model.bin.*never unpickles"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(TunesmithError, match="no_such_model.*not found"):
        load_model(str(missing), torch.float32, torch.device("cpu"))
    with pytest.raises(TunesmithError, match="no_such_model.*not found"):
        load_tokenizer(str(missing))


def test_unreachable_hub_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(
        TunesmithError, match="'someorg/somemodel' is not a local model folder.*hub is unreachable"
    ):
        load_model("someorg/somemodel", torch.float32, torch.device("cpu"))


def test_trained_tokenizer_keeps_its_distinct_pad(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir))
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")


def test_missing_pad_prefers_a_special_token_over_eos(tmp_path):
    tokenizer = train_tokenizer(corpus_texts(), vocab_size=512)
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(str(tmp_path)).pad_token == "<|endoftext|>"


def test_stories260k_greedy_decoding():
    path = str(_asset("stories260K_hf"))
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    model = load_model(path, torch.float32, torch.device("cpu"))
    batch = tokenizer("Once upon a time", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily")


def test_qwen2_tokenizer_asset_loads():
    tokenizer = load_tokenizer(str(_asset("qwen2_tokenizer")))
    assert len(tokenizer) == 151646
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(TunesmithError, match="no usable tokenizer"):
        load_tokenizer(str(tmp_path))
