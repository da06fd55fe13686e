"""Model shapes for `tunesmith init-model`, in their own module so the CLI can list them without importing torch."""

# Shapes by name. `vocab_size` is a floor: the model's embedding is max(vocab_size, len(tokenizer)).
# tiny and small use a wider init than transformers' 0.02: a frozen random output head that small can
# only produce near-uniform predictions, so LoRA alone could never fit anything; a pretrained head is
# large, and this stands in for it. The benchmark shapes keep 0.02.
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=2048, tie_word_embeddings=False, max_position_embeddings=2048, initializer_range=0.3),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=2048, initializer_range=0.15),
    "40m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
}
