"""The stage registry and the config sections: each key has one owner, one docstring, one check."""

import dataclasses

import pytest

from tunesmith.config import RunConfig, schema
from tunesmith.config.run_config import COMMON_SECTIONS, common_keys
from tunesmith.errors import TunesmithError
from tunesmith.model.loading import resolve_device_and_dtype
from tunesmith.training.configure import build_config, stage_keys
from tunesmith.training.stages import STAGES

BASE = {"model_name_or_path": "m", "dataset": "d"}


def test_every_stage_is_registered_under_its_own_name():
    assert list(STAGES) == ["sft", "rm", "dpo", "kto", "ppo", "grpo"]
    assert all(name == spec.name for name, spec in STAGES.items())


def test_a_key_has_one_owner():
    """Stage sections never redeclare a common key; two stages share a key only through a shared base section."""
    assert not set(common_keys()) & stage_keys()
    owners = {}
    for spec in STAGES.values():
        for cls in spec.args.__mro__ if spec.args else ():
            for key in schema.own_keys(cls) if dataclasses.is_dataclass(cls) else ():
                assert owners.setdefault(key, cls) is cls, f"{key} declared by {owners[key]} and {cls}"


def test_every_key_has_a_docstring():
    for cls in [*COMMON_SECTIONS.values(), *(spec.args for spec in STAGES.values() if spec.args)]:
        missing = [key for key in schema.own_keys(cls) if not schema.key_docs(cls).get(key)]
        assert missing == [], f"{cls.__name__}: {missing}"


def test_flat_keys_land_in_their_sections():
    config = build_config({**BASE, "stage": "dpo", "pref_beta": 0.3, "lora_rank": 4, "top_p": 0.5,
                           "learning_rate": "1e-4", "num_generations": 8})
    assert isinstance(config, RunConfig)
    assert (config.method.pref_beta, config.adapter.lora_rank, config.sampling.top_p) == (0.3, 4, 0.5)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert "num_generations" not in config.flat()  # a grpo key in a dpo run: accepted, not part of the run
    assert config.flat()["pref_beta"] == 0.3 and config.flat()["stage"] == "dpo"


def test_stage_dependent_defaults():
    assert build_config({**BASE, "stage": "ppo", "reward_function": "m:f"}).method.ppo_kl_coef == 0.05
    assert build_config({**BASE, "stage": "grpo", "reward_function": "m:f"}).method.ppo_kl_coef == 0.04
    assert build_config(BASE).method is None  # sft has no keys of its own


def test_replace_routes_keys_to_their_sections():
    config = build_config({**BASE, "stage": "dpo"})
    changed = config.replace(bf16=True, pref_beta=0.5, adapter_name_or_path=["a"])
    assert (changed.train.bf16, changed.method.pref_beta, changed.model.adapter_name_or_path) == (True, 0.5, ["a"])
    assert (config.train.bf16, config.method.pref_beta) == (False, 0.1)  # the original is unchanged
    with pytest.raises(KeyError):
        config.replace(not_a_key=1)


def test_errors_name_the_line_of_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nstage: dpo\npref_beta: -1\n")
    from tunesmith.training.configure import load_config

    with pytest.raises(TunesmithError, match=r"cfg.yaml, line 4: `pref_beta` must be positive"):
        load_config(path)


def test_use_cpu_is_accepted_and_forces_the_cpu():
    """LLaMA-Factory users on CPU write `use_cpu: true` (to get bf16 there): accepted, and it picks the CPU."""
    assert build_config({**BASE, "use_cpu": True}).train.use_cpu
    device, _ = resolve_device_and_dtype(False, False, use_cpu=True)
    assert device.type == "cpu"


def test_other_stages_keys_are_accepted_but_type_checked():
    """A YAML may carry another stage's keys (LLaMA-Factory's do); they are still checked, and a reward
    source on a stage that samples nothing is refused rather than ignored."""
    assert build_config({**BASE, "num_generations": 8}).method is None
    with pytest.raises(TunesmithError, match="`num_generations` must be an integer"):
        build_config({**BASE, "num_generations": "many"})
    with pytest.raises(TunesmithError, match="are for stage ppo or grpo, not dpo"):
        build_config({**BASE, "stage": "dpo", "reward_function": "m:f"})


def test_the_earlier_grpo_scale_rewards_key_is_still_read():
    with pytest.warns(UserWarning, match="grpo_scale_rewards is now scale_rewards"):
        config = build_config({**BASE, "stage": "grpo", "reward_function": "m:f", "grpo_scale_rewards": False})
    assert config.method.scale_rewards == "none"
    assert build_config({**BASE, "stage": "grpo", "reward_function": "m:f", "scale_rewards": True}).method.scale_rewards == "group"
