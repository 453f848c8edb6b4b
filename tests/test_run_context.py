"""One resolved run: the behaviour profile is loaded once per ``pipeline.run``, and the refactor into a run
context, sweep and search settings changed no output (golden values recorded from the code before it)."""

from __future__ import annotations

import json
import math

import pytest
from tiny import pretend_refusal

from abliterate.behaviours import profiles
from abliterate.run import config, pipeline

SMALL = {"n_train": 4, "n_val": 8, "n_test": 2, "max_new_tokens": 2}
RUNS = {
    "sweep": {"search.enabled": False},
    "search": {"search.trials": 5, "search.kl_budget": 100.0, "search.verify_top": 0, "search.startup": 2},
}
# recorded from main at 3969eb4 (before the run context), same tiny model and settings
SWEEP_SPEC = {
    "method": "mean_diff",
    "slerp_t": 1.0,
    "position": -1,
    "direction_index": 1.0,
    "k": 1,
    "attn": {"peak": 0.0, "max_weight": 1.0, "edge_weight": 1.0, "width": "inf"},
    "mlp": {"peak": 0.0, "max_weight": 1.0, "edge_weight": 1.0, "width": "inf"},
    "embedding": 1.0,
    "norm_preserving": False,
}
SEARCH_SPEC = {
    "method": "mean_diff",
    "slerp_t": 1.0,
    "position": -1,
    "direction_index": 1.3616863450159336,
    "k": 1,
    "attn": {
        "peak": 0.6932183609118776,
        "max_weight": 0.7100343831042428,
        "edge_weight": 0.23044668849410488,
        "width": 1.1982371698677068,
    },
    "mlp": {
        "peak": 1.710478152201426,
        "max_weight": 0.9851559810501276,
        "edge_weight": 0.6613436089171093,
        "width": 1.9529991198923098,
    },
    "embedding": 1.0,
    "norm_preserving": True,
}
BASE = (-4.246750354766846, -4.254086017608643)  # the sweep's unedited bypass and induce scores
CANDIDATE = (-4.195216655731201, 0.021214893087744713)  # layer 1's bypass and KL (layer 0: zero-norm)
TRIALS = [
    (-4.195216655731201, 0.021214893087744713),
    (-4.178449630737305, 0.04814576357603073),
    (-4.194151878356934, 0.03749896213412285),
    (-4.23743200302124, 0.019795585423707962),
    (-4.251481056213379, 0.01062995009124279),
]
AFTER_KL = {"sweep": 0.020883075892925262, "search": 0.010418761521577835}


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Both runs, with the number of behaviour-profile loads each made."""
    root, done = tmp_path_factory.mktemp("golden"), {}
    real = profiles.parse_profile
    for name, flags in RUNS.items():
        cfg = config.load(None, {"model": str(model_dir), "out": str(root / name), **SMALL, **flags}, env={})
        loads: list[str] = []
        with pytest.MonkeyPatch.context() as mp, pretend_refusal():
            mp.setattr(
                profiles, "parse_profile", lambda data, path, seen=loads: seen.append(str(path)) or real(data, path)
            )
            pipeline.run(cfg)
        metrics = json.loads((root / name / "metrics.json").read_text())
        done[name] = (metrics, json.loads((root / name / "edit.json").read_text()), loads)
    return done


@pytest.mark.parametrize("name", list(RUNS))
def test_one_profile_load_per_run(runs, name):
    assert len(runs[name][2]) == 1, runs[name][2]


def close(a: float, b: float, rel_tol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-7)


# The after-edit KL runs through generation and a teacher-forced pass, whose float sums moved by 1.5e-5 (relative)
# between transformers 5.24 and 5.25 with nothing of ours changed; the scores above are single forward passes.
AFTER_KL_TOL = 1e-4


def test_sweep_run_matches_the_recorded_outputs(runs):
    metrics, edit, _ = runs["sweep"]
    assert edit["spec"] == SWEEP_SPEC and not edit["searched"]
    sel = metrics["selection"]
    assert metrics["chosen"] == {"layer": 1, "position": -1, "method": "mean_diff"}
    assert close(sel["base_bypass"], BASE[0]) and close(sel["base_induce"], BASE[1])
    zero, one = sel["candidates"]
    assert math.isnan(zero["bypass"]) and close(one["bypass"], CANDIDATE[0]) and close(one["kl"], CANDIDATE[1])
    assert close(metrics["after"]["kl"], AFTER_KL["sweep"], AFTER_KL_TOL)
    assert metrics["search"] is None and metrics["behaviour"]["name"] == "refusal"


def test_search_run_matches_the_recorded_outputs(runs):
    metrics, edit, _ = runs["search"]
    spec = edit["spec"]
    assert {k: v for k, v in spec.items() if k not in ("direction_index", "attn", "mlp")} == {
        k: v for k, v in SEARCH_SPEC.items() if k not in ("direction_index", "attn", "mlp")
    }
    assert close(spec["direction_index"], SEARCH_SPEC["direction_index"])
    for part in ("attn", "mlp"):
        assert all(close(spec[part][k], v) for k, v in SEARCH_SPEC[part].items())
    search = metrics["search"]
    assert search["front"] == [4] and search["chosen"] == 4 and edit["searched"]
    assert [t["number"] for t in search["trials"]] == list(range(5))
    assert all(close(t["refusal"], r) and close(t["kl"], k) for t, (r, k) in zip(search["trials"], TRIALS, strict=True))
    assert close(metrics["after"]["kl"], AFTER_KL["search"], AFTER_KL_TOL)


def test_the_check_split_is_held_out_and_only_drawn_for_a_checked_search():
    from abliterate.run.context import splits_for

    profile = profiles.load_profile("refusal")
    on = config.load(flags={"n_train": 8, "n_val": 4, "n_test": 4, "search.check_prompts": 6}, env={})
    harmful, harmless = splits_for(on, profile)
    for side in (harmful, harmless):
        assert len(side.check) == 6 and not set(side.check) & set(side.train + side.val + side.test)
    for flags in ({"search.verify_top": 0}, {"search.enabled": False}):
        off = config.load(flags={"n_train": 8, "n_val": 4, "n_test": 4, **flags}, env={})
        plain, _ = splits_for(off, profile)
        assert plain.check == [] and (plain.train, plain.val, plain.test) == (harmful.train, harmful.val, harmful.test)
    for key, bad, message in [
        ("search.check_prompts", 0, "check_prompts must be at least 1"),
        ("search.answer_kl_budget", 0.0, "answer_kl_budget must be a positive number"),
        ("search.answer_kl_budget", float("nan"), "answer_kl_budget must be a positive number"),
        ("search.degenerate_allowance", -1, "degenerate_allowance must be >= 0"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(flags={key: bad}, env={})
