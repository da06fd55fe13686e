"""The built-in demos and their synthetic data, on the top layer beside the CLI.

sft_demo.py (`tunesmith demo`: LoRA SFT of a tiny offline model, before/after), rlhf_demo.py
(`tunesmith demo-rlhf`: SFT -> reward model -> PPO, plus GRPO and DPO, held-out scores) and
synthetic.py (generated records: the demos' data, also used by tests, benchmarks and examples).
"""
