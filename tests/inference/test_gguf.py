"""GGUF out and in: `export_format: gguf` writes a file that transformers' GGUF loader (and llama.cpp, when
llama-cpp-python is installed) reads back as the merged model, each type checked against an independent
rounding of the weights; a GGUF file works as `model_name_or_path`, converted once and cached."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tunesmith.data.templates import BUILTIN_TEMPLATES
from tunesmith.errors import TunesmithError
from tunesmith.inference.export import export_model
from tunesmith.inference.gguf_export import permute_for_rope, write_gguf
from tunesmith.model import gguf_import
from tunesmith.model.adapters import merge_adapters
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.training.configure import build_config

pytest.importorskip("gguf")
CPU = torch.device("cpu")
INPUT_IDS = torch.tensor([[5, 9, 17, 3, 250, 1000, 42, 7, 7, 8]])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory, adapter_writer) -> tuple[str, str]:
    """(base folder, LoRA adapter folder) of a tiny model of each supported architecture."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    base = str(init_model(root / "base", arch=request.param, size="tiny", seed=0))
    return base, adapter_writer(base, root / "adapter", seed=3)


def merged(base: str, adapter: str) -> torch.nn.Module:
    model = load_model(base, torch.float32, CPU, attn_implementation="sdpa").eval()
    merge_adapters(model, [adapter])
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def export_gguf(tmp_path: Path, base: str, adapter: str, gguf_type: str, **settings) -> Path:
    raw = {"model_name_or_path": base, "adapter_name_or_path": adapter, "export_dir": str(tmp_path / "gguf"),
           "export_format": "gguf", "export_gguf_type": gguf_type, **settings}
    folder = export_model(build_config(raw, command="export"), say=lambda _: None)
    (file,) = folder.glob("*.gguf")
    return file


def read_back(file: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()


def round_weights(model: torch.nn.Module, rounding) -> torch.nn.Module:
    """The model with every 2-D weight passed through `rounding` (what a GGUF type keeps of it)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(rounding(parameter))
    return model


def q8_0_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0, written from its definition: blocks of 32 along a row, d = max|x| / 127, values
    round(x / d) (half away from zero) as int8, and d stored as f16 for dequantizing."""
    blocks = weight.reshape(-1, 32).double()
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    ratio = blocks / torch.where(scale > 0, scale, 1)
    values = torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)
    return (values * scale.half().double()).reshape(weight.shape).float()


def test_f32_gguf_reads_back_as_the_merged_model_with_its_tokenizer(trained, tmp_path):
    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")
    expected = logits(merged(base, adapter))
    torch.testing.assert_close(logits(read_back(file)), expected, atol=1e-4, rtol=0)
    ours, theirs = load_tokenizer(base), AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    text = "Hello there, 7 plus 10 is 17.\n<|im_start|>user\nhi<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert theirs.eos_token == ours.eos_token
    modelfile = (file.parent / "Modelfile").read_text()
    assert f"FROM ./{file.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("gguf_type,rounding", [
    ("f16", lambda w: w.half().float()),
    ("bf16", lambda w: w.bfloat16().float()),
    ("q8_0", q8_0_by_hand),
])
def test_each_type_holds_the_weights_rounded_as_the_type_defines(trained, tmp_path, gguf_type, rounding):
    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, gguf_type)
    expected = logits(round_weights(merged(base, adapter), rounding))
    assert not torch.allclose(expected, logits(merged(base, adapter)), atol=1e-6)  # the rounding shows
    torch.testing.assert_close(logits(read_back(file)), expected, atol=1e-4, rtol=0)


def test_a_builtin_template_travels_as_the_chat_template_and_the_modelfile(trained, tmp_path):
    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f16", template="qwen")
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}]
    expected = "".join(p + r for p, r in BUILTIN_TEMPLATES["qwen"].render_turns(
        load_tokenizer(base), messages + [{"role": "assistant", "content": ""}]))
    assert tokenizer.apply_chat_template(messages, tokenize=False) + "<|im_end|>\n" == expected
    modelfile = (file.parent / "Modelfile").read_text()
    assert 'TEMPLATE """{{ range .Messages }}' in modelfile and 'SYSTEM """You are Qwen' in modelfile


