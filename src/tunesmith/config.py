"""The run configuration: one flat dataclass with LLaMA-Factory's key names, validated once at load.

`load_config(path, overrides)` reads a YAML file, applies `key=value` overrides from the command line,
checks every key (unknown keys are errors with a "did you mean"; keys LLaMA-Factory has but that mean
nothing here get a one-line notice), converts types, and rejects impossible combinations before any
work starts. Flat, not nested, so that a LLaMA-Factory user's YAML runs unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.errors import TunesmithError

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
KL_ESTIMATORS = ("k1", "k3")
RL_STAGES = ("ppo", "grpo")
REWARD_MODEL_TYPES = ("lora", "full", "api")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
FINETUNING_TYPES = ("lora", "full", "freeze")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "tensorboard")
EVAL_STRATEGIES = ("no", "steps", "epoch")
INFER_DTYPES = ("auto", "float32", "bfloat16", "float16")
INFER_BACKENDS = ("huggingface",)
# What each `tunesmith` command needs from the same YAML: train needs data, export a destination.
COMMANDS = ("train", "chat", "export", "api")

# LLaMA-Factory keys that have no meaning in tunesmith (multi-process data loading, caches, DeepSpeed
# plumbing, vision towers...). A config that sets them still runs; each gets a one-line notice.
IGNORED_KEYS = {
    "preprocessing_num_workers", "dataloader_num_workers", "ddp_timeout", "save_only_model",
    "overwrite_cache", "flash_attn", "ddp_find_unused_parameters", "include_num_input_tokens_seen",
    "deepspeed", "tokenized_path", "preprocessing_batch_size", "dataloader_pin_memory",
    "freeze_vision_tower", "freeze_multi_modal_projector", "image_max_pixels", "video_max_pixels",
    "enable_thinking", "streaming", "buffer_size", "mix_strategy", "disable_gradient_checkpointing",
    "upcast_layernorm", "upcast_lmhead_output", "use_fast_tokenizer", "low_cpu_mem_usage",
    "cache_dir", "hf_hub_token", "ms_hub_token", "run_name", "logging_dir", "save_strategy",
    "save_safetensors", "optim", "pure_bf16", "plot_loss_keys", "print_param_status", "export_device",
}


@dataclass
class TrainConfig:
    """Everything one `tunesmith train` run needs; field names follow LLaMA-Factory's YAML keys."""

    # --- model ---
    model_name_or_path: str = ""
    """Hugging Face model folder or hub id (hub ids need network access)."""
    adapter_name_or_path: list[str] | None = None
    """Comma list of PEFT LoRA adapters. sft: all but the last are merged, the last resumes training.
    rm/dpo/ppo/grpo: all are merged (for dpo/ppo/grpo that merged model is the reference) and a fresh adapter is trained."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model folder to run. Off unless you trust the source."""

    # --- method ---
    stage: str = "sft"
    """Training stage: sft (supervised), rm (reward model), dpo (direct preference optimisation), ppo or grpo."""
    do_train: bool = True
    """Train (LLaMA-Factory compatibility); `do_train: false` with `do_predict: true` only predicts."""
    do_eval: bool = False
    """Require an eval split; with one, the loss on it is computed at the end of training (and per eval_strategy)."""
    do_predict: bool = False
    """Generate answers to eval_dataset's prompts: generated_predictions.jsonl and BLEU-4/ROUGE in output_dir."""
    predict_with_generate: bool = True
    """LLaMA-Factory's switch for do_predict; tunesmith's predictions are always generated, so it must stay true."""
    finetuning_type: str = "lora"
    """lora (train low-rank adapters), full (every weight) or freeze (only the last layers)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int | None = None
    """LoRA alpha; the update is scaled by alpha / r. Default: 2 * lora_rank (LLaMA-Factory's default)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path only (the frozen base path never sees it)."""
    lora_target: list[str] | None = None
    """Modules to adapt: `all` (every Linear but the output head) or a comma list such as q_proj,v_proj."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N decoder layers (negative: the first -N)."""
    freeze_trainable_modules: list[str] | None = None
    """freeze: module names inside the trainable layers to train (`all` or e.g. mlp,self_attn)."""

    # --- preference stages (rm, dpo) ---
    pref_beta: float = 0.1
    """dpo: beta, how strongly the policy is held to the reference (the implicit reward's scale)."""
    pref_loss: str = "sigmoid"
    """dpo: sigmoid (DPO), ipo, hinge, simpo or orpo (simpo and orpo need no reference model)."""
    pref_ftx: float = 0.0
    """dpo: weight of an SFT term (mean NLL of the chosen answer) added to the preference loss."""
    dpo_label_smoothing: float = 0.0
    """dpo with pref_loss sigmoid: conservative DPO, the assumed chance that a pair's label is flipped, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """dpo with pref_loss simpo: the target reward margin gamma."""
    precompute_ref_logprobs: bool = False
    """dpo: compute the reference log-probs once before training, so no reference forward runs during it."""

    # --- reinforcement learning (ppo, grpo) ---
    reward_model: str | None = None
    """ppo/grpo: a `stage: rm` output folder (LoRA adapter or full model), or an http(s) URL that scores conversations."""
    reward_model_type: str | None = None
    """lora, full or api; read from reward_model when unset (LLaMA-Factory's key)."""
    reward_function: str | None = None
    """ppo/grpo: `module:function` or `path/to/file.py:function` giving one reward per completion (instead of reward_model)."""
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
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    ppo_buffer_size: int = 1
    """Rollouts per PPO step, in optimizer mini-batches (per_device_train_batch_size x gradient_accumulation_steps prompts each)."""
    ppo_clip: float = 0.2
    """Clip range eps of the policy ratio."""
    ppo_value_clip: float = 0.2
    """Clip range of the value update (ppo)."""
    ppo_vf_coef: float = 0.1
    """ppo: weight c1 of the value loss."""
    ppo_ent_coef: float = 0.0
    """Weight c2 of the entropy bonus."""
    ppo_gamma: float = 1.0
    """ppo: discount gamma of GAE."""
    ppo_lambda: float = 0.95
    """ppo: GAE lambda."""
    ppo_kl_coef: float | None = None
    """Weight beta of the KL to the reference (initial value when adaptive). Default: 0.05 for ppo, 0.04 for grpo."""
    ppo_kl_estimator: str = "k1"
    """ppo: per-token KL estimator in the reward, k1 (log ratio) or k3 (grpo always uses k3 in its loss)."""
    ppo_target: float | None = None
    """ppo: target KL (nats per sequence) of the adaptive KL controller; unset keeps ppo_kl_coef fixed."""
    ppo_kl_horizon: int = 10000
    """ppo: horizon of the adaptive KL controller."""
    ppo_score_norm: bool = False
    """Normalise scores by their running mean and std."""
    ppo_score_clip: float | None = None
    """Clip (normalised) scores to [-clip, clip]."""
    ppo_whiten_rewards: bool = False
    """ppo: whiten the per-token rewards before GAE."""
    ppo_missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that never produced its end-of-turn token."""
    num_generations: int = 4
    """grpo: answers sampled per prompt (the group size G)."""
    grpo_scale_rewards: bool = True
    """grpo: divide group-centred rewards by the group's std."""

    # --- data ---
    dataset: list[str] | None = None
    """Comma list of dataset names from dataset_info.json, or paths to json/jsonl/csv/parquet files."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files."""
    eval_dataset: list[str] | None = None
    """Comma list of datasets to evaluate on (instead of splitting off val_size)."""
    val_size: float = 0.0
    """Share (0-1) or number (>=1) of training samples held out for evaluation."""
    template: str | None = None
    """Chat template: the tokenizer's own when unset; or qwen/chatml, llama3, default, empty."""
    default_system: str | None = None
    """System prompt used when a conversation has none (chat, api, predict); unset: the template's own."""
    cutoff_len: int = 2048
    """Maximum tokens per sample (prompt + response); the response is kept preferentially."""
    max_samples: int | None = None
    """Use at most this many records from each dataset."""
    packing: bool = False
    """Pack several samples into each row of cutoff_len tokens; attention stays within each sample."""
    neat_packing: bool = False
    """LLaMA-Factory's name for packing without cross-attention; tunesmith's packing always is."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (by default only responses are learned)."""
    mask_history: bool = False
    """In multi-turn dialogues, train only the last assistant turn."""
    skip_bad_records: bool = False
    """Skip malformed records (reporting how many) instead of stopping at the first one."""

    # --- output ---
    output_dir: str = "saves/run"
    """Where checkpoints, the final adapter/model, logs and plots go."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir."""
    logging_steps: int = 10
    """Log loss, learning rate and throughput every N optimizer steps."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    plot_loss: bool = False
    """Write training_loss.png (and training_eval_loss.png) into output_dir."""
    report_to: str = "none"
    """none or tensorboard (needs the tensorboard package)."""

    # --- train ---
    per_device_train_batch_size: int = 1
    """Samples (or packed rows) per micro-batch."""
    per_device_eval_batch_size: int = 1
    """Samples per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides num_train_epochs when > 0)."""
    lr_scheduler_type: str = "linear"
    """linear, cosine, constant or constant_with_warmup."""
    warmup_ratio: float = 0.0
    """Share of the total steps spent warming the learning rate up from 0."""
    warmup_steps: int = 0
    """Warm-up steps (overrides warmup_ratio when > 0)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    seed: int = 42
    """Seed for data order, dropout and initialisation."""
    bf16: bool = False
    """Compute in bfloat16 (CUDA with bf16 support, or CPU)."""
    fp16: bool = False
    """Compute in float16 (CUDA only)."""
    gradient_checkpointing: bool = False
    """Memory-saving mode: recompute activations in backward (~30% more compute), return freed memory to the OS."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk when projecting hidden states through lm_head (bounds logits memory)."""
    eval_strategy: str = "no"
    """When to evaluate during training: no, steps or epoch."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps when eval_strategy is steps (default: logging_steps)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to continue from, or `true` for the latest in output_dir."""

    # --- chat, export, api ---
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
    host: str | None = None
    """api: address to listen on (default: the API_HOST environment variable, else 0.0.0.0)."""
    port: int | None = None
    """api: port to listen on (default: the API_PORT environment variable, else 8000)."""


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPE_HINTS = typing.get_type_hints(TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] = (), notices: list[str] | None = None,
                command: str = "train") -> TrainConfig:
    """Read `path` (YAML), apply `key=value` overrides, validate for `command`; notices about ignored keys are appended."""
    raw, where = _read_yaml(Path(path)) if path else ({}, {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TunesmithError(f"Override {item!r} is not of the form key=value (e.g. learning_rate=1e-4).")
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else None
        where[key.strip()] = f"command-line override `{item}`"
    return build_config(raw, str(path) if path else "command line", notices, where, command)


def build_config(raw: dict, source: str = "config", notices: list[str] | None = None,
                 where: dict[str, str] | None = None, command: str = "train") -> TrainConfig:
    """Validate a plain dict of settings into a TrainConfig; `where` maps keys to "file, line N"."""
    where = where or {}
    values = {}
    for key, value in raw.items():
        origin = where.get(key, source)
        if key in IGNORED_KEYS:
            if notices is not None:
                notices.append(f"notice: {origin}: `{key}` has no meaning in tunesmith and is ignored.")
            continue
        if key not in FIELDS:
            raise TunesmithError(_unknown_key_message(key, origin))
        values[key] = _convert(key, value, origin)
    config = TrainConfig(**values)
    _apply_defaults(config)
    _check_combinations(config, source, command)
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """The mapping in `path`, and for each key where it stands ("cfg.yaml, line 7") for error messages."""
    if not path.is_file():
        raise TunesmithError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TunesmithError(f"Config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise TunesmithError(f"Config file {path} must be a mapping of key: value lines, not a {type(data).__name__}.")
    where = {key.value: f"{path}, line {key.start_mark.line + 1}" for key, _ in node.value}
    return data, where


# LLaMA-Factory keys for features tunesmith does differently: the error says what to do instead.
ALTERNATIVES = {
    "ref_model": "the DPO reference is always the model the run starts from: model_name_or_path with every "
                 "adapter in adapter_name_or_path merged (put an SFT adapter there to make it the reference).",
    "ref_model_adapters": "the reference is always model_name_or_path with adapter_name_or_path merged.",
    "reward_model_adapters": "point `reward_model` at the output folder of a `stage: rm` run; its train_config.yaml "
                             "says which base and adapters it was trained on.",
    "reward_model_quantization_bit": "tunesmith does not quantize models.",
    "ref_model_quantization_bit": "tunesmith does not quantize models.",
    "export_quantization_bit": "tunesmith does not quantize models; export writes the merged weights as they are.",
    "export_quantization_dataset": "tunesmith does not quantize models.",
    "export_hub_model_id": "push the export_dir folder yourself (e.g. `huggingface-cli upload`); tunesmith never uploads.",
}


def _unknown_key_message(key: str, source: str) -> str:
    if key in ALTERNATIVES:
        return f"{source}: `{key}` is not supported: {ALTERNATIVES[key]}"
    close = difflib.get_close_matches(key, list(FIELDS) + sorted(IGNORED_KEYS), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else " See the config reference in README.md for valid keys."
    return f"{source}: unknown key `{key}`.{hint}"


def _convert(key: str, value, source: str):
    """Coerce a YAML value to the field's type; YAML 1.1 reads `1e-4` as a string, so numbers are parsed."""
    kind, optional = _field_kind(key)
    if value is None:
        if optional:
            return None
        raise TunesmithError(f"{source}: `{key}` needs a {kind.__name__} value, got nothing.")
    try:
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list) else None
            if items is None:
                raise ValueError
            return [str(item).strip() for item in items if str(item).strip()]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # accepts "1e-4", which YAML 1.1 leaves as text
            if not math.isfinite(number) or (kind is int and not number.is_integer()):
                raise ValueError
            return int(number) if kind is int else number
        if kind is str:
            if key == "resume_from_checkpoint" and isinstance(value, bool):
                return "true" if value else None
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        pass
    raise TunesmithError(f"{source}: `{key}` must be {_describe(kind)}, got {value!r}.")


def _describe(kind) -> str:
    return {list: "a comma list", bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def _field_kind(key: str) -> tuple[type, bool]:
    """(list | bool | int | float | str, whether None is allowed) for a field's annotation."""
    hint = TYPE_HINTS[key]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    return typing.get_origin(kinds[0]) or kinds[0], len(kinds) < len(args)


def _apply_defaults(config: TrainConfig) -> None:
    if config.lora_alpha is None:
        config.lora_alpha = 2 * config.lora_rank
    if config.lora_target is None:
        config.lora_target = ["all"]
    if config.freeze_trainable_modules is None:
        config.freeze_trainable_modules = ["all"]
    if config.neat_packing:
        config.packing = True
    if config.eval_steps is None:
        config.eval_steps = config.logging_steps
    if config.ppo_kl_coef is None:
        config.ppo_kl_coef = 0.04 if config.stage == "grpo" else 0.05
    if config.resume_from_checkpoint in ("false", "False", ""):
        config.resume_from_checkpoint = None


def _check_combinations(config: TrainConfig, source: str, command: str = "train") -> None:
    """Impossible settings stop here, before any model or data is loaded."""
    choices = {
        "stage": STAGES, "finetuning_type": FINETUNING_TYPES, "lr_scheduler_type": SCHEDULERS,
        "report_to": REPORT_TO, "eval_strategy": EVAL_STRATEGIES, "pref_loss": PREF_LOSSES,
        "ppo_kl_estimator": KL_ESTIMATORS, "infer_dtype": INFER_DTYPES, "infer_backend": INFER_BACKENDS,
    }
    if config.reward_model_type is not None:
        choices["reward_model_type"] = REWARD_MODEL_TYPES
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise TunesmithError(f"{source}: `{key}: {value}` is not supported; choose one of {', '.join(allowed)}.{hint}")
    problems = [
        (not config.model_name_or_path, "`model_name_or_path` is required (a model folder or hub id)."),
        (command == "train" and config.do_train and not config.dataset,
         "`dataset` is required (names from dataset_info.json or file paths)."),
        (command == "train" and not config.do_train and not config.do_predict,
         "`do_train: false` leaves `tunesmith train` nothing to do; remove it, or set `do_predict: true` with an `eval_dataset`."),
        (command == "train" and config.do_predict and not config.eval_dataset,
         "`do_predict: true` generates answers to `eval_dataset`'s prompts: set `eval_dataset`."),
        (config.do_predict and not config.predict_with_generate,
         "`predict_with_generate: false`: tunesmith's predictions are always generated; remove the key or set it to true."),
        (command == "export" and not config.export_dir, "`export_dir` is required: the folder to write the merged model to."),
        (config.export_size <= 0, f"`export_size` (GB per shard) must be positive, got {config.export_size}."),
        (config.export_legacy_format, "`export_legacy_format: true` asks for .bin weights; tunesmith writes safetensors only, so remove it."),
        (config.repetition_penalty <= 0, f"`repetition_penalty` must be positive (1: off), got {config.repetition_penalty}."),
        (config.stage in RL_STAGES and command == "train" and config.repetition_penalty != 1,
         f"stage {config.stage} needs `repetition_penalty: 1`: a penalised sampler is not the policy whose log-probs are trained."),
        (config.port is not None and not 0 < config.port < 65536, f"`port` must be in 1-65535, got {config.port}."),
        (config.do_eval and config.val_size == 0 and not config.eval_dataset,
         "`do_eval: true` needs an eval split: set `val_size` (e.g. 0.1) or `eval_dataset`."),
        (config.eval_strategy != "no" and config.val_size == 0 and not config.eval_dataset,
         f"`eval_strategy: {config.eval_strategy}` needs an eval split: set `val_size` (e.g. 0.1) or `eval_dataset`."),
        (config.bf16 and config.fp16, "`bf16` and `fp16` are both true; choose one."),
        (config.lora_rank < 1, f"`lora_rank` must be at least 1, got {config.lora_rank}."),
        (not 0 <= config.lora_dropout < 1, f"`lora_dropout` must be in [0, 1), got {config.lora_dropout}."),
        (config.cutoff_len < 2, f"`cutoff_len` must be at least 2, got {config.cutoff_len}."),
        (config.per_device_train_batch_size < 1, "`per_device_train_batch_size` must be at least 1."),
        (config.gradient_accumulation_steps < 1, "`gradient_accumulation_steps` must be at least 1."),
        (config.learning_rate <= 0, f"`learning_rate` must be positive, got {config.learning_rate}."),
        (config.max_steps <= 0 and config.num_train_epochs <= 0, "set `max_steps` > 0 or `num_train_epochs` > 0."),
        (not 0 <= config.warmup_ratio < 1, f"`warmup_ratio` must be in [0, 1), got {config.warmup_ratio}."),
        (config.val_size < 0, f"`val_size` must not be negative, got {config.val_size}."),
        (config.val_size > 0 and config.eval_dataset is not None, "set either `val_size` or `eval_dataset`, not both."),
        (config.logging_steps < 1, "`logging_steps` must be at least 1."),
        (config.eval_steps < 1, "`eval_steps` must be at least 1."),
        (config.per_device_eval_batch_size < 1, "`per_device_eval_batch_size` must be at least 1."),
        (config.lora_alpha <= 0, f"`lora_alpha` must be positive, got {config.lora_alpha}."),
        (config.warmup_steps < 0, "`warmup_steps` must not be negative."),
        (config.max_grad_norm < 0, "`max_grad_norm` must not be negative (0 disables clipping)."),
        (config.weight_decay < 0, "`weight_decay` must not be negative."),
        (config.save_steps < 0, "`save_steps` must not be negative."),
        (config.save_total_limit is not None and config.save_total_limit < 1, "`save_total_limit` must be at least 1."),
        (config.logprob_chunk_size < 1, "`logprob_chunk_size` must be at least 1."),
        (config.pref_beta <= 0, f"`pref_beta` must be positive, got {config.pref_beta}."),
        (config.pref_ftx < 0, f"`pref_ftx` must not be negative, got {config.pref_ftx}."),
        (not 0 <= config.dpo_label_smoothing < 0.5,
         f"`dpo_label_smoothing` must be in [0, 0.5), got {config.dpo_label_smoothing}."),
        (config.dpo_label_smoothing > 0 and config.pref_loss != "sigmoid",
         f"`dpo_label_smoothing` applies to `pref_loss: sigmoid` only, not {config.pref_loss}."),
        (config.packing and config.stage != "sft",
         f"`packing` is for stage sft; stage {config.stage} always packs each batch's pairs into one row "
         "(no padding), so remove `packing`."),
        (config.stage in RL_STAGES and (config.reward_model is None) == (config.reward_function is None),
         f"stage {config.stage} needs exactly one of `reward_model` (a `stage: rm` output folder or an http URL) "
         "and `reward_function` (module:function)."),
        (config.stage not in RL_STAGES and (config.reward_model or config.reward_function) is not None,
         f"`reward_model` / `reward_function` are for stage ppo or grpo, not {config.stage}."),
        (config.stage in RL_STAGES and config.packing, f"`packing` is for stage sft, not {config.stage}."),
        (config.max_new_tokens < 1, "`max_new_tokens` must be at least 1."),
        (config.temperature < 0, f"`temperature` must not be negative, got {config.temperature}."),
        (config.stage in RL_STAGES and (not config.do_sample or config.temperature == 0),
         f"stage {config.stage} learns from sampled answers: set `do_sample: true` and a `temperature` above 0 "
         "(e.g. 1.0); greedy decoding would give every sample of a prompt the same answer."),
        (not 0 < config.top_p <= 1, f"`top_p` must be in (0, 1], got {config.top_p}."),
        (config.top_k < 0, "`top_k` must not be negative (0: no top-k filter)."),
        (config.ppo_epochs < 1, "`ppo_epochs` must be at least 1."),
        (config.ppo_buffer_size < 1, "`ppo_buffer_size` must be at least 1."),
        (config.ppo_clip <= 0 or config.ppo_value_clip <= 0, "`ppo_clip` and `ppo_value_clip` must be positive."),
        (config.ppo_kl_coef < 0, f"`ppo_kl_coef` must not be negative, got {config.ppo_kl_coef}."),
        (config.ppo_target is not None and config.ppo_target <= 0, "`ppo_target` (target KL) must be positive."),
        (not 0 <= config.ppo_gamma <= 1 or not 0 <= config.ppo_lambda <= 1, "`ppo_gamma` and `ppo_lambda` must be in [0, 1]."),
        (config.ppo_score_clip is not None and config.ppo_score_clip <= 0, "`ppo_score_clip` must be positive."),
        (config.stage == "grpo" and config.num_generations < 2,
         f"`num_generations` must be at least 2 for grpo (advantages compare answers within a group), got {config.num_generations}."),
        (config.stage in RL_STAGES and config.finetuning_type != "lora",
         f"stage {config.stage} trains a LoRA adapter (the reference is the model with it switched off); set `finetuning_type: lora`."),
        (config.finetuning_type != "lora" and bool(config.adapter_name_or_path),
         "`adapter_name_or_path` needs `finetuning_type: lora`; LoRA adapters cannot be loaded into a full or freeze run."),
    ]
    for failed, message in problems:
        if failed:
            raise TunesmithError(f"{source}: {message}")
