"""Write a merged model as one GGUF file (llama.cpp, Ollama) with its tokenizer and chat template.

Supported: the `llama` and `qwen2` architectures (SmolLM, Llama 2/3 shapes, Qwen2/2.5) with a byte-level
BPE tokenizer (GPT-2 style: Qwen2, Llama 3, SmolLM). Tensors get llama.cpp's names (the `gguf`
package's tensor map). llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, so the
q and k projections of a `llama` model are permuted from Hugging Face's half-split layout, as llama.cpp's
own converter does; Qwen2 uses the half-split (NEOX) layout and keeps them as they are.

Types (`export_gguf_type`): f32 keeps every tensor in float32; f16 / bf16 store 2-D weights in that type;
q8_0 stores 2-D weights whose rows split into 32-value blocks as Q8_0 (one scale per block, 8-bit values)
and the rest as f16. Norms and biases stay float32 in every type, as llama.cpp's converter keeps them.

Usage:
    write_gguf(model, tokenizer, Path("out/model.F16.gguf"), "f16", pre_tokenizer="smollm")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import TunesmithError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}
"""Hugging Face model_type -> the gguf package's MODEL_ARCH member."""
PERMUTED_ROPE = {"llama"}
"""Architectures whose llama.cpp graph expects q/k rows permuted to interleaved rotary pairs."""
DEFAULT_PRE_TOKENIZER = {"qwen2": "qwen2"}
"""llama.cpp's pre-tokenizer name per architecture, when the source GGUF does not say."""


def gguf_file_name(export_dir: Path, gguf_type: str) -> str:
    """`<export_dir's name>.<TYPE>.gguf`, llama.cpp's naming."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(export_dir).name).strip("-.") or "model"
    return f"{name}.{gguf_type.upper()}.gguf"


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str, pre_tokenizer: str | None = None,
               chat_template: str | None = None) -> None:
    """The model's weights, hyperparameters and tokenizer as a GGUF file at `path`."""
    import gguf

    config = model.config
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise TunesmithError(
            f"export_format: gguf supports the {', '.join(sorted(ARCHITECTURES))} architectures; this model is "
            f"{model_type!r}. Export it as safetensors (remove export_format) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more architectures.")
    if gguf_type not in GGUF_TYPES:
        raise TunesmithError(f"export_gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    _check_rope(config)
    vocab = _byte_level_vocab(tokenizer, config.vocab_size)
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_hyperparameters(writer, config, path, gguf_type, gguf)
    _write_tokenizer(writer, tokenizer, vocab, pre_tokenizer or DEFAULT_PRE_TOKENIZER.get(model_type, "default"),
                     chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None))
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output matrix when `output` is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunesmithError(f"export_format: gguf has no llama.cpp name for the tensor {hf_name!r} of this "
                                 f"{model_type} model; export it as safetensors instead.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if model_type in PERMUTED_ROPE and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                             "k_proj.bias")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = permute_for_rope(data, heads)
        _add_tensor(writer, name, data, gguf_type, gguf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from [first half; second half] (Hugging Face) to interleaved pairs (llama.cpp)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str, gguf) -> None:
    """One tensor in the requested type; 1-D tensors (norms, biases) always float32."""
    kind = gguf.GGMLQuantizationType
    if gguf_type == "f32" or data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32, copy=False))
    elif gguf_type == "f16" or (gguf_type == "q8_0" and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = kind.BF16 if gguf_type == "bf16" else kind.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _write_hyperparameters(writer, config, path: Path, gguf_type: str, gguf) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(path.name.split(".")[0])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


def _check_rope(config) -> None:
    """Plain rotary embeddings only: a scaled rope (llama3, yarn, ...) would need more metadata."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type") or parameters.get("type") or "default"
    if rope_type != "default":
        raise TunesmithError(
            f"export_format: gguf writes plain rotary embeddings, and this model's config.json uses "
            f"rope_type {rope_type!r}. Export it as safetensors and convert it with llama.cpp's "
            "convert_hf_to_gguf.py.")


def _byte_level_vocab(tokenizer, vocab_size: int) -> dict:
    """tokens, token types and merges of a byte-level BPE tokenizer, padded to the model's vocab_size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, decoder = spec.get("model") or {}, json.dumps(spec.get("decoder") or {})
    if model.get("type") != "BPE" or '"ByteLevel"' not in decoder:
        raise TunesmithError(
            "export_format: gguf writes byte-level BPE tokenizers (GPT-2 style: Qwen2, Llama 3, SmolLM); this "
            f"tokenizer is {model.get('type') or type(tokenizer).__name__}. Export as safetensors and convert "
            "with llama.cpp's convert_hf_to_gguf.py.")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise TunesmithError(f"The tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}.")
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(token)
            types.append(1 if token not in added else 3 if added[token] else 4)  # NORMAL / CONTROL / USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _write_tokenizer(writer, tokenizer, vocab: dict, pre_tokenizer: str, chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    # what the tokenizer really does (Llama 3 adds BOS in its post-processor, not through add_bos_token)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(adds_bos))
    if chat_template:
        writer.add_chat_template(chat_template)


def gguf_pre_tokenizer(model_name_or_path: str) -> str | None:
    """llama.cpp's pre-tokenizer name recorded when the base model was converted from a GGUF, else None."""
    from tunesmith.model.gguf_import import SOURCE_RECORD, local_model_source

    record = Path(local_model_source(model_name_or_path)) / SOURCE_RECORD
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8")).get("pre_tokenizer")


def ollama_modelfile(gguf_name: str, template, tokenizer, stop_tokens: list[str]) -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`. A built-in template
    becomes its TEMPLATE (and SYSTEM); otherwise Ollama takes the chat template the GGUF carries."""
    lines = ["# ollama create my-model -f Modelfile   (written by tunesmith export)", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template.to_go_template(tokenizer)}"""')
        if template.default_system:
            lines.append(f'SYSTEM """{template.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in dict.fromkeys(stop_tokens) if token]
    return "\n".join(lines) + "\n"
