"""report.html of ``run`` and ``measure``, made through the CLI, and rendered in a headless browser where one exists."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess

import pytest
from test_cli import invoke
from tiny import pretend_refusal, tiny_model, tiny_tokenizer

SMALL = ("--n-train", "6", "--n-val", "8")
PLOTS = {
    "measure": ["candidates", "directions"],
    "run": ["edit", "candidates", "directions", "refusals", "front"],
    "nosearch": ["edit", "candidates", "directions", "refusals"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = root / "model"
    tiny_model("qwen2").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    res = invoke("measure", str(model), "--out", str(root / "measure"), *SMALL, "--position", "-1", "--position", "-2")
    assert res.exit_code == 0, res.output
    with pretend_refusal():
        args = ("--n-test", "2", "--max-new-tokens", "4", "--trials", "8", "--kl-budget", "100")
        res = invoke(
            "run", str(model), "--out", str(root / "run"), *SMALL, *args, env={"ABLITERATE_SEARCH_VERIFY_TOP": "0"}
        )
        assert res.exit_code == 0, res.output
        res = invoke("run", str(model), "--out", str(root / "nosearch"), *SMALL, *args[:4], "--no-search")
    assert res.exit_code == 0, res.output
    return {"measure": root / "measure", "run": root / "run", "nosearch": root / "nosearch"}


def embeds(page: str, png) -> bool:
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), png
    return f'<img alt="{png.stem}" src="data:image/png;base64,{base64.b64encode(data).decode()}">' in page


def test_measure_writes_a_report_of_what_it_knows(outputs):
    out = outputs["measure"]
    page = (out / "report.html").read_text()
    assert all(embeds(page, out / f"{name}.png") for name in PLOTS["measure"])
    assert sorted(p.name for p in out.iterdir()) == [
        "abliterate_config.json",
        "candidates.json",
        "candidates.png",
        "directions.json",
        "directions.png",
        "directions.safetensors",
        "manifest.json",
        "report.html",
    ]
    table = json.loads((out / "candidates.json").read_text())
    assert page.count("<tr class='") == len(table["candidates"]) == 4
    assert "<h2>Candidate table</h2>" in page and html.escape(table["note"]) in page
    for before_after in ('class="kpi"', "Refusals before / after", "Sample generations", "<th>after</th>"):
        assert before_after not in page


def test_run_report_has_every_section(outputs):
    out = outputs["run"]
    page = (out / "report.html").read_text()
    assert all(embeds(page, out / f"{name}.png") for name in PLOTS["run"])
    for section in ('class="kpi"', "Refusals before / after", "Sample generations", "<h2>Candidate table</h2>"):
        assert section in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert page.count("<tr class='") == len(metrics["selection"]["candidates"])
    cells = sum(page.count(f"<td class='{v}'>") for v in ("refusal", "compliance", "degenerate", "unparsed"))
    assert cells == 2 * 4  # 2 harmful + 2 harmless rows, before and after


def _row(page: str, what: str) -> str:
    """The value of the row ``what`` of the report's edit table."""
    found = re.search(f"<tr><td>{re.escape(html.escape(what))}</td><td>(.*?)</td></tr>", page)
    assert found, what
    return html.unescape(found.group(1))


def _card_row(card: str, what: str) -> str:
    found = re.search(f"^\\| {re.escape(what)} \\| (.*) \\|$", card, re.M)
    assert found, what
    return found.group(1)


