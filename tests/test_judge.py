"""Verdicts: thinking removal, the degenerate detector (both sides of every rule) and judge_responses."""

from __future__ import annotations

from pathlib import Path

import pytest

from abliterate.evaluate.judge import DegenerateDetector, MarkerJudge, answer_text, judge_responses, refusal_rate

ROOT = Path(__file__).resolve().parents[1]

FINE = {
    "prose": (ROOT / "README.md").read_text()[2000:2600],
    "python": (ROOT / "src" / "abliterate" / "behaviours" / "prompts.py").read_text()[1500:2100],
    "javascript": "const f = (a, b) => { return a.map((x) => x * b); };\nconsole.log(f([1, 2, 3], 2));",
    "table": "| Name | Age |\n|------|-----|\n| Alice | 30 |\n| Bob | 25 |",
    "math": "2+2=4",
    "one token": "4",
    "numbered list": "\n".join(f"{i}. Step {i}: mix the flour with {i} cups of water." for i in range(1, 9)),
    "bullets": "Here are some tips:\n- Drink water.\n- Sleep well.\n- Exercise daily.\n- Eat vegetables.",
    "counting": ", ".join(str(i) for i in range(40)),
    "regex": r"Use ^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$ to match e-mail addresses.",
    "poem with a refrain": "Roses are red,\nViolets are blue,\nSugar is sweet,\nAnd so are you.\nRoses are red!",
    "languages": "In Japanese, 'cat' is 猫 (ねこ, neko); in Russian, кошка; in Greek, γάτα. Easy!",
    "japanese": "日本語の文章はひらがなとカタカナと漢字を混ぜて書きます。これはテストです。",
    "separator": "Here is the answer to your question about databases, in short:\n" + "-" * 30,
    "refusal": "I'm sorry, but I can't help with that. If you are in danger, please contact local services.",
}

DEGENERATE = {
    "empty": ("", "empty"),
    "whitespace": (" \n\t ", "empty"),
    "replacement characters": ("abc\ufffd\ufffd\ufffd\ufffd def", "non-text"),
    "control characters": ("ok\x01\x02\x03\x04\x05 then", "non-text"),
    "punctuation soup": ("!!!!!!!!!!!!!! ?? ..", "non-text"),
    "random scripts": ("Ол 的 ᴇ ṭ ỳ ð ŀ ĳ 𝒜 ℬ кошка γάτα 猫 ねこ abc ɐɔ ʃ ʒ ŋ ӝ Ѭ Ѯ ק ש ע", "non-text"),
    "one token loop": ("Sure, here is how" + " the" * 30, "loop"),
    "no-space loop": ("a" * 40, "loop"),
    "cjk loop": ("的" * 40, "loop"),
    "phrase loop": ("Step 1: open the door. Then close it. " * 5, "loop"),
    "tail loop": ("To make bread you need flour, water, salt and yeast. Mix them. " + "Then knead. " * 12, "loop"),
    "repeated sentences": ("We mix the flour and water. " * 4 + "Then it is done.", "loop"),
    "a sentence said three times": ("We mix the flour and water. " * 3 + "Then it is done.", "repeated block"),
}


@pytest.mark.parametrize("name", FINE)
def test_ordinary_answers_are_not_degenerate(name):
    assert DegenerateDetector().reason(FINE[name]) == "", name


@pytest.mark.parametrize("name", DEGENERATE)
def test_each_rule_flags_its_case(name):
    text, reason = DEGENERATE[name]
    assert DegenerateDetector().reason(text) == reason, name


def test_thresholds_are_settings():
    text = "Fine answer here. " + "go " * 5
    assert DegenerateDetector().reason(text) == ""
    assert DegenerateDetector(min_loop_chars=8, min_loop_share=0.4).reason(text) == "loop"
    thrice = "We mix the flour and water. " * 3 + "Then it is done."
    others_off = DegenerateDetector(min_block_share=1.01)
    assert others_off.reason(thrice) == ""
    assert DegenerateDetector(max_repeated=0.4, min_block_share=1.01).reason(thrice) == "repeated n-grams"
    assert DegenerateDetector(min_alnum=0.9).reason("x = (a + b) * c;") == "non-text"


def test_answer_text_skips_the_thinking_block():
    assert answer_text("<think>\nI cannot decide.\n</think>\n\nSure, here it is.") == "Sure, here it is."
    assert answer_text("thinking without an opener</think>Answer") == "Answer"  # template opened the block
    assert answer_text("<think>a</think>b<think>c</think> final ") == "final"
    assert answer_text("<think>still thinking when the budget ran out") == ""
    assert answer_text("  plain answer ") == "plain answer"
    assert answer_text("[THINK]x[/THINK]y", tags=("[THINK]", "[/THINK]")) == "y"


class Spy:
    name = "spy"

    def __init__(self, answer="compliance"):
        self.seen: list[tuple[str, str]] = []
        self.answer = answer

    def verdicts(self, prompts, answers):
        self.seen += list(zip(prompts, answers, strict=True))
        return [self.answer] * len(answers)


def test_judge_responses_sets_degenerate_aside_and_judges_the_answer_only():
    spy = Spy()
    prompts = ["p0", "p1", "p2", "p3"]
    responses = ["<think>I'm sorry</think> Sure: step one.", "", "ha" * 30, "<think>never closed"]
    judged = judge_responses(spy, prompts, responses)
    assert [j.verdict for j in judged] == ["compliance", "degenerate", "degenerate", "degenerate"]
    assert [j.reason for j in judged] == ["", "empty", "loop", "empty"]
    assert spy.seen == [("p0", "Sure: step one.")]  # degenerate answers never reach the judge
    marker = judge_responses(MarkerJudge(), ["a", "b"], ["<think>Sure thing.</think>I cannot help.", "Sure."])
    assert [j.verdict for j in marker] == ["refusal", "compliance"]


def test_a_judge_answer_outside_the_verdicts_is_unparsed():
    judged = judge_responses(Spy("maybe?"), ["p"], ["A real answer."])
    assert judged[0].verdict == "unparsed" and judged[0].reason == "maybe?"
    assert judge_responses(Spy("unparsed"), ["p"], ["A real answer."])[0].verdict == "unparsed"
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge_responses(Spy(), ["a", "b"], ["x"])


def test_marker_judge_verdicts_and_the_old_boolean_rule():
    judge = MarkerJudge()
    assert judge.verdicts(["p", "q"], ["I cannot do that.", "Sure."]) == ["refusal", "compliance"]
    assert judge.judge(["I cannot", "Sure"]) == [True, False]
    assert refusal_rate(["I cannot", "Sure", "", "!!!!!!!!!!!!"]) == 0.25  # degenerate is not a refusal
