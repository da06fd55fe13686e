"""Load a causal LM and its tokenizer from a local folder or a hub id, on the right device and dtype.

Weights load only from safetensors (`use_safetensors=True`): a folder with only pickle weights
(`pytorch_model.bin`) is refused, because unpickling runs arbitrary code. A GGUF file is a source too: it
is converted once into a cached safetensors folder (model/gguf_import.py). `trust_remote_code` is
passed through and stays off unless the user sets it. Errors name the path and the fix.

The tokenizer always gets a pad token. Preferred is a special token other than eos (Qwen2-Instruct
pads with `<|endoftext|>` and ends turns with `<|im_end|>`), then unk, and eos only as a last
resort (LLaMA-Factory's default). Even then it is safe: the collator builds labels and attention
masks from the rendered masks, never by comparing ids with the pad id.

Usage:
    device, dtype = resolve_device_and_dtype(bf16=True, fp16=False)
    model = load_model("runs/tiny", dtype, device)
    tokenizer = load_tokenizer("runs/tiny")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.errors import TunesmithError
from tunesmith.model import quantize
from tunesmith.model.attention import VARLEN_SDPA
from tunesmith.model.fast_linear import use_fast_linears
from tunesmith.model.gguf_import import local_model_source

ConfigT = TypeVar("ConfigT")  # any config dataclass with bf16 and fp16 fields

# Pad-like special tokens of common tokenizers, tried in order before falling back to unk, then eos.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def resolve_device_and_dtype(bf16: bool, fp16: bool, use_cpu: bool = False) -> tuple[torch.device, torch.dtype]:
    """CUDA when visible (torch honours CUDA_VISIBLE_DEVICES) unless `use_cpu`, else CPU; bf16/fp16 if asked, else fp32."""
    if bf16 and fp16:
        raise TunesmithError("Both bf16 and fp16 are true. Set at most one of them (bf16 where the GPU supports it).")
    device = torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    if fp16:
        if device.type != "cuda":
            raise TunesmithError(
                "fp16: true needs a CUDA GPU, and none is visible (check CUDA_VISIBLE_DEVICES). "
                "On CPU set bf16: true (PyTorch runs bf16 on CPU) or leave both false for fp32."
            )
        return device, torch.float16
    if bf16:
        if device.type == "cpu" and not cpu_has_fast_bf16():
            warnings.warn(
                "bf16: true, but this CPU has no bfloat16 matrix instructions (AVX512-BF16 or AMX): bf16 "
                "matmuls run about 100x slower than fp32 here, so tunesmith computes in fp32. Set bf16: false "
                "to silence this.", stacklevel=2)
            return device, torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TunesmithError(
                f"bf16: true, but {torch.cuda.get_device_name(device)} does not support bfloat16. "
                "Set fp16: true instead, or leave both false for fp32."
            )
        return device, torch.bfloat16
    return device, torch.float32


def cpu_has_fast_bf16() -> bool:
    """oneDNN's own test for native bf16 support (AVX512-BF16 / AMX); assume yes if torch lacks it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def load_model(model_name_or_path: str, dtype: torch.dtype, device: torch.device,
               trust_remote_code: bool = False, attn_implementation: str | None = None,
               quantization: quantize.Quantization | None = None) -> PreTrainedModel:
    """`AutoModelForCausalLM` from safetensors weights, in `dtype` on `device` (sdpa attention by default).
    A GGUF file is converted once into a cached folder (model/gguf_import.py) and loaded from there.
    `quantization`: the linear layers load 4/8-bit through bitsandbytes (model/quantize.py)."""
    path = local_model_source(str(model_name_or_path), describe=True)
    is_local = _check_local_folder(path, "model")
    if is_local:
        _check_safetensors(Path(path).expanduser())
    placement = {}
    if quantization is not None:
        placement = {"quantization_config": quantization.transformers_config(dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(path).expanduser()) if is_local else path,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation or "sdpa",
            **placement,
        )
    except OSError as err:
        raise _load_error(path, "model", is_local, err) from err
    except (RuntimeError, NotImplementedError) as err:
        if quantization is None:
            raise
        raise TunesmithError(
            f"bitsandbytes could not load {path} in {quantization.bits}-bit on {device.type}: {err}. Its CPU "
            "backend needs bitsandbytes >= 0.46 (pip install -U bitsandbytes); without it, remove "
            "quantization_bit and train LoRA on the full-precision base.") from err
    if attn_implementation is None and model.config._attn_implementation == "sdpa":
        use_varlen_attention(model)
    if quantization is not None:
        quantize.prepare(model)
        return model  # already on `device` (device_map); bitsandbytes weights do not move with .to()
    if device.type == "cpu":
        use_fast_linears(model)
    return model.to(device)


