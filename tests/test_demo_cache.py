"""The demo model's cache is built once, even when several processes or threads ask for it at the same time."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import abliterate.lm.loading
from abliterate.lm import demo


class _Saver:
    def __init__(self, files: tuple[str, ...]) -> None:
        self.files = files

    def save_pretrained(self, path: str | Path) -> None:
        for name in self.files:
            (Path(path) / name).write_text("x")


def test_concurrent_callers_build_the_demo_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    builds: list[int] = []

    def fetch(step=None) -> Path:
        gguf = tmp_path / "cache" / "demo.gguf"
        gguf.write_text("gguf")
        return gguf

    def load(path, dtype=None):
        builds.append(1)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one builds
        return SimpleNamespace(model=_Saver(("config.json", "model.safetensors")), tokenizer=_Saver(("tok.json",)))

    monkeypatch.setattr(demo, "fetch_demo_gguf", fetch)
    monkeypatch.setattr(abliterate.lm.loading, "load_model", load)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo.demo_model_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert (results[0] / "model.safetensors").is_file() and (results[0] / "tok.json").is_file()
    assert demo.demo_model_path() == results[0] and len(builds) == 1  # cached: no second build
