"""``eval --tasks``: lm-evaluation-harness scores on a local five-question task, checked against log-likelihoods
computed by hand, for a model, its base and a runtime edit; the report and the errors of bad task settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_cli import invoke
from tiny import tiny_lm, tiny_model, tiny_tokenizer

from abliterate.evaluate.capability import parse_tasks

ROOT = Path(__file__).resolve().parent.parent
TASKS = "tests/data/lm_eval"  # the task YAML names its data file relative to the repository root
TASK = "abliterate_tiny_qa"
DOCS = [json.loads(line) for line in (ROOT / TASKS / "tiny_qa.jsonl").read_text().splitlines()]
FAST = ("--n-test", "2", "--max-new-tokens", "2", "--kl-tokens", "1", "--batch-size", "4")


@torch.no_grad()
def hand_accuracy(model: torch.nn.Module, docs: list[dict]) -> float:
    """The multiple-choice accuracy the harness should report: the choice whose tokens (after a space) have the
    highest summed log-probability after ``Question: ...\\nAnswer:`` (the byte tokenizer has no merges, so
    tokenizing the two parts apart equals tokenizing them together)."""
    tok, right = tiny_tokenizer(), 0
    for doc in docs:
        context = tok(f"Question: {doc['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([context + cont])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("capability")
    for name, seed in (("base", 0), ("model", 5)):
        tiny_model("qwen2", seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


@pytest.fixture
def at_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_parse_tasks():
    assert parse_tasks("a, b,,a") == ["a", "b"]
    assert parse_tasks(["x,y", "z"]) == ["x", "y", "z"]
    assert parse_tasks(None) == [] and parse_tasks(" , ") == []


def test_missing_extra_is_one_line_saying_how_to_install(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    res = invoke("eval", str(models / "model"), *FAST, "--tasks", TASK, "--out", str(tmp_path / "m.json"))
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    assert "pip install 'abliterate[bench]'" in res.output
    assert not (tmp_path / "m.json").exists()


def test_eval_tasks_scores_base_and_model_beside_the_refusal_metrics(models, tmp_path, at_root):
    pytest.importorskip("lm_eval")
    out, report = tmp_path / "m.json", tmp_path / "r.html"
    res = invoke(
        "eval", str(models / "model"), "--base", str(models / "base"), *FAST,
        "--tasks", TASK, "--task-path", TASKS, "--out", str(out), "--report", str(report),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    expected = {name: hand_accuracy(tiny_model("qwen2", seed), DOCS) for name, seed in (("base", 0), ("model", 5))}
    for name in ("base", "model"):
        assert "refusal_rate" in metrics[name]  # beside the refusal metrics
        scores = metrics[name]["capability"][TASK]
        assert scores["n"] == len(DOCS)
        assert scores["acc"] == pytest.approx(expected[name])
        assert scores["acc_stderr"] > 0 or scores["acc"] in (0.0, 1.0)
    settings = metrics["settings"]["capability"]
    assert settings["tasks"] == [TASK] and settings["limit"] is None and settings["task_paths"][0].endswith(TASKS)
    assert f"{TASK} acc" in " ".join(res.stdout.split())
    page = report.read_text()
    assert 'class="capability"' in page and "<th>model - base</th>" in page
    assert f"<td>{expected['model'] - expected['base']:+.3f}</td>" in page
    assert f"{expected['base']:.3f}" in page and f"(n={len(DOCS)})" in page
    assert "<th>base</th><th>model</th>" in page and 'class="kpi"' in page


def test_limit_scores_the_first_documents_only(models, tmp_path, at_root):
    pytest.importorskip("lm_eval")
    out = tmp_path / "m.json"
    res = invoke(
        "eval", str(models / "model"), *FAST, "--tasks", TASK, "--task-path", TASKS, "--limit", "2", "--out", str(out)
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    scores = metrics["model"]["capability"][TASK]
    assert scores["n"] == 2 and scores["acc"] == pytest.approx(hand_accuracy(tiny_model("qwen2", 5), DOCS[:2]))
    assert "base" not in metrics and metrics["settings"]["capability"]["limit"] == 2


def test_report_without_tasks_has_no_capability_section(models, tmp_path):
    report = tmp_path / "r.html"
    res = invoke("eval", str(models / "model"), *FAST, "--report", str(report))
    assert res.exit_code == 0, res.output
    page = report.read_text()
    assert "abliterate eval report" in page and "<th>model</th>" in page and "Capability" not in page
    again = invoke("eval", str(models / "model"), *FAST, "--report", str(report))
    assert again.exit_code == 2 and "--report" in again.output and "already exists" in again.output


def test_runtime_edit_is_scored_under_its_hooks():
    pytest.importorskip("lm_eval")
    from abliterate.edit.interventions import induce
    from abliterate.evaluate.capability import Harness

    lm = tiny_lm("qwen2", seed=5)
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    harness = Harness([TASK], task_paths=[ROOT / TASKS], batch_size=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        plain = harness.score(lm, "base")
        edited = harness.score(lm, "induced", edit=lambda: induce(lm, direction, 20.0))
        with induce(lm, direction, 20.0):
            expected = hand_accuracy(lm.model, DOCS)
    assert plain.scores[TASK]["acc"] == pytest.approx(hand_accuracy(lm.model, DOCS))
    assert edited.scores[TASK]["acc"] == pytest.approx(expected) != plain.scores[TASK]["acc"]  # the hooks count
    assert edited.name == "induced" and edited.n[TASK] == len(DOCS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tasks", TASK), f"unknown lm-eval task {TASK}: looked in the "),
        (("--tasks", "abliterate_tiny_q", "--task-path", TASKS), f"did you mean {TASK}?"),
        (("--tasks", TASK, "--task-path", "tests/data/no-such-folder"), "is not a folder"),
        (("--tasks", TASK, "--task-path", TASKS, "--limit", "0"), "--limit must be at least 1"),
        (("--tasks", ","), "no task named"),
        (("--limit", "3"), "--task-path and --limit apply to --tasks"),
    ],
)
def test_bad_task_settings_are_one_clear_line(models, tmp_path, at_root, args, message):
    if "--tasks" in args:
        pytest.importorskip("lm_eval")
    out = tmp_path / "m.json"
    res = invoke("eval", str(models / "model"), *FAST, *args, "--out", str(out))
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()
    if args == ("--tasks", TASK):
        assert "registry" in res.output and "--task-path" in res.output
