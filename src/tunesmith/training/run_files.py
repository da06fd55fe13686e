"""The files of a run folder, by name: what training writes there and what watchers (the board) read.

trainer_log.jsonl is training/tracking.py's LOG_FILE; checkpoints are training/checkpoint.py's.
"""

CONFIG_FILE = "train_config.yaml"
"""The resolved config of the run, as `tunesmith train` reads it back."""
RESULTS_FILE = "all_results.json"
"""The final metrics."""
STATUS_FILE = "run_status.json"
"""running / finished / failed / stopped, with a heartbeat time (training/heartbeat.py)."""
CONSOLE_FILE = "running_log.txt"
"""The lines the run printed (LLaMA-Factory's name for the same file)."""
