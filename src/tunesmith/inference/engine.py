"""A trained model ready to answer: what `tunesmith chat`, `tunesmith api` and `do_predict` share.

The base model (model_name_or_path) with every adapter in adapter_name_or_path merged into its weights
(one matmul per layer while decoding), in eval mode, with its tokenizer, chat template, the config's
system prompt and generation settings. When the last adapter (or the model itself) is a `stage: rm`
output, its value head comes along and `score` rates conversations; the same weights still chat.
With `served_adapters` (api) the base stays unmerged and the default's adapters are one switchable
adapter set beside it (served_models.py, model/adapter_sets.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import ModelArgs, RunConfig, SamplingSettings
from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.model.adapter_sets import add_adapter_set, select_adapter_set
from tunesmith.model.adapters import apply_adapters, merge_adapters
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.quantize import Quantization
from tunesmith.model.reward_model import RewardModel
from tunesmith.model.value_head import VALUE_HEAD_FILE
from tunesmith.sampling.generate import Generation
from tunesmith.sampling.rows import RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler

ROLES = ("system", "user", "assistant")
DEFAULT_SET = ""  # the default model's adapter set (served adapter names are never empty)


def inference_dtype(infer_dtype: str, device: torch.device) -> torch.dtype:
    """`infer_dtype` resolved: auto is bfloat16 on a GPU that supports it, else float32 (CPU bf16 is
    only fast with AVX512-BF16/AMX, and fp32 is exact)."""
    if infer_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, infer_dtype)


@dataclass
class Engine:
    """A model ready to answer: weights with adapters merged, tokenizer, template, and the run's serving settings."""

    model: torch.nn.Module
    tokenizer: object
    template: object
    sampling: SamplingSettings
    """The config's generation keys: every answer's defaults."""
    cutoff_len: int
    """Prompt plus answer must fit in this many tokens."""
    default_system: str | None = None
    reward_model: RewardModel | None = None
    """Set when the model is a reward model: `score` uses its value head."""
    scheduler: DecodeScheduler | None = None
    """The one decode loop every answer runs on (shared by copies of this engine with other templates)."""

    def __post_init__(self) -> None:
        if self.scheduler is None:
            self.scheduler = DecodeScheduler(self.model)

    @classmethod
    def load(cls, config: RunConfig) -> Engine:
        """The engine for the model, template and generation keys `config` names (and `use_cpu`)."""
        device = torch.device("cuda" if torch.cuda.is_available() and not config.train.use_cpu else "cpu")
        dtype = inference_dtype(config.inference.infer_dtype, device)
        model, tokenizer, reward_model = _load_weights(config.model, config.data.template, dtype, device,
                                                       config.train.use_cpu)
        model.eval()
        inference = config.inference
        scheduler = DecodeScheduler(model, inference.max_num_seqs, inference.max_cached_tokens,
                                    inference.max_num_batched_tokens, keep_finished=True)  # weights fixed from here
        return cls(model, tokenizer, get_template(config.data.template, tokenizer), config.sampling,
                   config.data.cutoff_len, config.data.default_system, reward_model, scheduler)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: the template's end-of-turn markers and EOS."""
        return self.template.stop_token_ids(self.tokenizer)

    def with_system(self, messages: list[dict]) -> list[dict]:
        """`messages` checked, with the config's `default_system` in front when they have no system turn."""
        check_messages(messages)
        if self.default_system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}, *messages]
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation so far plus the assistant's turn opening: what to continue."""
        check_messages(messages)
        if messages[-1]["role"] != "user":
            raise TunesmithError("the conversation must end with a user message for the model to answer it.")
        return self.template.encode_prompt(self.tokenizer, messages, self.default_system)

    def generate(self, conversations: list[list[dict]], settings: SamplingSettings, num_samples: int = 1,
                 seed: int | None = None, **row_options: object) -> Generation:
        """Answer each conversation (`num_samples` times); see `submit` for the options."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        return self.continue_ids(prompts, settings, num_samples, seed, **row_options)

    def continue_ids(self, prompts: list[list[int]], settings: SamplingSettings, num_samples: int = 1,
                     seed: int | None = None, cancelled: threading.Event | None = None,
                     **row_options: object) -> Generation:
        """Continue token ids as they are (no template: /v1/completions), waiting for the answers (decoded on
        this thread unless the loop runs on another: `DecodeScheduler.run_here`); an interrupt (Ctrl-C in
        chat) or `cancelled` ends them."""
        requests = self.requests(prompts, settings, num_samples, seed, **row_options)
        return self.scheduler.run_here([requests], cancelled=cancelled)[0].result()

    def requests(self, prompts: list[list[int]], settings: SamplingSettings, num_samples: int = 1,
                 seed: int | None = None, adapter: str | None = None,
                 on_token: Callable[[int, int], bool | None] | None = None,
                 on_logits: Callable[[int, torch.Tensor, int], None] | None = None,
                 on_prompt: Callable[[int, torch.Tensor, int], None] | None = None) -> list[RowRequest]:
        """The rows of `num_samples` answers per prompt (prompt-major). Row i samples from its own generator
        seeded `seed + i` (None: unseeded) and runs `adapter` (a served adapter set; None: the weights as
        loaded). The callbacks get the row index first, then what `RowRequest`'s get."""
        device = next(self.model.parameters()).device
        requests = []
        for index, prompt in enumerate(row for row in prompts for _ in range(num_samples)):
            generator = None if seed is None else torch.Generator(device).manual_seed((seed + index) % 2**64)
            requests.append(RowRequest(
                prompt, settings, self.stop_ids, generator, adapter,
                on_token=None if on_token is None else functools.partial(on_token, index),
                on_logits=None if on_logits is None else functools.partial(on_logits, index),
                on_prompt=None if on_prompt is None else functools.partial(on_prompt, index)))
        return requests

    def decode(self, ids: list[int]) -> str:
        """Response text without the stop token and other special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, conversations: list[list[dict]]) -> list[float]:
        """The reward model's score of each conversation (its last turn is the answer being rated)."""
        if self.reward_model is None:
            raise TunesmithError("this model is not a reward model: point the config at a `stage: rm` output "
                                 "(its folder holds value_head.safetensors) to score conversations.")
        conversations = [self.with_system(messages) for messages in conversations]
        return self.scheduler.call(lambda: self.reward_model.score(conversations))


