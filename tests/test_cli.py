"""CLI smoke tests: env, init-model, argument errors."""

import json

import pytest

from tunesmith.cli import main


def test_env_prints_versions_and_device(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("tunesmith", "torch", "transformers", "device", "torch threads"):
        assert f"- {key}:" in out


def test_init_model_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--arch", "llama", "--size", "tiny"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


def test_unknown_subcommand_is_an_argparse_error():
    with pytest.raises(SystemExit):
        main(["trian"])


def test_missing_config_file_is_a_clean_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