def test_permute_for_rope_interleaves_the_two_halves_of_each_head():
    heads, head_dim, columns = 3, 4, 2
    weight = np.arange(heads * head_dim * columns, dtype=np.float32).reshape(heads * head_dim, columns)
    expected = np.empty_like(weight)
    for head in range(heads):
        rows = weight[head * head_dim:(head + 1) * head_dim]
        for pair in range(head_dim // 2):  # llama.cpp rotates rows (2i, 2i+1); Hugging Face (i, i + half)
            expected[head * head_dim + 2 * pair] = rows[pair]
            expected[head * head_dim + 2 * pair + 1] = rows[pair + head_dim // 2]
    np.testing.assert_array_equal(permute_for_rope(weight, heads), expected)


def test_llama_cpp_reads_the_export_as_transformers_does(trained, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")
    model = merged(base, adapter)
    llm = llama_cpp.Llama(str(file), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 cache, so only the arithmetic differs
    ids = INPUT_IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    torch.testing.assert_close(theirs, logits(model)[0], atol=2e-3, rtol=0)
    greedy = model.generate(INPUT_IDS, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    llm.reset()
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        generated.append(token)
        if len(generated) == len(greedy):
            break
    assert generated == greedy


def test_unsupported_models_get_a_clear_error(tmp_path, trained):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TunesmithError, match="llama, qwen2 architectures.*'gpt2'"):
        write_gguf(gpt2, load_tokenizer(trained[0]), tmp_path / "x.gguf", "f16")
    with pytest.raises(TunesmithError, match="export_gguf_type"):
        build_config({"model_name_or_path": trained[0], "export_dir": str(tmp_path / "e"), "export_format": "gguf",
                      "export_gguf_type": "q4_k"}, command="export")


def test_a_gguf_file_is_a_model_source_converted_once(trained, tmp_path, monkeypatch, capsys):
    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")
    model = load_model(str(file), torch.float32, CPU, attn_implementation="sdpa").eval()
    torch.testing.assert_close(logits(model), logits(merged(base, adapter)), atol=1e-4, rtol=0)
    said = capsys.readouterr().err
    assert "converting" in said and "F32" in said and "dequantized to float32" in said
    cached = Path(gguf_import.local_model_source(str(file)))
    record = json.loads((cached / gguf_import.SOURCE_RECORD).read_text())
    assert record["sha256"] == gguf_import.file_digest(file) and record["tensor_types"]["F32"] > 0

    def no_second_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_import, "convert", no_second_conversion)
    assert load_tokenizer(str(file.parent)).eos_token == load_tokenizer(base).eos_token  # the folder holding it
    load_model(str(file), torch.float32, CPU)


def test_a_gguf_model_trains_and_its_adapter_exports(trained, tmp_path):
    from tunesmith.training.run import run_training

    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")
    data = tmp_path / "data"
    data.mkdir()
    (data / "hi.json").write_text(json.dumps([{"instruction": "hi", "output": "hello there"}] * 4))
    (data / "dataset_info.json").write_text(json.dumps({"hi": {"file_name": "hi.json"}}))
    out = tmp_path / "sft"
    run_training(build_config({"model_name_or_path": str(file), "stage": "sft", "finetuning_type": "lora",
                               "dataset": "hi", "dataset_dir": str(data), "template": "qwen", "max_steps": 2,
                               "output_dir": str(out), "learning_rate": 1e-2}), say=lambda *_: None)
    again = export_gguf(tmp_path / "again", str(file), str(out), "f32")
    expected = load_model(str(file), torch.float32, CPU, attn_implementation="sdpa").eval()
    merge_adapters(expected, [str(out)])
    torch.testing.assert_close(logits(read_back(again)), logits(expected), atol=1e-4, rtol=0)


def test_bad_gguf_sources_are_named(tmp_path):
    with pytest.raises(TunesmithError, match="was not found"):
        load_model(str(tmp_path / "missing.gguf"), torch.float32, CPU)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(TunesmithError, match="several GGUF files"):
        load_model(str(tmp_path), torch.float32, CPU)
    with pytest.raises(TunesmithError, match="Could not read .*a.gguf"):
        load_model(str(tmp_path / "a.gguf"), torch.float32, CPU)


def test_a_llama_with_attention_biases_reads_back_the_same_in_llama_cpp(trained, tmp_path):
    """llama.cpp rotates q/k rows in interleaved pairs: their biases are permuted with the weights.
    (transformers' GGUF reader drops llama attention biases, so llama.cpp is the reader here.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM

    base, _ = trained
    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    write_gguf(model, tokenizer, tmp_path / "b.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "b.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    ids = INPUT_IDS[0].tolist()
    llm.eval(ids)
    torch.testing.assert_close(torch.tensor(np.array(llm.scores[:len(ids)])), logits(model)[0], atol=2e-3, rtol=0)


def test_ranks_converting_at_once_share_one_conversion(trained, tmp_path):
    import threading

    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")
    folders, errors = [], []

    def convert():
        try:
            folders.append(gguf_import.local_model_source(str(file)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(folders)) == 1
    leftovers = [p.name for p in Path(folders[0]).parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers


def test_a_conversion_that_cannot_be_written_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    import errno

    base, adapter = trained
    file = export_gguf(tmp_path, base, adapter, "f32")

    def full_disk(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_import, "follow_umask", full_disk)
    with pytest.raises(TunesmithError, match="No space left on device.*TUNESMITH_CACHE"):
        gguf_import.local_model_source(str(file))
    cache = tmp_path / "cache" / "gguf"
    assert [p.name for p in cache.iterdir() if not p.name.startswith((".", "digests"))] == []
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
