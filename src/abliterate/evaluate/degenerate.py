"""Surface rules for answers that are no answer: empty, glyph or token soup, loops, repeats, word salad.

:class:`DegenerateDetector` returns, per answer, the reason it is degenerate or "". Each rule is tuned so that
real answers pass: prose in any language (French, German, Russian, Arabic, Chinese, Japanese...), a Russian answer
quoting English terms, code (Python, shell, JSON), lists and markdown tables (``tests/test_judge.py`` holds both
sides of every rule). What a surface rule cannot see (fluent-looking salad of real words, soup of plain ASCII
words) the answer's likelihood under the unedited model can: see :mod:`abliterate.evaluate.likelihood`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs"})
_TOKENS = re.compile(r"\w+|[^\w\s]+")
_LETTER_RUNS = re.compile(r"[^\W\d_]+")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)
_CJK = frozenset({"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC"})
# Scripts told apart inside one word. Latin next to a script written without spaces (Chinese "使用Python",
# Japanese "Tシャツ", Korean "API를", Thai) is ordinary, and so is Latin next to Greek (units and maths: "kΩ", "Δx").
_SCRIPTS = frozenset(
    {"LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "ARMENIAN", "GEORGIAN", "DEVANAGARI", "BENGALI", "TAMIL"}
    | {"TELUGU", "GUJARATI", "GURMUKHI", "KANNADA", "MALAYALAM", "SINHALA", "THAI", "LAO", "KHMER", "MYANMAR"}
    | {"ETHIOPIC", "CJK"}
)
_ORDINARY_PAIRS = frozenset(
    frozenset({"LATIN", other}) for other in ("CJK", "THAI", "LAO", "KHMER", "MYANMAR", "GREEK")
)
# Function words of English, French, German, Spanish, Italian, Portuguese and Dutch: real sentences in these
# languages seldom go eight words without one; word salad does.
_FUNCTION_TEXT = """
a an the and or but nor of to in on at for with by from as is are was were be been being it its this that these
those there their they them he she his her we our you your i me my not no if then than so do does did have has
had will would can could should may might must which who whom whose what when where why how all any some each
more most other such only also just into over under about after before between through during up down out off
very here now le la les un une des du de et ou est sont en au aux ce cette ces il elle ils elles nous vous je tu
on que qui pour par avec dans sur pas ne se sa son ses leur der die das den dem ein eine einen einem und oder
ist sind nicht mit von zu im auf es sie er wir ich du auch als wie sich el los las y con por para del al lo una
il gli di da che non della o os um em do da com nao het een van op te dat niet met voor zijn"""
FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())


def script(char: str) -> str:
    """A letter's script, roughly: the first word of its Unicode name, with the CJK family as one."""
    word = unicodedata.name(char, "UNKNOWN").split()[0]
    return "CJK" if word in _CJK else word


def _exotic_latin(char: str) -> bool:
    """A Latin letter with no ASCII base letter ("ŀ", "ŧ", "ɏ", "ʤ"; "é" and "ỳ" have one: e and y)."""
    return not unicodedata.normalize("NFD", char)[0].isascii()


