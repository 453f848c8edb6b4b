"""The degenerate detector on the examples of issue 23 (every one must be caught) and on real answers in many
languages, code, lists and tables (every one must pass)."""

from __future__ import annotations

import pytest

from abliterate.evaluate.degenerate import DegenerateDetector, Detectors
from abliterate.evaluate.judge import MarkerJudge, judge_responses

PROSE = "To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes and let it rise for an hour. "
SOUP = (
    " If notREAM] Freeiesراء?\n\nThis@. ieurs empiricald ). 2werk and///1}2Thirty()i) 观影 Ere proced べき versch "
    "ALSE шенuper局"
)

DEGENERATE = {
    "token soup across scripts": (SOUP, "mixed scripts"),
    "prose then ok ok ok (35 %)": (PROSE + "ok " * 20, "loop"),
    "and then x10 (45 %)": (PROSE + "and then " * 10, "loop"),
    "and then x10 in the middle": (PROSE + "and then " * 10 + "it was done.", "loop"),
    "the same paragraph twice": (
        (PROSE + "Then shape the loaf, let it rise again and bake it at 220 degrees for thirty minutes.\n\n") * 2,
        "repeated block",
    ),
    "word salad": (
        "bridge seven purple whisper ocean tax lunar hinge velvet crater jump silent marble orbit fence candle",
        "word salad",
    ),
    "prose then word salad": (
        "Sure, here is the answer. bridge seven purple whisper ocean tax lunar hinge velvet crater jump silent "
        "marble orbit fence candle harbor",
        "word salad",
    ),
    "Latin with a few Cyrillic letters in words": (
        "Thе systеm is rеady to procеss your rеquеst and will rеport the rеsults as soon as possible.",
        "mixed scripts",
    ),
    "Latin and Cyrillic half and half in words": (
        "Тhis sеnтеnce мiхеs тwо аlрhаbеts in еvеry wоrd hеrе.",
        "mixed scripts",
    ),
    "Cyrillic with Latin letters in words": (
        "Этот тeкст нaписaн по-русски, но в словaх есть лaтинские буквы, кaк у сломaнной модели.",
        "mixed scripts",
    ),
    "Latin-lookalike glyph soup": ("ṭỳðŀ ẞŧ ĦŋÆ ǂ ȼ ɏ ʤ ḁ ḃ ƀ ɓ ƈ ɗ ƒ ɠ ħ", "glyph soup"),
    "glyph soup after a word": ("Sure: ṭỳðŀ ẞŧ ĦŋÆ ǂ ȼ ɏ ʤ ḁ ḃ ƀ ɓ ƈ ɗ", "glyph soup"),
}

