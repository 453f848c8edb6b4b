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
PLOTS = {"measure": ["candidates", "directions"], "run": ["candidates", "directions", "refusals", "front"]}


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
    return {"measure": root / "measure", "run": root / "run"}


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
    assert f"<b>{metrics['chosen']['method']}</b> at layer <b>{metrics['chosen']['layer']}</b>" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser on PATH")
@pytest.mark.parametrize("kind", ["measure", "run"])
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
