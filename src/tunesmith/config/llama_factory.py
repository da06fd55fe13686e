"""LLaMA-Factory keys that tunesmith reads differently: ignored with a notice, or refused with what to do."""

from __future__ import annotations

import difflib

# Keys that have no meaning in tunesmith (multi-process data loading, caches, DeepSpeed plumbing, vision
# towers...). A config that sets them still runs; each gets a one-line notice.
IGNORED_KEYS = {
    "preprocessing_num_workers", "dataloader_num_workers", "save_only_model",
    "overwrite_cache", "flash_attn", "ddp_find_unused_parameters", "include_num_input_tokens_seen",
    "tokenized_path", "preprocessing_batch_size", "dataloader_pin_memory",
    "freeze_vision_tower", "freeze_multi_modal_projector", "image_max_pixels", "video_max_pixels",
    "enable_thinking", "streaming", "buffer_size", "mix_strategy", "disable_gradient_checkpointing",
    "upcast_layernorm", "upcast_lmhead_output", "use_fast_tokenizer", "low_cpu_mem_usage",
    "cache_dir", "hf_hub_token", "ms_hub_token", "logging_dir", "save_strategy",
    "save_safetensors", "optim", "pure_bf16", "plot_loss_keys", "print_param_status", "export_device",
}

# Keys for features tunesmith does differently: the error says what to do instead.
ALTERNATIVES = {
    "ref_model": "the DPO reference is always the model the run starts from: model_name_or_path with every "
                 "adapter in adapter_name_or_path merged (put an SFT adapter there to make it the reference).",
    "ref_model_adapters": "the reference is always model_name_or_path with adapter_name_or_path merged.",
    "reward_model_adapters": "point `reward_model` at the output folder of a `stage: rm` run; its train_config.yaml "
                             "says which base and adapters it was trained on.",
    "reward_model_quantization_bit": "a LoRA reward model on the policy's base shares its quantized base "
                                     "(quantization_bit); a separate reward model loads in full precision.",
    "ref_model_quantization_bit": "the reference is the policy's own base with the adapter off, so it shares "
                                  "the base's quantization_bit.",
    "export_quantization_bit": "export writes full-precision weights, or GGUF with `export_format: gguf` and "
                               "`export_gguf_type: q8_0` for an 8-bit file.",
    "export_quantization_dataset": "export does not calibrate (GPTQ); use `export_format: gguf` with "
                                   "`export_gguf_type: q8_0` for an 8-bit file.",
    "export_hub_model_id": "push the export_dir folder yourself (e.g. `huggingface-cli upload`); tunesmith never uploads.",
}


def unknown_key_message(key: str, source: str, known: list[str]) -> str:
    """The error for a key tunesmith does not read: what to do instead, or the closest valid key."""
    if key in ALTERNATIVES:
        return f"{source}: `{key}` is not supported: {ALTERNATIVES[key]}"
    close = difflib.get_close_matches(key, known + sorted(IGNORED_KEYS), n=1, cutoff=0.6)
    hint = (f" Did you mean `{close[0]}`?" if close
            else " Run `tunesmith train --help` (or see the config reference in README.md) for valid keys.")
    return f"{source}: unknown key `{key}`.{hint}"