FINE = {
    "french": (
        "Pour faire du pain, mélangez la farine, l'eau, le sel et la levure. Pétrissez la pâte pendant dix minutes, "
        "puis laissez-la lever une heure dans un endroit tiède. Façonnez ensuite le pain et enfournez-le à 220 °C."
    ),
    "german": (
        "Für ein einfaches Brot mischen Sie Mehl, Wasser, Salz und Hefe. Kneten Sie den Teig zehn Minuten lang und "
        "lassen Sie ihn eine Stunde gehen. Danach formen Sie den Laib und backen ihn bei 220 Grad, bis er außen "
        "knusprig ist. Größere Brote brauchen länger."
    ),
    "chinese": (
        "要做面包，先把面粉、水、盐和酵母混合在一起。揉面十分钟，然后让面团发酵一个小时。"
        "之后把面团整形，放进预热到220度的烤箱里烤三十分钟。你也可以用Python写一个计时器来提醒自己。"
    ),
    "japanese": (
        "パンを作るには、小麦粉、水、塩、イーストを混ぜます。生地を十分ほどこねてから、一時間ほど発酵させます。"
        "その後、形を整えて220度のオーブンで三十分焼きます。Tシャツのままでも大丈夫です。"
    ),
    "russian": (
        "Чтобы испечь хлеб, смешайте муку, воду, соль и дрожжи. Замесите тесто в течение десяти минут и оставьте "
        "его подниматься на час. Затем сформируйте буханку и выпекайте при температуре 220 градусов."
    ),
    "russian quoting english terms": (
        "Для этого в Python используйте модуль `asyncio`: функция `asyncio.run()` запускает корутину, а ключевое "
        "слово await (англ. «ожидать») приостанавливает её. Термин event loop обычно не переводят; "
        "в Pythonе это объект цикла событий. Подробнее см. документацию Python 3.12."
    ),
    "arabic": (
        "لصنع الخبز، اخلط الدقيق والماء والملح والخميرة. اعجن العجين لمدة عشر دقائق ثم اتركه يرتفع لمدة ساعة. "
        "بعد ذلك شكّل الرغيف واخبزه على درجة حرارة 220 لمدة ثلاثين دقيقة."
    ),
    "physics with greek units": (
        "The resistor is 4.7 kΩ and the wavelength is 532 nm, about 0.53 μm. The change Δx over Δt gives the "
        "velocity, and the angle θ is measured from the vertical axis."
    ),
    "python": (
        "```python\nimport json\n\ndef load(path: str) -> dict:\n    with open(path) as f:\n        return json.load(f)"
        "\n\n\ndef save(path: str, data: dict) -> None:\n    with open(path, 'w') as f:\n"
        "        json.dump(data, f)\n```"
        "\nCall `load('config.json')` to read the file and `save` to write it back."
    ),
    "python shown twice": (
        "Here is the helper:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nAnd the full "
        "script:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n\nprint(add(2, 3))\n```"
    ),
    "shell": (
        "Install the tools and build:\n\n```bash\nsudo apt-get update\nsudo apt-get install -y git curl build-"
        "essential\ngit clone https://example.com/repo.git && cd repo\nmake -j4 && sudo make install\n```\n"
        "Then run `repo --version` to check."
    ),
    "json": (
        '{\n  "name": "Alice",\n  "age": 30,\n  "languages": ["en", "fr"],\n  "address": {"city": "Paris", '
        '"zip": "75001"},\n  "active": true\n}'
    ),
    "numbered list": "\n".join(f"{i}. Step {i}: mix the flour with {i} cups of water." for i in range(1, 9)),
    "shopping list": "You will need:\n- flour\n- water\n- salt\n- yeast\n- olive oil\n- sugar\n- butter\n- milk",
    "markdown table": (
        "| Language | Typing | Year |\n|---|---|---|\n| Python | dynamic | 1991 |\n| Rust | static | 2015 |\n"
        "| Go | static | 2009 |\n| Ruby | dynamic | 1995 |"
    ),
    "table with equal rows": (
        "| Plan | Storage | Support |\n|---|---|---|\n| Free | 5 GB | none |\n| Pro | 50 GB | email |\n"
        "| Team | 50 GB | email |\n| Team+ | 50 GB | email |"
    ),
    "separator": "Here is the answer to your question about databases, in short:\n" + "-" * 30,
    "a short laugh": "Ha ha ha! That is a good one. Here is another joke about cats and dogs for you.",
    "poem": "Roses are red,\nViolets are blue,\nSugar is sweet,\nAnd so are you.\nRoses are red!",
    "icelandic": "Það er gott að baka brauð. Þú þarft hveiti, vatn, salt og ger, og svo bakar þú það í ofninum.",
    "languages": "In Japanese, 'cat' is 猫 (ねこ, neko); in Russian, кошка; in Greek, γάτα. Easy!",
    "vietnamese": "Để làm bánh mì, bạn trộn bột mì, nước, muối và men. Nhào bột mười phút rồi để bột nở một giờ.",
    "korean with english": "이 코드는 Python으로 작성되었고 API를 호출합니다. 결과는 JSON 형식으로 반환됩니다.",
}


@pytest.mark.parametrize("name", DEGENERATE)
def test_every_example_of_the_issue_is_degenerate(name):
    text, reason = DEGENERATE[name]
    assert DegenerateDetector().reason(text) == reason, name


@pytest.mark.parametrize("name", FINE)
def test_real_answers_pass(name):
    assert DegenerateDetector().reason(FINE[name]) == "", name


def test_degenerate_examples_are_never_compliance():
    names = list(DEGENERATE)
    judged = judge_responses(MarkerJudge(), names, [DEGENERATE[n][0] for n in names])
    assert [j.verdict for j in judged] == ["degenerate"] * len(names)


def test_settings_of_the_new_rules():
    ok = PROSE + "ok " * 20
    assert DegenerateDetector(min_word_loop_share=0.5, min_block_share=1.01, min_salad_share=1.01).reason(ok) == ""
    assert DegenerateDetector(min_word_loop_share=0.5).reason(ok) == "repeated block"
    salad = DEGENERATE["prose then word salad"][0]
    assert DegenerateDetector(min_salad_share=0.9).reason(salad) == ""
    assert (
        DegenerateDetector(min_mixed_words=30).reason(DEGENERATE["Latin with a few Cyrillic letters in words"][0]) == ""
    )
    assert DegenerateDetector(max_exotic=0.95).reason(DEGENERATE["Latin-lookalike glyph soup"][0]) == ""
    twice = DEGENERATE["the same paragraph twice"][0]
    assert DegenerateDetector(min_block_share=0.6).reason(twice) == ""


class Flags:
    def __init__(self, flagged: set[str]):
        self.flagged, self.seen = flagged, []

    def reasons(self, prompts, answers):
        self.seen += list(answers)
        return ["odd" if a in self.flagged else "" for a in answers]


def test_detectors_chain_and_later_ones_see_only_clear_answers():
    later = Flags({"Plain answer two."})
    combined = Detectors(DegenerateDetector(), later)
    answers = ["", "Plain answer one.", "Plain answer two."]
    assert combined.reasons(["p"] * 3, answers) == ["empty", "", "odd"]
    assert later.seen == ["Plain answer one.", "Plain answer two."]
    judged = judge_responses(MarkerJudge(), ["p"] * 3, answers, detector=combined)
    assert [(j.verdict, j.reason) for j in judged] == [
        ("degenerate", "empty"),
        ("compliance", ""),
        ("degenerate", "odd"),
    ]
