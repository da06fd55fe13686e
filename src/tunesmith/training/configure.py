"""Load a run's YAML into a validated RunConfig, knowing every stage's own keys (from the registry).

The config package (tunesmith/config) declares the common sections and the mechanics; this module adds
what only the stage registry knows: which stage names exist, the section each one owns, and each
stage's checks across sections. Everything that can be wrong with a config stops here, before any model
or data is loaded, with the file and line of the key at fault.

    config = load_config("cfg.yaml", ["learning_rate=1e-4"])
    config.train.learning_rate, config.method.pref_beta
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tunesmith.config import RunConfig, schema
from tunesmith.config.help import format_help, reference_table
from tunesmith.config.run_config import COMMON_SECTIONS, parse_run_config
from tunesmith.errors import TunesmithError
from tunesmith.training.stages import STAGES, StageSpec


def load_config(path: str | Path | None, overrides: list[str] = (), notices: list[str] | None = None,
                command: str = "train") -> RunConfig:
    """Read `path` (YAML), apply `key=value` overrides, validate for `command`; notices about ignored keys are appended."""
    raw, where = schema.read_yaml(Path(path)) if path else ({}, {})
    schema.apply_overrides(raw, where, list(overrides))
    return build_config(raw, str(path) if path else "command line", notices, where, command)


def build_config(raw: dict, source: str = "config", notices: list[str] | None = None,
                 where: dict[str, str] | None = None, command: str = "train") -> RunConfig:
    """Validate a plain dict of flat settings into a RunConfig; `where` maps keys to "file, line N"."""
    where = where or {}
    spec = stage_spec(raw, where, source)
    config = parse_run_config(raw, where, source, notices, command, spec.args, stage_keys())
    problems = spec.check(config, command) + _foreign_key_problems(raw, where, source, spec)
    if config.data.packing and not spec.packs_samples:
        problems.append(("packing", f"`packing` is for stage sft; stage {spec.name} batches its rows its own way "
                                    "(pairs share one packed row, RL samples its answers), so remove `packing`."))
    for key, message in problems:
        raise TunesmithError(f"{where.get(key, source)}: {message}")
    if notices is not None and config.distributed.summary():
        notices.append(config.distributed.summary())
    return config


def stage_spec(raw: dict, where: dict[str, str], source: str) -> StageSpec:
    """The registered stage `raw` names (sft when it names none)."""
    origin = where.get("stage", source)
    name = schema.convert("stage", raw.get("stage", "sft"), str, origin)
    if name not in STAGES:
        raise TunesmithError(f"{origin}: {schema.choice_message('stage', name, tuple(STAGES))}")
    return STAGES[name]


def _foreign_key_problems(raw: dict, where: dict[str, str], source: str, spec: StageSpec) -> list[tuple[str, str]]:
    """Keys of other stages are accepted (LLaMA-Factory YAMLs carry them) but still type-checked; a reward
    source on a stage that samples nothing is refused, since the run would silently ignore it."""
    own = {field.name for field in dataclasses.fields(spec.args)} if spec.args else set()
    types = {key: hint for other in STAGES.values() if other.args for key, hint in schema.key_types(other.args).items()}
    problems = []
    for key in sorted(set(raw) & set(types) - own):
        schema.convert(key, raw[key], types[key], where.get(key, source))
        if key in ("reward_model", "reward_function") and raw[key] is not None:
            problems.append((key, f"`reward_model` / `reward_function` are for stage ppo or grpo, not {spec.name}."))
    return problems


def stage_keys() -> set[str]:
    """Every key some stage's own section declares."""
    return {field.name for spec in STAGES.values() if spec.args for field in dataclasses.fields(spec.args)}


def help_groups() -> list[tuple[type, str]]:
    """(section class, note) for --help: the common sections, then each stage section once, with its stages."""
    groups = [(cls, "") for cls in COMMON_SECTIONS.values()]
    users: dict[type, list[str]] = {}
    for spec in STAGES.values():
        for cls in reversed(spec.args.__mro__ if spec.args else ()):
            if dataclasses.is_dataclass(cls) and schema.own_keys(cls):
                users.setdefault(cls, []).append(spec.name)
    return groups + [(cls, "stage " + ", ".join(names)) for cls, names in users.items()]


def config_help(section: str | None = None) -> str:
    """`tunesmith train --help [SECTION]`: every key (or one section's) with its type, default and docstring."""
    return format_help(help_groups(), section)


def config_reference() -> str:
    """The README's config reference, generated from the same docstrings."""
    return reference_table(help_groups())
