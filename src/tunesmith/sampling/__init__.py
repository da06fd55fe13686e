"""Sampling: the lean KV-cache decoder for Llama-family models (`cached_decoder`) and batched `generate`
(left-padded prompts, groups, top-k/top-p/repetition filters, per-token log-probs), shared by the RL
rollouts in `training` and by everything in `inference`; it sits above `model` and below both."""