def use_varlen_attention(model: PreTrainedModel) -> None:
    """sdpa that also runs packed batches per sample (see model/attention.py); plain sdpa where refused."""
    try:
        model.set_attn_implementation(VARLEN_SDPA)
    except (ValueError, ImportError):  # a model class that only accepts the attention names it knows
        pass


MIN_VOCAB = 16  # fewer tokens than this is no real tokenizer (even byte-level ones have 256)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from `path` (or a GGUF file's converted folder), with a pad token guaranteed;
    padding side left as saved."""
    path = local_model_source(str(path))
    is_local = _check_local_folder(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(path).expanduser()) if is_local else path, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _load_error(path, "tokenizer", is_local, err) from err
    if len(tokenizer) < MIN_VOCAB:  # transformers builds an all-but-empty tokenizer when the files are missing
        raise TunesmithError(
            f"{path} has no usable tokenizer ({len(tokenizer)} tokens): it needs tokenizer.json, or "
            "vocab.json + merges.txt, or tokenizer.model, with tokenizer_config.json. Copy the tokenizer "
            "files from the base model into this folder.")
    _ensure_pad_token(tokenizer)
    return tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and token != tokenizer.eos_token:
            tokenizer.pad_token = token
            return
    fallback = tokenizer.unk_token or tokenizer.eos_token
    if fallback is None:
        raise TunesmithError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no pad, unk or eos token to pad with. "
            "Set pad_token in its tokenizer_config.json to a token of its vocabulary."
        )
    tokenizer.pad_token = fallback


def _looks_local(path: str) -> bool:
    """True for what cannot be a hub id (absolute, ./, ~) or a path whose parent folder exists here."""
    candidate = Path(path).expanduser()
    return candidate.is_absolute() or path.startswith((".", "~")) or (
        len(candidate.parts) > 1 and candidate.parent.is_dir()
    )


def _check_local_folder(path: str, what: str) -> bool:
    """Whether `path` is a local folder; raises for local-looking paths that are not one."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return True
    if folder.exists():
        raise TunesmithError(f"The {what} path {path!r} is a file; point it to the folder that holds it.")
    if _looks_local(path):
        raise TunesmithError(
            f"The {what} folder {path!r} was not found. Check model_name_or_path (relative paths start "
            "from the current directory), or build a random-init model folder with init_model."
        )
    return False


def _check_safetensors(folder: Path) -> None:
    if (folder / "sharded").is_dir() and not (folder / "config.json").exists():
        raise TunesmithError(
            f"{str(folder)!r} is a checkpoint of a sharded (fsdp) run: it holds each rank's shards of the weights "
            "and optimizer, for `resume_from_checkpoint`, not a model folder. Use the run's output_dir once "
            "training has finished (resume to finish it)."
        )
    if not (folder / "config.json").exists():
        raise TunesmithError(
            f"The model folder {str(folder)!r} has no config.json. Point model_name_or_path to a folder "
            "saved with save_pretrained (config.json + model.safetensors)."
        )
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise TunesmithError(
            f"The model folder {str(folder)!r} has only pickle weights ({', '.join(pickles)}) and no "
            "*.safetensors. tunesmith never unpickles weights, since unpickling can run arbitrary code. "
            "Convert them once in a trusted environment (load, then save_pretrained(..., safe_serialization=True))."
        )
    raise TunesmithError(f"The model folder {str(folder)!r} has no *.safetensors weights file.")


def _load_error(path: str, what: str, is_local: bool, err: OSError) -> TunesmithError:
    if is_local:
        return TunesmithError(f"Could not read the {what} folder {path!r}: {err}")
    return TunesmithError(
        f"{path!r} is not a local {what} folder, and the Hugging Face hub is unreachable or has no such "
        f"repo ({err.__class__.__name__}). Download the {what} into a folder and point to that folder, "
        "or check the spelling of the path."
    )
