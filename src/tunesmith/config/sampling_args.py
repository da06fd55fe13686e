"""How answers are sampled (RL rollouts, chat, API, predict) and how trained models are served or exported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunesmith.config.schema import choice_message

INFER_DTYPES = ("auto", "float32", "bfloat16", "float16")
INFER_BACKENDS = ("huggingface",)
EXPORT_FORMATS = ("safetensors", "gguf")
EXPORT_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class SamplingSettings:
    """The generation keys: what the sampler (`tunesmith.sampling.generate`) takes, for RL and inference alike."""

    section: ClassVar[str] = "sampling"
    max_new_tokens: int = 128
    """Most tokens sampled per response."""
    temperature: float = 1.0
    """Sampling temperature; PPO's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0: all)."""
    do_sample: bool = True
    """Sample (true) or decode greedily (false)."""
    repetition_penalty: float = 1.0
    """chat/api/predict: divide positive logits (multiply negative ones) of tokens already in the context by this (1: off)."""

    @property
    def greedy(self) -> bool:
        """Whether every row takes its most likely token."""
        return not self.do_sample or self.temperature == 0

    def problems(self) -> list[tuple[str, str]]:
        """Settings no sampler can use."""
        checks = [
            ("max_new_tokens", self.max_new_tokens < 1, "`max_new_tokens` must be at least 1."),
            ("temperature", self.temperature < 0, f"`temperature` must not be negative, got {self.temperature}."),
            ("top_p", not 0 < self.top_p <= 1, f"`top_p` must be in (0, 1], got {self.top_p}."),
            ("top_k", self.top_k < 0, "`top_k` must not be negative (0: no top-k filter)."),
            ("repetition_penalty", self.repetition_penalty <= 0,
             f"`repetition_penalty` must be positive (1: off), got {self.repetition_penalty}."),
        ]
        return [(key, message) for key, failed, message in checks if failed]


@dataclass
class InferenceArgs:
    """chat, api and export: precision, destination, address."""

    section: ClassVar[str] = "inference"
    infer_dtype: str = "auto"
    """Weights dtype for chat/api/export: float32, bfloat16, float16, or auto (chat/api: bfloat16 on a GPU that supports it, else float32; export: the base model's own dtype)."""
    infer_backend: str = "huggingface"
    """Inference engine; tunesmith's own sampler on transformers models (`huggingface`) is the only one."""
    export_dir: str | None = None
    """export: folder for the merged Hugging Face model."""
    export_size: float = 5.0
    """export: largest safetensors shard, in GB."""
    export_legacy_format: bool = False
    """export: LLaMA-Factory's switch for .bin weights; tunesmith writes safetensors only, so it must stay false."""
    export_format: str = "safetensors"
    """export: `safetensors` (a Hugging Face folder) or `gguf` (one GGUF file for llama.cpp / Ollama, with its tokenizer, chat template and an Ollama Modelfile; llama and qwen2 architectures)."""
    export_gguf_type: str = "f16"
    """export with export_format gguf: the weights' type, f32, f16, bf16 or q8_0 (norms and biases stay f32)."""
    max_num_seqs: int = 16
    """chat/api/predict: most answers decoded together (vLLM's name); more requests wait for a free row."""
    max_num_batched_tokens: int = 512
    """chat/api/predict: most prompt tokens read per decode step, shared by the requests joining (longer prompts are read in chunks, so running answers keep streaming)."""
    max_cached_tokens: int = 32768
    """chat/api/predict: the KV cache's size in tokens, rows x the longest row's prompt + max_tokens; a request that does not fit waits (one alone always runs)."""
    host: str | None = None
    """api: address to listen on (default: the API_HOST environment variable, else 127.0.0.1: this machine only; 0.0.0.0 listens on every interface)."""
    port: int | None = None
    """api: port to listen on (default: the API_PORT environment variable, else 8000)."""

    def problems(self) -> list[tuple[str, str]]:
        """Choices and ranges of the serving keys."""
        checks = [
            ("infer_dtype", self.infer_dtype not in INFER_DTYPES, choice_message("infer_dtype", self.infer_dtype, INFER_DTYPES)),
            ("infer_backend", self.infer_backend not in INFER_BACKENDS,
             choice_message("infer_backend", self.infer_backend, INFER_BACKENDS)),
            ("export_size", self.export_size <= 0, f"`export_size` (GB per shard) must be positive, got {self.export_size}."),
            ("export_format", self.export_format not in EXPORT_FORMATS,
             choice_message("export_format", self.export_format, EXPORT_FORMATS)),
            ("export_gguf_type", self.export_gguf_type not in EXPORT_GGUF_TYPES,
             choice_message("export_gguf_type", self.export_gguf_type, EXPORT_GGUF_TYPES)),
            ("export_legacy_format", self.export_legacy_format,
             "`export_legacy_format: true` asks for .bin weights; tunesmith writes safetensors only, so remove it."),
            ("max_num_seqs", self.max_num_seqs < 1, f"`max_num_seqs` must be at least 1, got {self.max_num_seqs}."),
            ("max_num_batched_tokens", self.max_num_batched_tokens < 1,
             f"`max_num_batched_tokens` must be at least 1, got {self.max_num_batched_tokens}."),
            ("max_cached_tokens", self.max_cached_tokens < 1,
             f"`max_cached_tokens` must be at least 1, got {self.max_cached_tokens}."),
            ("port", self.port is not None and not 0 < self.port < 65536, f"`port` must be in 1-65535, got {self.port}."),
        ]
        return [(key, message) for key, failed, message in checks if failed]
