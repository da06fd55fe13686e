"""Every YAML under examples/ loads and validates, and the README documents every config key."""

from pathlib import Path

import pytest

from tunesmith.config import COMMANDS, FIELDS, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    """Each validates for the command its name starts with (chat_, export_, api_), else for train."""
    notices = []
    prefix = path.name.split("_")[0]
    load_config(path, [], notices, command=prefix if prefix in COMMANDS else "train")
    assert notices == []


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in FIELDS if f"`{key}`" not in readme]
    assert missing == []
