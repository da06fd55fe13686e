"""A GGUF file (llama.cpp, Ollama) as a model source: dequantized once into a cached Hugging Face folder.

`model_name_or_path` may name a `.gguf` file, or a folder holding exactly one and no config.json.
transformers' GGUF support (the `gguf` package) dequantizes the weights and rebuilds the tokenizer and
its chat template from the file's metadata; tunesmith saves the result as float32 safetensors under
`gguf_cache_root() / <first 16 hex digits of the file's sha256>`, so every later load (each rank, every
command) reads an ordinary model folder. The folder's `gguf_source.json` records the source file, its
hash and its tensor types. A quantized source is lossy: the float32 weights are exactly the file's
quantized values, not the original model's.

Usage:
    folder = local_model_source("SmolLM2-135M-Instruct.Q4_1.gguf")   # a folder path, converted once
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.model.atomic_files import follow_umask

SOURCE_RECORD = "gguf_source.json"
"""Written last into a converted folder: what it came from (its presence marks the folder complete)."""


def gguf_cache_root() -> Path:
    """$TUNESMITH_CACHE, else $XDG_CACHE_HOME/tunesmith, else ~/.cache/tunesmith."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tunesmith"


def gguf_file_of(path: str) -> Path | None:
    """The GGUF file `path` names (a .gguf file, or a folder whose only weights are one), else None."""
    candidate = Path(str(path)).expanduser()
    if candidate.suffix.lower() == ".gguf":
        if not candidate.is_file():
            raise TunesmithError(f"The GGUF file {path!r} was not found. Check model_name_or_path.")
        return candidate
    if not candidate.is_dir() or (candidate / "config.json").exists():
        return None
    found = sorted(candidate.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise TunesmithError(f"{path!r} holds several GGUF files ({names}); set model_name_or_path to the one to use.")
    return found[0] if found else None


def local_model_source(path: str, describe: bool = False) -> str:
    """`path` itself, or for a GGUF source the cached Hugging Face folder converted from it (converting it
    the first time). `describe`: print what precision the weights have (once per loaded model)."""
    gguf_file = gguf_file_of(path)
    if gguf_file is None:
        return str(path)
    digest = cached_digest(gguf_file)
    folder = gguf_cache_root() / "gguf" / digest[:16]
    if not (folder / SOURCE_RECORD).is_file():
        with _exclusive(folder.with_name(f".{folder.name}.lock")):  # one process converts; the others wait
            if not (folder / SOURCE_RECORD).is_file():
                convert(gguf_file, folder, digest)
    if describe:
        record = json.loads((folder / SOURCE_RECORD).read_text(encoding="utf-8"))
        _say(f"[tunesmith] {gguf_file.name}: {_describe(record['tensor_types'])} tensors, dequantized to float32 "
             f"(lossy: the quantized file's values, not the original model's); cached in {folder}")
    return str(folder)


def convert(gguf_file: Path, folder: Path, digest: str) -> None:
    """Dequantize `gguf_file` (whose sha256 is `digest`) into `folder` (config.json, float32 safetensors,
    tokenizer, SOURCE_RECORD)."""
    try:
        import gguf  # noqa: F401 - transformers needs it; checked here for a clear message
    except ImportError as err:
        raise TunesmithError(
            f"{gguf_file} is a GGUF file; reading it needs the `gguf` package: pip install 'tunesmith[gguf]' "
            "(or pip install gguf).") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"[tunesmith] converting {gguf_file} to a Hugging Face folder (once; cached in {folder})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways inside the reader
        raise TunesmithError(
            f"Could not read {gguf_file} through transformers' GGUF support: {err}. transformers reads the "
            "architectures it lists as GGUF-supported (llama, mistral, qwen2, qwen3, gemma, phi3, ...); for another one, "
            "use the model's Hugging Face folder instead.") from err
    # The weights are already plain float32 tensors; drop the GGUF marks so the folder saves and loads as
    # an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(gguf_file)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        record = {"source": str(gguf_file.resolve()), "sha256": digest, **gguf_facts(gguf_file),
                  "dtype": "float32", "note": "dequantized from the GGUF file: a quantized source is lossy"}
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        follow_umask(staging)
        staging.rename(folder)
    except OSError as err:
        raise TunesmithError(
            f"Could not write the converted model to {folder}: {getattr(err, 'strerror', None) or err}. float32 "
            "takes about 7x the size of a 4-bit GGUF; free space there, or point TUNESMITH_CACHE at a larger "
            "disk.") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed


@contextmanager
def _exclusive(lock_path: Path):
    """An exclusive lock on `lock_path` (flock, where the OS has it) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): the atomic rename still keeps the folder whole
            pass
        yield


def gguf_facts(gguf_file: Path) -> dict:
    """What the converted folder keeps of the file: how many tensors of each GGML type (Q4_1, F32, ...),
    and llama.cpp's pre-tokenizer name (for a GGUF export of the fine-tuned model)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    pre = reader.get_field("tokenizer.ggml.pre")
    return {"tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors).most_common()),
            "pre_tokenizer": str(pre.contents()) if pre is not None else None}


def cached_digest(path: Path) -> str:
    """`file_digest`, remembered per (path, size, mtime) in the cache, so a large file is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = gguf_cache_root() / "gguf" / "digests.json"
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict) or not isinstance(memo.get(key), str):
        memo = memo if isinstance(memo, dict) else {}
        memo[key] = file_digest(path)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".digests.json.tmp-", dir=memo_file.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    return memo[key]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank converts or reads; one says so
        print(text, file=sys.stderr, flush=True)


def _describe(tensor_types: dict[str, int]) -> str:
    """'Q4_1 (211 tensors) + F32 (61)': the quantized types first."""
    return " + ".join(f"{name} ({count})" for name, count in tensor_types.items())
