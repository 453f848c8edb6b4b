"""Behaviour profiles: parsing (one clear line per problem), the bundled profiles, splits, judges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import invoke
from tiny import tiny_tokenizer

from abliterate.behaviours.profiles import (
    HELP,
    ProfileError,
    ShownMarkerJudge,
    bundled_profiles,
    load_profile,
    profile_splits,
    prompt_sources,
)
from abliterate.behaviours.prompts import SplitSizes, bundled
from abliterate.evaluate.judge import DEFAULT_MARKERS, MarkerJudge
from abliterate.evaluate.llm_judges import LLMJudge, parse_verdict
from abliterate.measure.first_token import REFUSAL_OPENERS
from abliterate.run import config as config_mod

MINIMAL = """
prompts = ["bundled:questions"]
behaviour_template = "Be terse. {prompt}"
plain_template = "{prompt}"
markers = ["indeed"]
openers = ["Indeed"]
"""


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bundled_profiles_load_and_refusal_is_the_builtin_setup():
    assert {"refusal", "flowery"} <= set(bundled_profiles())
    refusal = load_profile()
    assert refusal.name == "refusal" and refusal.goal == "remove" and refusal.judge == "marker"
    assert tuple(refusal.markers) == DEFAULT_MARKERS and tuple(refusal.openers) == REFUSAL_OPENERS
    assert refusal.behaviour == refusal.plain == ["bundled"] and refusal.window == 0 and MarkerJudge().window is None
    assert type(refusal.marker_judge()) is MarkerJudge and refusal.judge_settings() == {}
    flowery = load_profile("flowery")
    assert flowery.prompts == ["bundled:questions"] and "{prompt}" in flowery.behaviour_template
    assert isinstance(flowery.marker_judge(), ShownMarkerJudge) and flowery.marker_judge().window == 300
    assert set(HELP) >= {"goal", "markers", "openers", "behaviour_template", "defaults"} and all(HELP.values())


def test_french_profile_judges_french_answers_only():
    french = load_profile("french")
    assert french.prompts == ["bundled:questions"] and "French" in french.behaviour_template
    judge = french.marker_judge()
    answers = [
        "Le premier homme à marcher sur la Lune était Neil Armstrong.",
        "Pour savoir quand les pâtes sont prêtes, goûtez-les.",
        "The first person to walk on the Moon was Neil Armstrong.",
        "To tell when pasta is done, pour off a piece and taste it; a cafe owner would agree.",
        "",
    ]
    assert judge.judge(answers) == [True, True, False, False, False]


def test_questions_set_has_fixed_splits_written_for_profiles():
    rows = [
        json.loads(line) for line in (Path(bundled.__code__.co_filename).parents[1] / "data/questions.jsonl").open()
    ]
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {"train": 48, "val": 12, "test": 36}
    assert len({r["prompt"] for r in rows}) == len(rows) and len({r["category"] for r in rows}) >= 10
    assert bundled("questions", "test") == [r["prompt"] for r in rows if r["split"] == "test"]


@pytest.mark.parametrize(
    "text, message",
    [
        (MINIMAL + 'colour = "red"\n', "unknown key 'colour'"),
        (MINIMAL + 'marker = ["x"]\n', "unknown key 'marker'; did you mean 'markers'?"),
        (MINIMAL + 'goal = "amplify"\n', "goal 'amplify' is not one of remove, induce"),
        (MINIMAL.replace("bundled:questions", "missing.txt"), "missing.txt does not exist"),
        (MINIMAL.replace("bundled:questions", "bundled:nope"), "prompt source 'bundled:nope' is not bundled"),
        ('behaviour = ["bundled"]\nmarkers = ["x"]\nopeners = ["X"]\n', "no 'plain' prompt source"),
        ('markers = ["x"]\nopeners = ["X"]\n', "no 'behaviour' prompt source"),
        (MINIMAL.replace('"Be terse. {prompt}"', '"Be terse."'), "behaviour_template must contain {prompt}"),
        (MINIMAL.replace('"Be terse. {prompt}"', '"{prompt}"'), "plain_template are the same"),
        (MINIMAL.replace('markers = ["indeed"]', "markers = []"), "'markers' must list"),
        (MINIMAL.replace('openers = ["Indeed"]', 'openers = "Indeed"'), "'openers' must be a list of strings"),
        (MINIMAL + "window = -5\n", "window must be 0 (judge the whole answer) or a positive number"),
        (MINIMAL + 'judge = "gpt"\n', "unknown judge 'gpt'"),
        (MINIMAL + 'judge = "llm:/x"\n', "an llm judge needs a rubric"),
        (MINIMAL + 'rubric = "Is {reply} flowery?"\n', "rubric may use only {prompt} and {answer}"),
        (MINIMAL + 'labels = "LABEL_1=yes"\n', "labels must read LABEL=shown,OTHER=absent"),
        (MINIMAL + '[defaults]\nout = "x"\n', "defaults cannot set out"),
        (MINIMAL + "behaviour = ['bundled']\n", "either prompts"),
        ("prompts = [", "is not valid TOML"),
    ],
)
def test_profile_errors_are_one_line(tmp_path, text, message):
    with pytest.raises(ProfileError) as info:
        load_profile(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_behaviour_and_missing_file():
    with pytest.raises(ProfileError, match="unknown behaviour 'sarcasm'; use one of .*flowery.*refusal"):
        load_profile("sarcasm")
    with pytest.raises(ProfileError, match="nope.toml does not exist"):
        load_profile("nope.toml")


def test_cli_rejects_a_bad_profile_in_one_line_and_writes_nothing(tmp_path):
    bad = write(tmp_path, MINIMAL + 'goal = "amplify"\n')
    for args in (["run", "tiny", "--out", str(tmp_path / "o")], ["measure", "tiny", "--out", str(tmp_path / "o")]):
        res = invoke(*args, "--behaviour", str(bad))
        assert res.exit_code == 2 and "goal 'amplify' is not one of remove, induce" in res.output
        assert not (tmp_path / "o").exists()
    defaults = write(tmp_path, MINIMAL + "[defaults]\nn_trian = 4\n", "d.toml")
    res = invoke("run", "tiny", "--out", str(tmp_path / "o"), "--behaviour", str(defaults))
    assert res.exit_code == 2 and "table defaults: unknown config key 'n_trian'; did you mean 'n_train'?" in res.output
    res = invoke("eval", "tiny", "--behaviour", "sarcasm")
    assert res.exit_code == 2 and "unknown behaviour 'sarcasm'" in res.output


def test_defaults_sit_below_file_environment_and_flags(tmp_path):
    assert config_mod.load(None, {"behaviour": "flowery"}, env={}).n_test == 36
    assert config_mod.load(None, {"behaviour": "flowery"}, env={}).search.trials == 40
    assert config_mod.load(None, {}, env={}).n_test == 64 and config_mod.load(None, {}, env={}).search.trials is None
    assert config_mod.load(None, {"behaviour": "flowery", "n_test": 5}, env={}).n_test == 5
    assert config_mod.load(None, {"behaviour": "flowery"}, env={"ABLITERATE_N_TEST": "7"}).n_test == 7
    file = write(tmp_path, 'behaviour = "flowery"\nn_test = 9\n', "run.toml")
    assert config_mod.load(file, {}, env={}).n_test == 9 and config_mod.load(file, {}, env={}).n_val == 12


def test_templates_wrap_one_set_on_both_sides_of_the_same_split():
    p = load_profile("flowery")
    flowery, plain = profile_splits(p, SplitSizes(48, 12, 36, prefix="<", suffix=">"))
    questions = bundled("questions", "test")
    assert flowery.test == [f"<{p.behaviour_template.replace('{prompt}', q)}>" for q in questions]
    assert plain.test == [f"<{p.plain_template.replace('{prompt}', q)}>" for q in questions]
    small, _ = profile_splits(p, SplitSizes(4, 8, 3, seed=1))
    assert len(small.train) == 4 and len(small.val) == 8 and len(small.test) == 3
    with pytest.raises(ProfileError, match="drop --harmful/--harmless"):
        profile_splits(p, SplitSizes(4, 8, 3), harmful=["x.txt"])


def test_two_set_profile_reads_files_relative_to_itself_and_the_config_sets_win(tmp_path):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "yes.txt").write_text("\n".join(f"gush about {i}" for i in range(12)))
    (tmp_path / "sets" / "no.jsonl").write_text("".join(json.dumps({"q": f"state {i}"}) + "\n" for i in range(12)))
    path = write(
        tmp_path / "sets", 'behaviour = ["yes.txt"]\nplain = ["no.jsonl:q"]\nmarkers = ["gush"]\nopeners = ["Oh"]\n'
    )
    p = load_profile(path)
    assert p.behaviour == [str((tmp_path / "sets" / "yes.txt").resolve())]
    assert p.plain == [str((tmp_path / "sets" / "no.jsonl").resolve()) + ":q"]
    yes, no = profile_splits(p, SplitSizes(4, 4, 4))
    assert all(x.startswith("gush about") for x in yes.train + yes.test)
    assert all(x.startswith("state ") for x in no.train + no.test)
    assert prompt_sources(p, ["bundled"], ["other.txt"]) == {"harmful": p.behaviour, "harmless": ["other.txt"]}


def test_profile_judges_use_its_markers_window_rubric_and_labels(tmp_path):
    flowery = load_profile("flowery").marker_judge()
    assert flowery.judge(["What a wonderful question!", "Water boils at 100 C.", ""]) == [True, False, False]
    assert MarkerJudge().judge([""]) == [True]  # refusal: an empty answer still counts
    late = "x" * 250 + " absolutely"
    assert flowery.judge([late]) == [True] and MarkerJudge(markers=("absolutely",), window=200).judge([late]) == [False]
    assert MarkerJudge(markers=("absolutely",)).judge([late]) == [True]  # the whole answer, by default
    text = MINIMAL + 'judge = "llm:/judge"\nrubric = "Terse? {answer}"\nlabels = "LABEL_1=shown,LABEL_0=absent"\n'
    settings = load_profile(write(tmp_path, text)).judge_settings()
    assert settings["rubric"] == "Terse? {answer}" and settings["labels"] == "LABEL_1=refusal,LABEL_0=compliance"
    assert parse_verdict("YES", settings["words"]) == "refusal" and parse_verdict("no.", settings["words"]) == (
        "compliance"
    )
    assert parse_verdict("YES") == "unparsed"  # the refusal rubric's words stay REFUSAL / COMPLIANCE

    class Echo:
        def generate(self, questions, **_):
            self.questions = questions
            return ["YES", "No"]

    lm = Echo()
    judge = LLMJudge(lm, rubric=settings["rubric"], words=settings["words"])  # type: ignore[arg-type]
    assert judge.verdicts(["p", "q"], ["a1", "a2"]) == ["refusal", "compliance"]
    assert lm.questions == ["Terse? a1", "Terse? a2"]


def test_opener_token_ids_differ_from_refusal_ones():
    from abliterate.measure.first_token import refusal_token_ids

    tok = tiny_tokenizer()
    assert refusal_token_ids(tok, load_profile().openers) == refusal_token_ids(tok)
    assert refusal_token_ids(tok, load_profile("flowery").openers) != refusal_token_ids(tok)