class TextStream:
    """Turns tokens into text pieces as they arrive. A piece is only released once it decodes to whole
    characters: a multi-byte character split across tokens would otherwise print as U+FFFD."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ids: list[int] = []
        self.sent = 0  # characters already released

    def push(self, token: int) -> str:
        """Add a token; return the text it completes ("" while a character is still split)."""
        self.ids.append(token)
        text = self.engine.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


def check_messages(messages: list[dict]) -> None:
    """A clear error for anything but a list of {role, content} turns with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise TunesmithError("`messages` must be a non-empty list of {\"role\", \"content\"} objects.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise TunesmithError(f"messages[{index}] needs a `role` among {', '.join(ROLES)}, got "
                                 f"{message.get('role') if isinstance(message, dict) else message!r}.")
        if not isinstance(message.get("content"), str):
            raise TunesmithError(f"messages[{index}].content must be a string.")
        if not message["content"].isascii():
            try:
                message["content"].encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate (\ud800): JSON allows it, a tokenizer does not
                raise TunesmithError(f"messages[{index}].content is not valid Unicode text (character "
                                     f"{err.start}).") from None


def _load_weights(model_args: ModelArgs, template: str | None, dtype: torch.dtype, device: torch.device,
                  use_cpu: bool) -> tuple[torch.nn.Module, object, RewardModel | None]:
    """(model, tokenizer, reward model or None): a `stage: rm` output loads as a reward model."""
    adapters = model_args.adapter_name_or_path or []
    reward_folder = trained_folder(model_args)
    if (reward_folder / VALUE_HEAD_FILE).is_file():
        # the reward model's own record says which adapters sit under it; the base may have moved
        base = model_args.model_name_or_path if adapters else None
        reward_model = RewardModel.load(reward_folder, base_model=base, template=template, dtype=dtype,
                                        trust_remote_code=model_args.trust_remote_code, use_cpu=use_cpu)
        return reward_model.model, reward_model.tokenizer, reward_model
    quantization = Quantization.from_args(model_args)
    model = load_model(model_args.model_name_or_path, dtype, device, trust_remote_code=model_args.trust_remote_code,
                       quantization=quantization)
    if model_args.served_adapters:  # the base stays unmerged; the default is one adapter set (served_models.py)
        add_adapter_set(model, DEFAULT_SET, adapters)
        select_adapter_set(model, DEFAULT_SET)
    elif quantization is not None and adapters:  # a 4/8-bit base takes no merge: the adapter runs beside it
        apply_adapters(model, adapters, trainable_last=False)
    else:
        merge_adapters(model, adapters)
    tokenizer = load_tokenizer(tokenizer_folder(model_args), trust_remote_code=model_args.trust_remote_code)
    return model, tokenizer, None


def trained_folder(model_args: ModelArgs) -> Path:
    """What was trained last: the last adapter, or the model itself. Its tokenizer, recorded settings
    and value head (a `stage: rm` output) describe the model being served or exported."""
    adapters = model_args.adapter_name_or_path
    return Path(adapters[-1] if adapters else model_args.model_name_or_path).expanduser()


def tokenizer_folder(model_args: ModelArgs) -> str:
    """The trained folder when training saved a tokenizer there (it always does), else the base model's."""
    folder = trained_folder(model_args)
    return str(folder) if (folder / "tokenizer_config.json").is_file() else model_args.model_name_or_path
