"""The built-in demos and their synthetic data, on the top layer beside the CLI.

sft_demo.py (`tunesmith demo`: LoRA SFT of a tiny offline model, before/after), rlhf_demo.py
(`tunesmith demo-rlhf`: SFT -> reward model -> PPO, plus GRPO and DPO, held-out scores) and
real_demo.py (`tunesmith demo-real`: LoRA SFT of the real SmolLM2-135M-Instruct from its GGUF, a new
identity and what it keeps), real_align.py (`demo-real --align`: DPO, GRPO and PPO on a rule-checked
behaviour of the same model), commands.py (their CLI subcommands) and synthetic.py (generated records:
the demos' data, also used by tests, benchmarks and examples).
"""
