"""`tunesmith env`: what a bug report needs — versions, device, dtype support, threads."""

from __future__ import annotations

import os
import platform

import torch

import tunesmith


def environment_report() -> str:
    """A Markdown list of versions, device, bf16 support and threads, to paste into a bug report."""
    import safetensors
    import tokenizers
    import transformers

    lines = {
        "tunesmith": tunesmith.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "peft": _version_of("peft"),
        "device": _device(),
        "fast bf16": _fast_bf16(),
        "torch threads": str(torch.get_num_threads()),
        "cpu count": str(os.cpu_count()),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
    }
    return "\n".join(f"- {key}: {value}" for key, value in lines.items())


def _fast_bf16() -> str:
    """Whether bf16: true will compute in bf16 here (see model.loading.resolve_device_and_dtype)."""
    from tunesmith.model.loading import cpu_has_fast_bf16

    if torch.cuda.is_available():
        return str(torch.cuda.is_bf16_supported())
    return "yes (CPU has AVX512-BF16/AMX)" if cpu_has_fast_bf16() else "no (CPU lacks AVX512-BF16/AMX: bf16 falls back to fp32)"


def _device() -> str:
    """The device training would use, with GPU names and the CUDA version."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({torch.cuda.device_count()}: {', '.join(names)}; CUDA {torch.version.cuda})"
    return "cpu"


def _version_of(package: str) -> str:
    """An optional package's installed version, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