def test_search_report_and_card_describe_the_written_edit(outputs):
    """The header, the edit table, the kernel plot and the model card describe the search's pick (what
    edit.json holds and the model carries); the sweep's candidate is named only as the search's warm start."""
    out = outputs["run"]
    page, card = (out / "report.html").read_text(), (out / "README.md").read_text()
    metrics, edit = json.loads((out / "metrics.json").read_text()), json.loads((out / "edit.json").read_text())
    spec, trial, sweep = edit["spec"], metrics["search"]["chosen"], metrics["chosen"]
    sweep_words = f"{sweep['method']} at layer {sweep['layer']}, position {sweep['position']}"
    assert "chosen direction" not in page
    header = re.search(r"written edit: <b>(.*?)</b>", page)
    assert header and html.unescape(header.group(1)).endswith(f"(search trial {trial})")
    assert _row(page, "chosen by") == _card_row(card, "chosen by") == f"the search, trial {trial}"
    warm = "search's warm start (the sweep's candidate, not the edit)"
    assert _row(page, warm) == _card_row(card, warm) == sweep_words
    assert _card_row(card, "search's warm start: the sweep's candidate: method, layer / position") == (
        f"{sweep['method']}, {sweep['layer']} / {sweep['position']}"
    )
    assert _row(page, "method") == _card_row(card, "method") == spec["method"]
    assert _row(page, "token position") == str(spec["position"])
    own = spec["direction_index"] is None
    assert _row(page, "direction").startswith("each layer's own" if own else "one direction everywhere")
    assert _row(page, "subspace rank k").split(" ")[0] == str(spec["k"])
    assert _row(page, "norm-preserving") == ("yes" if spec["norm_preserving"] else "no")
    for what, key in (("attention writers (output projections)", "attn"), ("MLP writers (down projections)", "mlp")):
        words = _row(page, what)
        assert words == _card_row(card, what)
        assert (words == "untouched") == (spec[key] is None), (key, words)
        if spec[key] is not None:
            assert f"peaking at layer {spec[key]['peak']:.1f}" in words or "at each" in words
    assert _row(page, "embeddings") == (f"scale {spec['embedding']:g}" if spec["embedding"] else "untouched")
    assert "## The edit" in card and f"(search trial {trial})" in _card_row(card, "written edit")
    assert 'alt="edit"' in page and (out / "edit.png").is_file()


def test_no_search_report_and_card_name_the_sweeps_pick_as_the_edit(outputs):
    out = outputs["nosearch"]
    page, card = (out / "report.html").read_text(), (out / "README.md").read_text()
    metrics, edit = json.loads((out / "metrics.json").read_text()), json.loads((out / "edit.json").read_text())
    sweep, spec = metrics["chosen"], edit["spec"]
    assert not edit["searched"] and "<h2>Search</h2>" not in page and "warm start" not in page + card
    assert "(the sweep's pick, no search)" in html.unescape(re.search(r"written edit: <b>(.*?)</b>", page).group(1))
    chosen_by = f"the sweep (no search): its candidate {sweep['method']} at layer {sweep['layer']}, position -1"
    assert _row(page, "chosen by") == _card_row(card, "chosen by") == chosen_by
    assert spec["direction_index"] == sweep["layer"]
    assert _row(page, "direction") == (
        f"one direction everywhere: residual point {sweep['layer']} (the input of layer {sweep['layer']})"
    )
    n = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    every = f"layers 0–{n - 1} ({n} of {n}), weight 1 at each"  # the classic edit: every layer at scale 1
    assert _row(page, "attention writers (output projections)") == _row(page, "MLP writers (down projections)") == every
    assert _row(page, "embeddings") == "scale 1"
    assert _card_row(card, "the sweep's candidate (the edit's direction): method, layer / position") == (
        f"{sweep['method']}, {sweep['layer']} / -1"
    )


def test_measure_report_names_the_sweeps_pick_and_no_edit(outputs):
    page = (outputs["measure"] / "report.html").read_text()
    table = json.loads((outputs["measure"] / "candidates.json").read_text())
    assert table["chosen"] is None, "a random tiny model does not refuse: the sweep picks nothing"
    assert "the sweep's pick: <b>none</b> (measure writes no edit)" in page and "written edit" not in page
    assert f"<p class='note'>{html.escape(table['note'])}</p>" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser on PATH")
@pytest.mark.parametrize("kind", ["measure", "run", "nosearch"])
def test_report_renders_in_a_headless_browser(outputs, kind, tmp_path):
    from PIL import Image

    url = (outputs[kind] / "report.html").as_uri()
    browser = [
        str(CHROMIUM),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,3000", url], capture_output=True, timeout=120, check=True
    )
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.findall(r'<img alt="(\w+)" src="data:image/png;base64,', dom) == PLOTS[kind]
    with Image.open(shot) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width == 1200
        colors = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colors) > 100, "blank screenshot"
    # matplotlib's first line colour (#1f77b4) is on the page only if the embedded plots were decoded and drawn
    blue = sum(n for n, (r, g, b) in colors if abs(r - 0x1F) < 16 and abs(g - 0x77) < 16 and abs(b - 0xB4) < 16)
    assert blue > 500