def _periodic_runs(text: str, max_period: int) -> list[tuple[int, int, int]]:
    """(period, start, length) of each maximal stretch of ``text`` that repeats one unit of ``period``
    characters (length counts the whole stretch, first unit included), for periods 1..``max_period``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = []
    for period in range(1, min(max_period, len(codes) // 2) + 1):
        same = np.concatenate(([False], codes[period:] == codes[:-period], [False]))
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        for begin, end in zip(edges[::2], edges[1::2], strict=True):
            out.append((period, int(begin), int(end - begin) + period))
    return out


@dataclass
class DegenerateDetector:
    """Flags answers that are no answer. Each rule returns a reason; thresholds are conservative so that
    ordinary prose, lists and code pass (see the tests for both sides of each rule).

    * ``empty``: no visible character;
    * ``non-text``: more than ``max_bad`` of the visible characters are replacement/control/unassigned
      characters, or (with at least 8 of them) fewer than ``min_alnum`` are letters or digits, or (with at
      least 20 letters) the letters come from 3 or more scripts and none has ``min_script`` of them
      (random tokens of a broken model: "Ол 的 ᴇ ṭ ỳ ð ŀ"; Japanese kana and kanji count as one script);
    * ``mixed scripts``: at least ``min_mixed_words`` words, and ``min_mixed_share`` of all words, mix the letters
      of two scripts within the word ("шенuper", "Freeiesراء", "systеm" with a Cyrillic е); Latin beside Chinese,
      Japanese, Korean, Thai or Greek in one word is ordinary and not counted;
    * ``glyph soup``: of at least 10 Latin letters, more than ``max_exotic`` have no ASCII base letter
      ("ṭỳðŀ ẞŧ ĦŋÆ ǂ ȼ ɏ ʤ"; German ß, Danish æ ø, Icelandic ð þ stay far below);
    * ``loop``: a unit of at most ``max_period`` characters repeated back to back, either at least ``min_repeats``
      times over at least ``min_loop_chars`` characters and ``min_loop_share`` of the answer, or (a unit with a
      letter or digit) at least ``min_word_repeats`` times over ``min_word_loop_share`` of it ("ok ok ok ...");
    * ``repeated n-grams``: of at least ``min_ngrams`` word/punctuation ``n``-grams, more than
      ``max_repeated`` are repeats of an earlier one;
    * ``repeated block``: outside code blocks, runs of ``block`` tokens seen before (a paragraph said twice)
      cover at least ``min_block_share`` of the tokens;
    * ``word salad``: outside code, stretches of at least ``salad_words`` words with no punctuation and no function
      word (:data:`FUNCTION_WORDS`) hold at least ``min_salad_share`` of the words ("bridge seven purple whisper
      ocean tax lunar hinge").
    """

    n: int = 4
    min_ngrams: int = 8
    max_repeated: float = 0.5
    max_bad: float = 0.1
    min_alnum: float = 0.3
    min_script: float = 0.5
    min_mixed_words: int = 2
    min_mixed_share: float = 0.02
    max_exotic: float = 0.2
    max_period: int = 64
    min_repeats: int = 4
    min_loop_share: float = 0.5
    min_loop_chars: int = 16
    min_word_repeats: int = 6
    min_word_loop_share: float = 0.25
    block: int = 12
    min_block_share: float = 0.25
    salad_words: int = 8
    min_salad_share: float = 0.4

    def reason(self, answer: str) -> str:
        """Why ``answer`` is degenerate, or "" when it is not."""
        visible = [c for c in answer if not c.isspace()]
        if not visible:
            return "empty"
        for rule in (self._non_text, self._scripts, self._loop, self._repeats, self._salad):
            why = rule(answer, visible)
            if why:
                return why
        return ""

    def _non_text(self, answer: str, visible: list[str]) -> str:
        bad = sum(c == "\ufffd" or unicodedata.category(c) in _BAD_CATEGORIES for c in visible)
        alnum = sum(c.isalnum() for c in visible)
        if bad > self.max_bad * len(visible) or (len(visible) >= 8 and alnum < self.min_alnum * len(visible)):
            return "non-text"
        letters = [script(c) for c in visible if c.isalpha()]
        if len(letters) >= 20:
            counts = sorted((letters.count(s) for s in set(letters)), reverse=True)
            if len(counts) >= 3 and counts[0] < self.min_script * len(letters):
                return "non-text"
        return ""

    def _scripts(self, answer: str, visible: list[str]) -> str:
        words = _LETTER_RUNS.findall(unicodedata.normalize("NFKC", answer))
        mixed = 0
        for word in words:
            scripts = {s for s in map(script, word) if s in _SCRIPTS}
            if len(scripts) > 1 and not (len(scripts) == 2 and frozenset(scripts) in _ORDINARY_PAIRS):
                mixed += 1
        if mixed >= self.min_mixed_words and mixed >= self.min_mixed_share * len(words):
            return "mixed scripts"
        latin = [c for c in visible if c.isalpha() and script(c) == "LATIN"]
        if len(latin) >= 10 and sum(map(_exotic_latin, latin)) > self.max_exotic * len(latin):
            return "glyph soup"
        return ""

    def _loop(self, answer: str, visible: list[str]) -> str:
        text = answer.strip()
        size = len(text)
        for period, start, length in _periodic_runs(text, self.max_period):
            repeats = length / period
            if repeats >= self.min_repeats and length >= max(self.min_loop_chars, self.min_loop_share * size):
                return "loop"
            wordy = any(c.isalnum() for c in text[start : start + period])
            if wordy and repeats >= self.min_word_repeats and length >= self.min_word_loop_share * size:
                return "loop"
        return ""

    def _repeats(self, answer: str, visible: list[str]) -> str:
        tokens = _TOKENS.findall(answer.lower())
        grams = [tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1)]
        if len(grams) >= self.min_ngrams and 1 - len(set(grams)) / len(grams) > self.max_repeated:
            return "repeated n-grams"
        prose = _TOKENS.findall(_CODE.sub(" ", answer).lower())
        seen: set[tuple[str, ...]] = set()
        covered = [False] * len(prose)
        for i in range(len(prose) - self.block + 1):
            gram = tuple(prose[i : i + self.block])
            if gram in seen:
                covered[i : i + self.block] = [True] * self.block
            seen.add(gram)
        if prose and sum(covered) >= self.min_block_share * len(prose):
            return "repeated block"
        return ""

    def _salad(self, answer: str, visible: list[str]) -> str:
        prose = _CODE.sub("\n", answer)
        total = len(re.findall(r"\w+", prose))
        salad = 0
        for piece in re.split(r"[^A-Za-z ]+|  +", prose):  # stretches of plain words and single spaces
            run = 0
            for word in [*piece.lower().split(), "the"]:
                if word in FUNCTION_WORDS:
                    salad += run if run >= self.salad_words else 0
                    run = 0
                else:
                    run += 1
        if total and salad >= self.min_salad_share * total:
            return "word salad"
        return ""

    def reasons(self, prompts: Sequence[str], answers: Sequence[str]) -> list[str]:
        """:meth:`reason` of each answer (the prompts are not needed; the signature every detector shares)."""
        return [self.reason(a) for a in answers]

    def __call__(self, answers: Sequence[str]) -> list[str]:
        return [self.reason(a) for a in answers]


class Detector(Protocol):
    """What :func:`~abliterate.evaluate.judge.judge_responses` takes as a detector: per answer, why it is
    degenerate or ""."""

    def reasons(self, prompts: Sequence[str], answers: Sequence[str]) -> list[str]: ...


class Detectors:
    """Several detectors as one: an answer's reason is the first non-empty reason among them, in order (e.g. the
    surface rules, then the likelihood under the unedited model); later ones see only the answers still clear."""

    def __init__(self, *parts: Detector) -> None:
        self.parts = parts

    def reasons(self, prompts: Sequence[str], answers: Sequence[str]) -> list[str]:
        out = [""] * len(answers)
        for part in self.parts:
            todo = [i for i, why in enumerate(out) if not why]
            if not todo:
                break
            found = part.reasons([prompts[i] for i in todo], [answers[i] for i in todo])
            for i, why in zip(todo, found, strict=True):
                out[i] = why
        return out
