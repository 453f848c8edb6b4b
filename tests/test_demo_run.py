"""`abliterate run` end to end on the real demo model (its own file, so that a parallel test worker runs it beside
the other demo-model tests)."""

from __future__ import annotations

import pytest

from abliterate.lm.demo import demo_model_path

pytestmark = pytest.mark.slow


def test_cli_run_end_to_end_on_the_demo_model(tmp_path):
    """`abliterate run` on the real model: selection, before/after evaluation, all artifacts, plain reload."""
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from abliterate.cli import app

    out = tmp_path / "run"
    check = tmp_path / "check.toml"  # the real front check, small: 2 front trials on 8 + 8 held-out prompts
    check.write_text("[search]\nverify_top = 2\ncheck_prompts = 8\nverify_tokens = 16\n")
    args = [
        "--json",
        "run",
        str(demo_model_path()),
        "--out",
        str(out),
        "--n-train",
        "32",
        "--n-val",
        "8",
        "--n-test",
        "8",
        "--layer",
        "13",
        "--layer",
        "15",
        "--max-new-tokens",
        "16",
        "--trials",
        "4",
        "--allow-over-budget",  # 4 trials (3 of them the sweep's full-strength edits) may all be over --kl-budget
        "--config",
        str(check),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(res.stdout)["chosen"] == metrics["chosen"]
    assert metrics["chosen"]["layer"] in (13, 15)
    search = metrics["search"]
    assert len(search["trials"]) == 4 and search["chosen"] in search["front"]
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert chosen["refusal"] < search["base"]["refusal"], "the pick lowers the refusal score"
    # checked by generation on held-out prompts: it fails (refuses or degenerates) less than the unedited model
    assert chosen["failures"] is not None and search["base_check"]["judged"] == 8
    assert chosen["failures"] < search["base_check"]["failures"]
    assert metrics["after"]["refusal_rate"] < metrics["before"]["refusal_rate"]
    assert metrics["after"]["over_refusal"] <= metrics["before"]["over_refusal"] + 0.125
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "directions.safetensors",
        "directions.json",
        "report.html",
        "candidates.png",
        "README.md",
        "abliterate_config.json",
        "edit.json",
        "search_journal.log",
        "front.png",
    ):
        assert (out / name).is_file(), name
    assert "data:image/png;base64" in (out / "report.html").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 24
