"""A search journal's identity (issue 23, Required 6): everything that changes a trial's score or a front check's
verdict is in it, through the CLI on a tiny model; a resume that differs is refused with one line naming the field
(exit 2, nothing written, the journal untouched), so no score or verdict is reused across a change."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_run_search import CHEAP, SMALL
from test_search import BASE, L, numbers, objective
from tiny import CHATML, pretend_refusal
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.lm import from_pretrained_objects
from abliterate.lm.fingerprint import revision_of, weights_digest
from abliterate.run import choosing
from abliterate.select.search import SearchError, Verify, search

REFUSAL = Path(choosing.__file__).parents[1] / "data" / "profiles" / "refusal.toml"


def invoke(*args, env=None):
    return CliRunner().invoke(app, list(args), env={**CHEAP, **(env or {})})


def profile_with(tmp_path: Path, **changes) -> Path:
    """The bundled refusal profile with some keys changed, as a .toml file (still named refusal)."""
    data = {**tomllib.loads(REFUSAL.read_text()), **changes}
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in ((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += [f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    path = tmp_path / f"refusal-{len(list(tmp_path.glob('refusal-*')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def identity_of_run(monkeypatch, tmp_path):
    """The identity `run` would give its search journal, for a model and flags (the search itself not run)."""
    seen: list[dict] = []

    def captured(objective, *, settings, **kwargs):
        seen.append(dict(settings.identity))
        raise SearchError("identity captured")

    monkeypatch.setattr(choosing, "search", captured)

    def identity(model, *flags, env=None):
        with pretend_refusal():
            res = invoke("run", str(model), "--out", str(tmp_path / "o"), *SMALL, *flags, env=env)
        assert "identity captured" in res.output, res.output
        return seen[-1]

    return identity


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_every_setting_that_changes_a_score_or_verdict_is_in_the_identity(identity_of_run, model_dir, tmp_path):
    base = identity_of_run(model_dir)
    assert identity_of_run(model_dir) == base, "the identity is deterministic"
    # settings that only bound or pick leave it alone: a resume may change them
    same = identity_of_run(model_dir, "--trials", "9", "--timeout", "50", "--kl-budget", "3", "--allow-over-budget")
    assert same == base
    for flags, env, field in [
        (["--dtype", "bfloat16"], None, "dtype"),
        ([], {"ABLITERATE_CHAT_TEMPLATE": CHATML.replace("<|im_start|>assistant", "<|im_start|>bot")}, "chat_template"),
        (["--device-map", "auto"], None, "placement"),
        (["--system", "Answer briefly."], None, "system"),
        (["--disable-thinking"], None, "template"),
        ([], {"ABLITERATE_SEARCH_VERIFY_TOKENS": "7"}, "search.verify_tokens"),
        ([], {"ABLITERATE_SEARCH_MAX_K": "3"}, "search.max_k"),
        (["--behaviour", str(profile_with(tmp_path, window=500))], None, "window"),
        (["--behaviour", str(profile_with(tmp_path, markers=["zzz never said"]))], None, "markers"),
        (["--behaviour", str(profile_with(tmp_path, openers=["Nope", "No"]))], None, "openers"),
    ]:
        other = identity_of_run(model_dir, *flags, env=env)
        assert field in changed(base, other), (flags, env, changed(base, other))
    # the same folder with other weights (a fine-tune saved over it): only the content hash tells
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    before = identity_of_run(copy)
    assert changed(base, before) == {"model"}, "a copy has the same weights hash"
    tensors = load_file(copy / "model.safetensors")
    name = next(k for k in sorted(tensors) if "mlp.down_proj" in k)
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert changed(before, identity_of_run(copy)) == {"weights"}


def test_a_resume_with_a_changed_setting_is_refused_naming_it(model_dir, tmp_path):
    out = tmp_path / "out"
    journal = choosing.journal_path(out)
    args = ["run", str(model_dir), "--out", str(out), "--trials", "6", "--kl-budget", "1e-12", *SMALL]
    check = None  # no front check: the tiny model never refuses when judged (verdicts: the library test below)
    with pretend_refusal():
        first = invoke(*args, env=check)
        assert first.exit_code == 2 and "--allow-over-budget" in first.output, first.output
        kept = journal.read_bytes()
        for flags, message in [
            (["--dtype", "bfloat16"], "its dtype is 'torch.float32', this run's is 'torch.bfloat16'"),
            (["--behaviour", str(profile_with(tmp_path, window=500))], "its window is None, this run's is 500"),
        ]:
            res = invoke(*args, "--resume", "--allow-over-budget", *flags, env=check)
            assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
            assert message in " ".join(res.output.split()) and "resume with the settings it was written with" in (
                " ".join(res.output.split())
            )
            assert not out.exists() and journal.read_bytes() == kept, "nothing written, the journal untouched"
        res = invoke("--json", *args, "--resume", "--allow-over-budget", env=check)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["search"]["resumed"] == 6


def test_cached_verdicts_are_never_reused_across_a_change(tmp_path):
    calls = []

    def measure(spec):
        calls.append(spec)
        return numbers(0) if spec.edits_anything else numbers(7)

    journal = tmp_path / "j.log"
    kw = {"num_layers": L, "trials": 6, "journal": journal, "verify": Verify(measure, "k"), "verify_top": 2}
    kw["base"] = BASE
    search(objective, identity={"markers": "a"}, kl_budget=10, **kw)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(SearchError, match="its markers is 'a', this run's is 'b'"):
        search(objective, identity={"markers": "b"}, kl_budget=10, resume=True, **kw)
    assert calls == [], "no verdict judged (or reused) for another judge"
    search(objective, identity={"markers": "a"}, kl_budget=10, resume=True, **kw)
    assert calls == [], "the same judge reuses them"


def test_the_revision_and_weights_of_a_hub_snapshot(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    lm = from_pretrained_objects(model, tokenizer)
    lm.source, lm.local_path = "someone/tiny", None
    assert revision_of(lm) == sha
    from_files = weights_digest(lm)
    lm.source = "nobody/in-memory"  # no checkpoint anywhere: a sample of the parameters in memory
    in_memory = weights_digest(lm)
    assert revision_of(lm) is None and in_memory != from_files
    with torch.no_grad():
        next(lm.model.parameters()).mul_(1.5)
    assert weights_digest(lm) != in_memory
