"""Every YAML under examples/ loads and validates, and the README's config reference is the generated one.

Run this file directly (`python tests/test_examples.py`) to regenerate the README's reference from the
config sections' docstrings.
"""

import re
from pathlib import Path

import pytest

from tunesmith.config import COMMANDS
from tunesmith.training.configure import config_reference, load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- config-reference:.*?-->\n)(.*?)(<!-- config-reference end -->)", re.S)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    """Each validates for the command its name starts with (chat_, export_, api_), else for train."""
    notices = []
    prefix = path.name.split("_")[0]
    load_config(path, [], notices, command=prefix if prefix in COMMANDS else "train")
    assert notices == []


def test_readme_config_reference_is_generated_from_the_docstrings():
    """One source for each key's documentation: the README's table equals what the sections generate."""
    found = BLOCK.search(README.read_text())
    assert found, "README.md lost its config-reference markers"
    assert found.group(2).strip() == config_reference().strip(), (
        "README.md's config reference is stale: run `python tests/test_examples.py` to regenerate it")


def test_help_lists_the_keys_with_their_text():
    """`tunesmith train --help` shows keys with their docstrings, and one section on request."""
    from tunesmith.training.configure import config_help

    text = config_help()
    for key, words in (("pref_beta", "how strongly the policy is held"), ("lora_rank", "LoRA rank r"),
                       ("ppo_epochs", "Passes over each batch of rollouts")):
        assert f"  {key}: " in text and words in text
    assert "lora_rank" in config_help("adapter") and "pref_beta" not in config_help("adapter")


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: m.group(1) + config_reference().strip() + "\n" + m.group(3), text))
    print("README.md config reference regenerated")
