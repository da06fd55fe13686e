"""The run configuration: LLaMA-Factory's flat keys outside, typed sections inside.

Users write one flat YAML (`learning_rate: 1e-4`, `pref_beta: 0.1`), as in LLaMA-Factory. Each key
belongs to exactly one section (model, adapter, data, train, output, sampling, inference, or the
stage's own, `config.method`), and each consumer is handed only the section it uses: a loss gets
`config.method.pref_beta`, the sampler `config.sampling`. `parse_run_config` is the mechanics; which
section a stage owns is the stage registry's business (training/configure.py passes it in).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import yaml

from tunesmith.config import schema
from tunesmith.config.data_args import DataArgs
from tunesmith.config.distributed_args import DistributedArgs
from tunesmith.config.llama_factory import IGNORED_KEYS, unknown_key_message
from tunesmith.config.model_args import AdapterArgs, ModelArgs
from tunesmith.config.optim_args import OptimArgs
from tunesmith.config.sampling_args import InferenceArgs, SamplingSettings
from tunesmith.errors import TunesmithError

# What each `tunesmith` command needs from the same YAML: train needs data, export a destination.
COMMANDS = ("train", "chat", "export", "api")
# report_to values: the trackers of training/trackers.py (TRACKERS), plus none and all.
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow", "swanlab", "trackio")
EVAL_STRATEGIES = ("no", "steps", "epoch")


@dataclass
class TaskArgs:
    """Which stage runs, and whether it trains, evaluates and predicts."""

    section: ClassVar[str] = "task"
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

    def problems(self) -> list[tuple[str, str]]:
        """Predictions are always generated."""
        if self.do_predict and not self.predict_with_generate:
            return [("predict_with_generate", "`predict_with_generate: false`: tunesmith's predictions are always "
                     "generated; remove the key or set it to true.")]
        return []


@dataclass
class OutputArgs:
    """Where results go, how often the loop logs, evaluates and saves, and where it resumes."""

    section: ClassVar[str] = "output"
    output_dir: str = "saves/run"
    """Where checkpoints, the final adapter/model, logs and plots go."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir."""
    logging_steps: int = 10
    """Log loss, learning rate and throughput every N optimizer steps."""
    log_rollouts_steps: int | None = None
    """Every N optimizer steps, ppo/grpo write a few sampled answers token by token (log-probs, KL, values, advantages) to rollouts.jsonl, dpo/kto their first 4 pairs' per-token log-ratios to pairs.jsonl (default: logging_steps; 0: off)."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    plot_loss: bool = False
    """Write training_loss.png (and training_eval_loss.png) into output_dir."""
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["none"])
    """Where metrics go besides trainer_log.jsonl: none, tensorboard, wandb, mlflow, swanlab, trackio, a comma list of them, or all (every one installed); each needs its package (`pip install 'tunesmith[trackers]'`) and reads its own env vars (WANDB_MODE, MLFLOW_TRACKING_URI, SWANLAB_MODE, ...)."""
    run_name: str | None = None
    """The run's name in experiment trackers (default: output_dir's folder name)."""
    eval_strategy: str = "no"
    """When to evaluate during training: no, steps or epoch."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps when eval_strategy is steps (default: logging_steps)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to continue from, or `true` for the latest in output_dir."""

    def resolve(self) -> None:
        """eval_steps and log_rollouts_steps follow logging_steps unless set; `false` means no resume."""
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.log_rollouts_steps is None:
            self.log_rollouts_steps = self.logging_steps
        if self.resume_from_checkpoint in ("false", "False", ""):
            self.resume_from_checkpoint = None

    def problems(self) -> list[tuple[str, str]]:
        """Cadences and choices the loop can follow."""
        unknown = [name for name in self.report_to if name not in REPORT_TO]
        checks = [
            ("report_to", bool(unknown), schema.choice_message("report_to", unknown[0] if unknown else "", REPORT_TO)),
            ("report_to", len(self.report_to) > 1 and not {"none", "all"}.isdisjoint(self.report_to),
             f"`report_to: {', '.join(self.report_to)}`: none and all stand alone; list the trackers, or write one of them."),
            ("eval_strategy", self.eval_strategy not in EVAL_STRATEGIES,
             schema.choice_message("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)),
            ("logging_steps", self.logging_steps < 1, "`logging_steps` must be at least 1."),
            ("eval_steps", self.eval_steps < 1, "`eval_steps` must be at least 1."),
            ("log_rollouts_steps", self.log_rollouts_steps < 0,
             f"`log_rollouts_steps: {self.log_rollouts_steps}` must be a number of steps, or 0 to write no "
             "rollouts.jsonl / pairs.jsonl."),
            ("save_steps", self.save_steps < 0, "`save_steps` must not be negative."),
            ("save_total_limit", self.save_total_limit is not None and self.save_total_limit < 1,
             "`save_total_limit` must be at least 1."),
        ]
        return [(key, message) for key, failed, message in checks if failed]


# The sections every run has, by attribute name of RunConfig, in --help order.
COMMON_SECTIONS = {"task": TaskArgs, "model": ModelArgs, "adapter": AdapterArgs, "data": DataArgs,
                   "train": OptimArgs, "output": OutputArgs, "sampling": SamplingSettings, "inference": InferenceArgs,
                   "distributed": DistributedArgs}


@dataclass
class RunConfig:
    """One run's settings, section by section; `method` is the stage's own section (None if it has no keys)."""

    task: TaskArgs
    model: ModelArgs
    adapter: AdapterArgs
    data: DataArgs
    train: OptimArgs
    output: OutputArgs
    sampling: SamplingSettings
    inference: InferenceArgs
    distributed: DistributedArgs
    method: object | None = None

    @property
    def stage(self) -> str:
        """The stage's name (sft, rm, dpo, ppo, grpo)."""
        return self.task.stage

    def sections(self) -> list[object]:
        """Every section of the run, the stage's own last."""
        found = [getattr(self, name) for name in COMMON_SECTIONS]
        return found + ([self.method] if self.method is not None else [])

    def flat(self) -> dict:
        """Every key with its value, as one flat mapping (what train_config.yaml holds)."""
        return {key: value for section in self.sections() for key, value in dataclasses.asdict(section).items()}

    def replace(self, **changes: object) -> RunConfig:
        """A copy with some flat keys changed (each goes to the section that owns it)."""
        updated = dataclasses.replace(self)
        for section_attr, section in [*((name, getattr(self, name)) for name in COMMON_SECTIONS), ("method", self.method)]:
            mine = {key: value for key, value in changes.items() if section is not None and key in _field_names(section)}
            if mine:
                setattr(updated, section_attr, dataclasses.replace(section, **mine))
        unknown = set(changes) - set(updated.flat())
        if unknown:
            raise KeyError(f"not a key of this run: {sorted(unknown)}")
        return updated


def _field_names(section: object) -> set[str]:
    return {field.name for field in dataclasses.fields(section)}


def common_keys() -> list[str]:
    """Every key of the common sections."""
    return [field.name for cls in COMMON_SECTIONS.values() for field in dataclasses.fields(cls)]


def parse_run_config(raw: dict, where: dict[str, str], source: str, notices: list[str] | None, command: str,
                     method: type | None, stage_keys: set[str]) -> RunConfig:
    """Sections from flat keys: ignored keys noticed, unknown keys refused, values typed and checked.

    `method` is the section class of the stage `raw` asks for; `stage_keys` are the keys of every stage
    (a YAML may carry another stage's keys, as LLaMA-Factory's do; they are accepted and unused).
    """
    known = common_keys() + sorted(stage_keys)
    kept = {}
    for key, value in raw.items():
        origin = where.get(key, source)
        if key in IGNORED_KEYS:
            if notices is not None:
                notices.append(f"notice: {origin}: `{key}` has no meaning in tunesmith and is ignored.")
        elif key not in known:
            raise TunesmithError(unknown_key_message(key, origin, known))
        else:
            kept[key] = value
    sections = {name: schema.from_flat(cls, kept, where, source) for name, cls in COMMON_SECTIONS.items()}
    config = RunConfig(**sections, method=schema.from_flat(method, kept, where, source) if method else None)
    for section in config.sections():
        schema.check(section, where, source)
    for key, message in run_problems(config, command):
        raise TunesmithError(f"{where.get(key, source)}: {message}")
    return config


def run_problems(config: RunConfig, command: str) -> list[tuple[str, str]]:
    """Checks across sections: what each command needs, and eval settings that need an eval split."""
    task, data, output = config.task, config.data, config.output
    training = command == "train"
    checks = [
        ("dataset", training and task.do_train and not data.dataset,
         "`dataset` is required (names from dataset_info.json or file paths)."),
        ("do_train", training and not task.do_train and not task.do_predict,
         "`do_train: false` leaves `tunesmith train` nothing to do; remove it, or set `do_predict: true` with an `eval_dataset`."),
        ("do_predict", training and task.do_predict and not data.eval_dataset,
         "`do_predict: true` generates answers to `eval_dataset`'s prompts: set `eval_dataset`."),
        ("export_dir", command == "export" and not config.inference.export_dir,
         "`export_dir` is required: the folder to write the merged model to."),
        ("do_eval", task.do_eval and not data.has_eval_split,
         "`do_eval: true` needs an eval split: set `val_size` (e.g. 0.1) or `eval_dataset`."),
        ("eval_strategy", output.eval_strategy != "no" and not data.has_eval_split,
         f"`eval_strategy: {output.eval_strategy}` needs an eval split: set `val_size` (e.g. 0.1) or `eval_dataset`."),
        ("quantization_bit", training and config.model.quantization_bit is not None and not config.adapter.is_lora,
         f"`quantization_bit` freezes the base in {config.model.quantization_bit}-bit (QLoRA): it trains LoRA adapters, "
         f"so set `finetuning_type: lora` (or remove quantization_bit to train {config.adapter.finetuning_type})."),
        ("adapter_name_or_path", training and config.model.quantization_bit is not None and config.stage != "sft"
         and bool(config.model.adapter_name_or_path),
         f"`stage: {config.stage}` merges adapter_name_or_path into the base and trains a fresh adapter, and a "
         f"{config.model.quantization_bit}-bit base cannot take a merge. Merge the adapters first with `tunesmith "
         "export` (full precision) and use that folder as model_name_or_path, or remove quantization_bit."),
        ("quantization_bit", command == "export" and config.model.quantization_bit is not None,
         "`export` merges the adapters into full-precision weights; remove `quantization_bit` (a QLoRA adapter "
         "merges into the unquantized base)."),
        ("adapter_name_or_path", not config.adapter.is_lora and bool(config.model.adapter_name_or_path),
         "`adapter_name_or_path` needs `finetuning_type: lora`; LoRA adapters cannot be loaded into a full or freeze run."),
    ]
    return [(key, message) for key, failed, message in checks if failed]


def save_config(config: RunConfig, path) -> None:
    """Write the resolved config (every key of the run, defaults included) as flat YAML."""
    path.write_text(yaml.safe_dump(config.flat(), sort_keys=False))
